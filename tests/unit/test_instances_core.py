"""Pure logic of the instances core: names, id shifting, /proc and cgroup readers, helpers."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import state
from lxd_daemon.instances.idmap import IdmapEntry, IdmapSet
from lxd_daemon.instances.models import Record
from lxd_daemon.instances.service import _halt_signal, _simple_map, shift_tree, validate_name
from lxd_daemon.profiles.service import validate_name as validate_profile_name


@pytest.mark.parametrize("name", ["a", "c1", "web-01", "A" + "b" * 62])
def test_valid_instance_names(name):
    validate_name(name)


@pytest.mark.parametrize("name", ["", "1abc", "-abc", "abc-", "a_b", "a.b", "a b", "a" * 64, "é"])
def test_invalid_instance_names(name):
    with pytest.raises(BadRequest):
        validate_name(name)


@pytest.mark.parametrize("name", ["", "a/b", "a b", ".", ".."])
def test_invalid_profile_names(name):
    with pytest.raises(BadRequest):
        validate_profile_name(name)


def _both(host: int, size: int = 65536) -> IdmapSet:
    return IdmapSet((IdmapEntry(True, True, host, 0, size),))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_shift_tree_moves_ownership_and_keeps_setuid(tmp_path):
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    f = root / "bin" / "su"
    f.write_text("x")
    os.symlink("su", root / "bin" / "link")
    for p in (root, root / "bin", f):
        os.chown(p, 1_000_000, 1_000_000)
    os.lchown(root / "bin" / "link", 1_000_033, 1_000_033)
    os.chmod(f, 0o4755)
    n = shift_tree(root, _both(1_000_000), _both(2_000_000))
    assert n == 4
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (2_000_000, 2_000_000)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o4755
    assert os.lstat(root / "bin" / "link").st_uid == 2_000_033
    # To an unshifted (privileged) layout and back.
    shift_tree(root, _both(2_000_000), IdmapSet(()))
    assert os.stat(f).st_uid == 0
    shift_tree(root, IdmapSet(()), _both(1_000_000))
    assert os.stat(f).st_uid == 1_000_000


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_shift_tree_leaves_unmapped_ids(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    os.chown(f, 500, 500)  # not inside the old map: left alone
    shift_tree(tmp_path, _both(1_000_000), _both(2_000_000))
    assert os.stat(f).st_uid == 500


def test_simple_map():
    default = _both(1_000_000, 1_000_000_000)
    assert _simple_map(default, 1_000_000, 1_000_000) == default
    raw = IdmapSet((IdmapEntry(True, True, 1_000_000, 0, 1000), IdmapEntry(True, True, 1000, 1000, 1),
                    IdmapEntry(True, True, 1_001_001, 1001, 5000)))
    m = _simple_map(raw, 1_000_000, 1_000_000)
    assert m.entries == (IdmapEntry(True, True, 1_000_000, 0, 65536),)


def test_halt_signal_default_and_raw_lxc():
    rec = Record(1, "c", "x86_64", False, False, "", "", "", {}, {}, [])
    assert _halt_signal(rec, {}) == signal.SIGPWR
    assert _halt_signal(rec, {"raw.lxc": "lxc.signal.halt = SIGTERM\n"}) == signal.SIGTERM
    assert _halt_signal(rec, {"raw.lxc": "lxc.signal.halt=10"}) == 10


def test_proc_start_time_and_alive():
    me = os.getpid()
    st = state.proc_start_time(me)
    assert st is not None and st > 0
    assert state.alive(me, st)
    assert not state.alive(me, st + 1)  # a recycled pid has another start time
    assert not state.alive(-1, None)


def test_cgroup_paths_of_self():
    cg = state.cgroup_paths(os.getpid())
    assert cg, "no cgroups found for this process"
    for path in cg.values():
        assert path.startswith("/sys/fs/cgroup")
    u = state.usage(cg)
    assert set(u) == {"cpu", "memory", "memory_peak", "swap", "swap_peak", "processes"}


def test_network_of_host_namespace_has_loopback():
    net = state.network(os.getpid())
    assert "lo" in net
    lo = net["lo"]
    assert lo["type"] == "loopback" and lo["mtu"] == 65536
    assert set(lo["counters"]) >= {"bytes_received", "bytes_sent", "packets_received", "packets_sent"}
    assert any(a["address"] == "127.0.0.1" and a["netmask"] == "8" for a in lo["addresses"])


def test_stopped_state_shape():
    s = state.stopped_state()
    assert s["status"] == "Stopped" and s["status_code"] == 102 and s["pid"] == 0
