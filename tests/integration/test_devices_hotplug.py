"""Hot-plugging disk and unix devices into a running container through the liblxc workers
(instances.live.apply_live -> runtime.hotplug), on a container booted from lxcconf.render()."""

from __future__ import annotations

import os
import subprocess

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import live
from lxd_daemon.runtime.client import RuntimeClient
from tests.helpers import LiveWorker, RawContainer, started_raw_container

pytestmark = pytest.mark.integration

ROOT = {"root": {"type": "disk", "path": "/", "pool": "default"}}


_WORKER: list[LiveWorker] = []


@pytest.fixture(scope="module", autouse=True)
def worker_pool():
    """One liblxc worker and one event loop for the module's live updates."""
    w = LiveWorker()
    _WORKER.append(w)
    yield w.pool
    _WORKER.clear()
    w.close()


@pytest.fixture(scope="module")
def running():
    with started_raw_container("hp", devices=dict(ROOT)) as c:
        yield c


def apply(c: RawContainer, old: tuple[dict, dict], new: tuple[dict, dict]) -> None:
    _WORKER[0].run(live.apply_live(
        RuntimeClient(_WORKER[0].pool), c.name, old, new, init_pid=c.pid, idmap=c.idmap))  # devices dir: found via the monitor


def mounted(c: RawContainer, path: str) -> bool:
    return any(line.split()[4] == path for line in c.attach("cat", "/proc/self/mountinfo").stdout.splitlines())


def test_disk_hotplug_and_unplug(running):
    c = running
    src = c.base / "hot"
    src.mkdir()
    (src / "f").write_text("hot data\n")
    dev = {"type": "disk", "source": str(src), "path": "/mnt/hot/deep"}
    apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "hot": dev}))
    assert c.attach("cat", "/mnt/hot/deep/f").stdout == "hot data\n"
    # the mount point was created as container root
    assert c.attach("stat", "-c", "%u", "/mnt/hot").stdout.strip() == "0"
    apply(c, ({}, {**ROOT, "hot": dev}), ({}, dict(ROOT)))
    assert not mounted(c, "/mnt/hot/deep")
    # the mount point goes with the device, as in LXD (issue 8); its parent stays
    assert c.attach("ls", "/mnt/hot").stdout == ""


def test_readonly_file_and_changed_device(running):
    c = running
    f = c.base / "single.txt"
    f.write_text("one file\n")
    dev = {"type": "disk", "source": str(f), "path": "/etc/single.txt", "readonly": "true"}
    apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "f": dev}))
    assert c.attach("cat", "/etc/single.txt").stdout == "one file\n"
    r = c.attach("sh", "-c", "echo x >> /etc/single.txt", check=False)
    assert r.returncode != 0
    # changing the device re-plugs it: now writable (the file belongs to container root)
    os.chown(f, *c.root_ids)
    dev2 = {**dev, "readonly": "false"}
    apply(c, ({}, {**ROOT, "f": dev}), ({}, {**ROOT, "f": dev2}))
    c.attach("sh", "-c", "echo two >> /etc/single.txt")
    assert f.read_text() == "one file\ntwo\n"
    apply(c, ({}, {**ROOT, "f": dev2}), ({}, dict(ROOT)))
    assert not mounted(c, "/etc/single.txt")


def test_symlink_in_container_cannot_redirect_mount_to_host(running):
    c = running
    src = c.base / "s"
    src.mkdir()
    (src / "marker").write_text("m")
    host_target = c.base / "host-target"
    host_target.mkdir()
    c.attach("ln", "-s", str(host_target), "/mnt/evil")  # absolute host path, inside the container
    dev = {"type": "disk", "source": str(src), "path": "/mnt/evil/x"}
    # the link dangles inside the container: refused, and nothing appears on the host
    with pytest.raises(BadRequest, match="not a directory"):
        apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "s": dev}))
    assert list(host_target.iterdir()) == []
    # once it resolves inside the container, the mount lands there, still not on the host
    c.attach("mkdir", "-p", str(host_target))
    apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "s": dev}))
    assert list(host_target.iterdir()) == []
    assert c.attach("cat", "/mnt/evil/x/marker").stdout == "m"
    assert c.attach("cat", f"{host_target}/x/marker").stdout == "m"
    apply(c, ({}, {**ROOT, "s": dev}), ({}, dict(ROOT)))


def test_recursive_and_propagation(running):
    c = running
    src = c.base / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "later").mkdir()
    sub_src = c.base / "subsrc"
    sub_src.mkdir()
    (sub_src / "inner").write_text("inner\n")
    undo = []
    try:
        # a shared source tree with a submount
        for cmd in (["mount", "--bind", str(src), str(src)], ["mount", "--make-shared", str(src)],
                    ["mount", "--bind", str(sub_src), str(src / "sub")]):
            subprocess.run(cmd, check=True)
            undo.insert(0, cmd[-1])
        dev = {"type": "disk", "source": str(src), "path": "/mnt/tree", "recursive": "true", "propagation": "rslave"}
        apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "t": dev}))
        assert c.attach("cat", "/mnt/tree/sub/inner").stdout == "inner\n"  # recursive
        info = [line for line in c.attach("cat", "/proc/self/mountinfo").stdout.splitlines()
                if line.split()[4] == "/mnt/tree"]
        assert info and "master:" in info[0]
        # a mount made on the host later propagates into the container (slave)
        subprocess.run(["mount", "--bind", str(sub_src), str(src / "later")], check=True)
        undo.insert(0, str(src / "later"))
        assert c.attach("cat", "/mnt/tree/later/inner").stdout == "inner\n"
        apply(c, ({}, {**ROOT, "t": dev}), ({}, dict(ROOT)))
        assert not mounted(c, "/mnt/tree")
    finally:
        for target in undo:
            subprocess.run(["umount", "-l", target], check=False)


def test_unix_char_hotplug(running):
    c = running
    dev = {"type": "unix-char", "path": "/dev/hotnull", "major": "1", "minor": "3", "mode": "0666"}
    apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "n": dev}))
    out = c.attach("sh", "-c", "ls -l /dev/hotnull; echo x > /dev/hotnull && echo ok").stdout
    assert out.startswith("crw-rw-rw-") and out.endswith("ok\n")
    apply(c, ({}, {**ROOT, "n": dev}), ({}, dict(ROOT)))
    assert c.attach("ls", "/dev/hotnull", check=False).returncode != 0
    assert not (c.lxcpath / c.name / "devices" / "unix.n.dev-hotnull").exists()


def test_missing_source(running):
    c = running
    dev = {"type": "disk", "source": str(c.base / "nope"), "path": "/mnt/nope"}
    with pytest.raises(BadRequest, match="Missing source path"):
        apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "x": dev}))
    apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "x": {**dev, "optional": "true"}}))  # no error
    assert not mounted(c, "/mnt/nope")


def test_shifted_disk_hotplug(running):
    from lxd_daemon.runtime.hotplug import idmapped_mounts_supported

    c = running
    src = c.base / "shifted"
    src.mkdir()
    (src / "f").write_text("root-owned on the host\n")
    if not idmapped_mounts_supported(src):
        pytest.skip("idmapped mounts are not supported here")
    dev = {"type": "disk", "source": str(src), "path": "/mnt/shifted", "shift": "true"}
    apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "sh": dev}))
    assert c.attach("stat", "-c", "%u:%g", "/mnt/shifted/f").stdout.strip() == "0:0"
    c.attach("sh", "-c", "echo more >> /mnt/shifted/f && touch /mnt/shifted/new")
    st = (src / "new").stat()
    assert (st.st_uid, st.st_gid) == (0, 0)  # container root wrote host root's ids
    apply(c, ({}, {**ROOT, "sh": dev}), ({}, dict(ROOT)))
    assert not mounted(c, "/mnt/shifted")


def test_privileged_unix_hotplug_opens_the_device_cgroup(worker_pool):
    with started_raw_container("hpp", privileged=True, config={"security.privileged": "true"}) as c:
        probe = "mknod /dev/probe c 10 237 2>/dev/null; dd if=/dev/probe count=0 2>/dev/null && echo open || echo denied"
        assert c.attach("sh", "-c", probe).stdout.strip() == "denied"  # not in the default allow list
        dev = {"type": "unix-char", "path": "/dev/lc", "major": "10", "minor": "237"}
        apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "lc": dev}))
        assert c.attach("sh", "-c", "dd if=/dev/lc count=0 2>/dev/null && echo open").stdout.strip() == "open"
        apply(c, ({}, {**ROOT, "lc": dev}), ({}, dict(ROOT)))
        assert c.attach("sh", "-c", probe).stdout.strip() == "denied"


def test_failed_change_is_rolled_back(running):
    c = running
    a = c.base / "roll-a"
    a.mkdir()
    (a / "f").write_text("a\n")
    dev_a = {"type": "disk", "source": str(a), "path": "/mnt/roll-a"}
    apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "a": dev_a}))
    # remove a, add b (fine) and c (source missing): the whole change is undone
    b = c.base / "roll-b"
    b.mkdir()
    new = {**ROOT, "b": {"type": "disk", "source": str(b), "path": "/mnt/roll-b"},
           "c": {"type": "disk", "source": str(c.base / "missing"), "path": "/mnt/roll-c"}}
    with pytest.raises(BadRequest, match="Missing source path"):
        apply(c, ({}, {**ROOT, "a": dev_a}), ({}, new))
    assert c.attach("cat", "/mnt/roll-a/f").stdout == "a\n"
    assert not mounted(c, "/mnt/roll-b")
    apply(c, ({}, {**ROOT, "a": dev_a}), ({}, dict(ROOT)))


def test_unix_block_hotplug(running):
    c = running
    dev = {"type": "unix-block", "path": "/dev/myloop", "major": "7", "minor": "200", "uid": "1000", "gid": "1000",
           "mode": "0640"}
    apply(c, ({}, dict(ROOT)), ({}, {**ROOT, "b": dev}))
    assert c.attach("stat", "-c", "%F %t:%T %u:%g %a", "/dev/myloop").stdout.strip() == \
        "block special file 7:c8 1000:1000 640"
    apply(c, ({}, {**ROOT, "b": dev}), ({}, dict(ROOT)))
    assert c.attach("ls", "/dev/myloop", check=False).returncode != 0
