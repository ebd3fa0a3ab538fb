"""Instance backups and imports through the stock client and the API: `lxc export` / `lxc import`
round trips (with snapshots, --instance-only, each compression), the backup objects, backup.yaml,
and refused tarballs (corrupt, truncated, escaping paths) leaving nothing behind."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import yaml

from lxd_daemon.backups.config import parse_backup_yaml, parse_index_yaml, render_backup_yaml
from tests.helpers import wait_for, wait_op

pytestmark = pytest.mark.integration


# -- backup.yaml / index.yaml (no daemon) ---------------------------------------------------------
def test_backup_yaml_round_trip_and_field_names():
    inst = {"name": "c1", "architecture": "x86_64", "config": {"limits.cpu": "1"}, "devices": {},
            "profiles": ["default"], "ephemeral": False, "stateful": False, "description": "",
            "created_at": "2026-01-01T00:00:00Z", "type": "container", "state": {"x": 1}}
    snaps = [{"name": "c1/snap0", "config": {}, "devices": {}, "created_at": "2026-01-01T00:00:00Z"}]
    text = render_backup_yaml(inst, snaps, {"name": "default", "driver": "dir", "config": {}},
                              {"name": "c1", "type": "container", "config": {}}, [{"name": "snap0"}],
                              profiles=[{"name": "default", "config": {}, "devices": {}}])
    raw = yaml.safe_load(text)
    assert list(raw) == ["container", "snapshots", "pool", "profiles", "volume", "volume_snapshots"]
    assert "state" not in raw["container"]
    assert raw["snapshots"][0]["name"] == "snap0"  # LXD keeps the short name
    cfg = parse_backup_yaml(text)
    assert cfg.instance["name"] == "c1" and cfg.snapshots[0]["name"] == "snap0"
    assert cfg.pool["driver"] == "dir" and cfg.volume["name"] == "c1" and cfg.profiles[0]["name"] == "default"


@pytest.mark.parametrize("text,words", [
    ("container: [1]", "'container' must be a map"),
    ("container: {name: 'a b'}", "invalid instance name"),
    ("container: {name: c1}\nsnapshots: [{name: ''}]", "invalid snapshot name"),
    ("container: {name: c1, config: [1]}", "container.config must be a map"),
    ("a: [", "not valid YAML"),
])
def test_backup_yaml_refuses_bad_input(text, words):
    with pytest.raises(ValueError, match=words):
        parse_backup_yaml(text)


def test_index_yaml_defaults_and_checks():
    idx = parse_index_yaml("name: c1\nbackend: btrfs\npool: p\nsnapshots: [s0]\n")
    assert (idx.type, idx.optimized, idx.optimized_header, idx.snapshots) == ("container", False, False, ["s0"])
    for bad in ("name: ../x", "name: c1\ntype: weird", "name: c1\nsnapshots: [a/b/c]"):
        with pytest.raises(ValueError):
            parse_index_yaml(bad)


# -- through the daemon ---------------------------------------------------------------------------
def _acl_entry(tag: int, perm: int, uid: int = 0xFFFFFFFF) -> bytes:
    import struct

    return struct.pack("<HHI", tag, perm, uid)


# user::rw- user:1000200:r-x group::r-- mask::r-x other::r-- (the kernel's binary form)
ACL = (b"\x02\x00\x00\x00" + _acl_entry(1, 6) + _acl_entry(2, 5, 1000200) + _acl_entry(4, 4)
       + _acl_entry(0x10, 5) + _acl_entry(0x20, 4))


def _exec(d, name, cmd):
    return d.lxc("exec", name, "--", "sh", "-c", cmd)


def _volume(d, name) -> Path:
    return d.lxd_dir / "storage-pools" / "default" / "containers" / name


def _leftovers(d) -> list[str]:
    root = d.lxd_dir / "backups"
    return [e for e in os.listdir(root) if e.startswith(".")] if root.is_dir() else []


def test_export_import_round_trip_with_snapshots(ready, names, tmp_path):
    d = ready
    c1, c2 = names("src"), names("dst")
    d.lxc("init", "busybox", c1, "-c", "user.note=kept")
    vol = _volume(d, c1)
    (vol / "rootfs" / "marker").write_text("one")
    os.chown(vol / "rootfs" / "marker", 1000123, 1000456)
    d.lxc("snapshot", c1, "snap0")
    (vol / "rootfs" / "marker").write_text("two")
    os.setxattr(vol / "rootfs" / "marker", "user.test", b"x1")
    os.setxattr(vol / "rootfs" / "marker", "system.posix_acl_access", ACL)
    (vol / "rootfs" / "dev").mkdir(exist_ok=True)
    os.mknod(vol / "rootfs" / "dev" / "mynull", 0o20666, os.makedev(1, 3))
    # backup.yaml at the top of the volume, next to rootfs/, written by the daemon.
    # (refreshed in the background after a snapshot)
    wait_for(lambda: [s["name"] for s in parse_backup_yaml((vol / "backup.yaml").read_text()).snapshots] == ["snap0"])
    assert parse_backup_yaml((vol / "backup.yaml").read_text()).instance["name"] == c1
    out = tmp_path / "c1.tar.gz"
    d.lxc("export", c1, str(out))
    with tarfile.open(out) as tf:
        members = tf.getnames()
        idx = parse_index_yaml(tf.extractfile("backup/index.yaml").read())
    assert members[0] == "backup/index.yaml"
    assert "backup/container/rootfs/marker" in members and "backup/snapshots/snap0/rootfs/marker" in members
    assert members.count("backup/container/backup.yaml") == 1  # written fresh, the volume's left out
    assert idx.name == c1 and idx.snapshots == ["snap0"] and idx.backend == "dir" and not idx.optimized
    assert idx.config.instance["config"]["user.note"] == "kept"
    # the export's backup object is gone again (the client deletes it)
    assert d.api("GET", f"/1.0/instances/{c1}/backups").json()["metadata"] == []
    d.lxc("import", str(out), c2)
    v2 = _volume(d, c2)
    st = os.lstat(v2 / "rootfs" / "marker")
    assert (v2 / "rootfs" / "marker").read_text() == "two" and (st.st_uid, st.st_gid) == (1000123, 1000456)
    assert os.getxattr(v2 / "rootfs" / "marker", "user.test") == b"x1"
    assert os.getxattr(v2 / "rootfs" / "marker", "system.posix_acl_access") == ACL
    dev = os.lstat(v2 / "rootfs" / "dev" / "mynull")
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    snap = d.lxd_dir / "storage-pools" / "default" / "containers-snapshots" / c2 / "snap0"
    assert (snap / "rootfs" / "marker").read_text() == "one"
    info = d.api("GET", f"/1.0/instances/{c2}").json()["metadata"]
    assert info["config"]["user.note"] == "kept"
    snaps = d.api("GET", f"/1.0/instances/{c2}/snapshots").json()["metadata"]
    assert snaps == [f"/1.0/instances/{c2}/snapshots/snap0"]
    assert parse_backup_yaml((v2 / "backup.yaml").read_text()).instance["name"] == c2
    d.lxc("start", c2)
    assert _exec(d, c2, "cat /marker").stdout == "two"
    # a running container exports too (as LXD: no freeze on dir)
    _exec(d, c2, "echo three > /marker")
    running = tmp_path / "running.tar.gz"
    d.lxc("export", c2, str(running), "--instance-only")
    with tarfile.open(running) as tf:
        assert tf.extractfile("backup/container/rootfs/marker").read() == b"three\n"
        assert parse_index_yaml(tf.extractfile("backup/index.yaml").read()).snapshots == []
    assert not _leftovers(d)
    # name collision
    r = d.lxc("import", str(out), c2, check=False)
    assert r.returncode != 0 and "already exists" in (r.stderr + r.stdout)
    assert not _leftovers(d)


def test_backup_objects_instance_only_and_compression(ready, names):
    d = ready
    c = names("objs")
    d.lxc("init", "busybox", c)
    d.lxc("snapshot", c, "s0")
    for algo, magic in (("none", None), ("xz", b"\xfd7zXZ"), ("zstd", b"\x28\xb5\x2f\xfd"), ("bzip2", b"BZh")):
        r = d.api("POST", f"/1.0/instances/{c}/backups",
                  json={"name": f"b-{algo}", "instance_only": True, "compression_algorithm": algo})
        op = wait_op(d, r)
        assert op["status"] == "Success", op
        assert op["resources"]["backups"] == [f"b-{algo}"]
        data = d.api("GET", f"/1.0/instances/{c}/backups/b-{algo}/export").content
        if magic:
            assert data.startswith(magic)
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                names_ = tf.getnames()
                idx = parse_index_yaml(tf.extractfile("backup/index.yaml").read())
            assert idx.snapshots == [] and not any(n.startswith("backup/snapshots") for n in names_)
    lst = d.api("GET", f"/1.0/instances/{c}/backups?recursion=1").json()["metadata"]
    assert {b["name"] for b in lst} == {"b-none", "b-xz", "b-zstd", "b-bzip2"}
    assert all(b["instance_only"] for b in lst)
    r = d.api("POST", f"/1.0/instances/{c}/backups", json={"name": "b-none"})
    assert r.status_code == 409
    # the server's default (backups.compression_algorithm) when the request names none
    assert d.api("PATCH", "/1.0", json={"config": {"backups.compression_algorithm": "zstd"}}).status_code == 200
    try:
        assert wait_op(d, d.api("POST", f"/1.0/instances/{c}/backups", json={"name": "dflt"}))["status"] == "Success"
        assert d.api("GET", f"/1.0/instances/{c}/backups/dflt/export").content[:4] == b"\x28\xb5\x2f\xfd"
    finally:
        d.api("PATCH", "/1.0", json={"config": {"backups.compression_algorithm": ""}})
    assert wait_op(d, d.api("DELETE", f"/1.0/instances/{c}/backups/dflt"))["status"] == "Success"
    r = d.api("POST", f"/1.0/instances/{c}/backups", json={"compression_algorithm": "lz9"})
    assert r.status_code == 400 and "lz9" in r.json()["error"]
    assert wait_op(d, d.api("POST", f"/1.0/instances/{c}/backups/b-xz", json={"name": "b-renamed"}))["status"] == "Success"
    assert d.api("GET", f"/1.0/instances/{c}/backups/b-renamed").json()["metadata"]["name"] == "b-renamed"
    assert d.api("GET", f"/1.0/instances/{c}/backups/b-xz").status_code == 404
    # an expired backup is deleted by the expiry pass
    r = d.api("POST", f"/1.0/instances/{c}/backups", json={"name": "old", "expires_at": "2001-01-01T00:00:00Z"})
    assert wait_op(d, r)["status"] == "Success"
    r = d.api("POST", "/internal/backups/expire")
    assert r.status_code == 200 and f"{c}/old" in r.json()["metadata"]
    assert d.api("GET", f"/1.0/instances/{c}/backups/old").status_code == 404
    for b in ("b-none", "b-renamed", "b-zstd", "b-bzip2"):
        assert wait_op(d, d.api("DELETE", f"/1.0/instances/{c}/backups/{b}"))["status"] == "Success"
    assert d.api("GET", f"/1.0/containers/{c}/backups").json()["metadata"] == []
    # the files of a deleted instance's backups go with it
    assert wait_op(d, d.api("POST", f"/1.0/instances/{c}/backups", json={"name": "keep-" + c}))["status"] == "Success"
    files = lambda: [f for _, _, fs in os.walk(d.lxd_dir / "backups" / "instances") for f in fs]  # noqa: E731
    assert "keep-" + c in files()
    d.lxc("delete", c)
    assert d.api("POST", "/internal/backups/expire").status_code == 200
    assert "keep-" + c not in files()


# -- bad tarballs ---------------------------------------------------------------------------------
def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    raw = buf.getvalue()
    return gzip.compress(raw) if compress else raw


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _entry(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.linkname = link
    if kind == tarfile.DIRTYPE:
        t.mode = 0o755
    if kind == tarfile.CHRTYPE:
        t.devmajor, t.devminor = 1, 3
    return t, None


def _good_members(name: str) -> list:
    idx = yaml.safe_dump({"name": name, "backend": "dir", "pool": "default", "optimized": False,
                          "optimized_header": False, "type": "container",
                          "config": {"container": {"name": name, "architecture": "x86_64", "config": {},
                                                   "devices": {}, "profiles": ["default"]}}}).encode()
    return [_file("backup/index.yaml", idx), _entry("backup/container", tarfile.DIRTYPE),
            _entry("backup/container/rootfs", tarfile.DIRTYPE), _file("backup/container/rootfs/hello", b"hi")]


BAD = {
    "dotdot": ([_file("backup/container/rootfs/../../../../x")], "'..' component"),
    "absolute": ([_file("/etc/evil")], "absolute member name"),
    "through-symlink": ([_entry("backup/container/rootfs/l", tarfile.SYMTYPE, "/etc"),
                         _file("backup/container/rootfs/l/passwd")], "under the symbolic link"),
    "hardlink-out": ([_entry("backup/container/rootfs/h", tarfile.LNKTYPE, "etc/passwd")], "points outside"),
    "hardlink-dotdot": ([_entry("backup/container/rootfs/h", tarfile.LNKTYPE, "backup/container/../../x")],
                        "'..' component"),
    "device-outside": ([_entry("backup/container/null", tarfile.CHRTYPE)], "outside the root filesystem"),
    "outside-backup": ([_file("other/file")], "outside backup/"),
    "rootfs-symlink": ([_entry("backup/container/templates", tarfile.SYMTYPE, "/")], "is a symbolic link"),
    "tree-not-dir": ([_file("backup/snapshots/s9")], "must be a directory"),
}


def _import_raw(d, data: bytes, name: str):
    with d.http(timeout=120) as c:
        return c.post("/1.0/instances", content=data,
                      headers={"Content-Type": "application/octet-stream", "X-LXD-name": name})


@pytest.mark.parametrize("case", sorted(BAD))
def test_escaping_tarballs_are_refused(ready, names, case):
    d = ready
    n = names("bad")
    extra, words = BAD[case]
    data = _tar(_good_members(n) + extra)
    r = _import_raw(d, data, n)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]
    assert d.api("GET", f"/1.0/instances/{n}").status_code == 404
    assert not _volume(d, n).exists() and not _leftovers(d)
    assert not Path("/etc/evil").exists()


def test_corrupt_and_truncated_tarballs_are_refused(ready, names):
    d = ready
    n = names("trunc")
    good = _tar(_good_members(n) + [_file("backup/container/rootfs/big", os.urandom(300000))])
    for data, words in ((good[: len(good) // 2], "truncated or corrupt"),
                        (b"\x1f\x8b" + b"garbage" * 100, "corrupt"),
                        (b"not a tarball at all" * 50, "not a tarball"),
                        (_tar([_file("backup/container/rootfs/x")]), "index.yaml is missing")):
        r = _import_raw(d, data, n)
        assert r.status_code == 400 and words in r.json()["error"], r.text
        assert d.api("GET", f"/1.0/instances/{n}").status_code == 404
        assert not _volume(d, n).exists() and not _leftovers(d)
    # the good one imports (the checks are not just refusing everything)
    r = _import_raw(d, good, n)
    assert r.status_code == 202, r.text
    assert wait_op(d, r)["status"] == "Success"
    assert (_volume(d, n) / "rootfs" / "hello").read_text() == "hi"


def test_lxc_import_of_a_corrupt_file_says_why(ready, names, tmp_path):
    d = ready
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 64)
    r = d.lxc("import", str(bad), names("x"), check=False)
    assert r.returncode != 0 and "Invalid backup" in (r.stderr + r.stdout)
    assert not _leftovers(d)


# -- btrfs: optimised backups (send streams) and generic ones between drivers ----------------------

def test_btrfs_optimized_export_import_and_to_dir(ready, names, btrfs_pool, tmp_path):
    d = ready
    c1, c2, c3 = names("bo"), names("bo2"), names("bo3")
    d.lxc("init", "busybox", c1, "-s", btrfs_pool)
    vol = d.lxd_dir / "storage-pools" / btrfs_pool / "containers" / c1
    (vol / "rootfs" / "marker").write_text("snap")
    d.lxc("snapshot", c1, "s0")
    (vol / "rootfs" / "marker").write_text("live")
    opt = tmp_path / "opt.tar.gz"
    d.lxc("export", c1, str(opt), "--optimized-storage")
    with tarfile.open(opt) as tf:
        members = tf.getnames()
        idx = parse_index_yaml(tf.extractfile("backup/index.yaml").read())
    assert idx.optimized and idx.optimized_header and idx.backend == "btrfs" and idx.snapshots == ["s0"]
    assert {"backup/container.bin", "backup/snapshots/s0.bin", "backup/optimized_header.yaml"} <= set(members)
    d.lxc("import", str(opt), c2, "--storage", btrfs_pool)
    v2 = d.lxd_dir / "storage-pools" / btrfs_pool / "containers" / c2
    assert (v2 / "rootfs" / "marker").read_text() == "live"
    s2 = d.lxd_dir / "storage-pools" / btrfs_pool / "containers-snapshots" / c2 / "s0" / "rootfs" / "marker"
    assert s2.read_text() == "snap"
    assert parse_backup_yaml((v2 / "backup.yaml").read_text()).instance["name"] == c2
    # truncated: refused, nothing left (no half-received volume)
    data = opt.read_bytes()
    bad = _import_raw(d, data[: len(data) * 2 // 3], c3)
    assert bad.status_code == 400 and "truncated or corrupt" in bad.json()["error"], bad.text
    pool_dir = d.lxd_dir / "storage-pools" / btrfs_pool / "containers"
    assert not [e for e in os.listdir(pool_dir) if e.startswith(".") or e == c3]
    assert d.api("GET", f"/1.0/instances/{c3}").status_code == 404
    # an optimised btrfs backup can't go to a dir pool; a generic one can
    r = d.lxc("import", str(opt), c3, "--storage", "default", check=False)
    assert r.returncode != 0 and "can only be imported into a btrfs storage pool" in (r.stderr + r.stdout)
    gen = tmp_path / "gen.tar.gz"
    d.lxc("export", c1, str(gen))
    d.lxc("import", str(gen), c3, "--storage", "default")
    assert (_volume(d, c3) / "rootfs" / "marker").read_text() == "live"
    dev = d.api("GET", f"/1.0/instances/{c3}").json()["metadata"]["expanded_devices"]["root"]
    assert dev["pool"] == "default"
    d.lxc("start", c2)
    assert _exec(d, c2, "cat /marker").stdout == "live"
    d.lxc("stop", "-f", c2)
    assert not _leftovers(d)


# -- custom volumes -------------------------------------------------------------------------------
@pytest.mark.parametrize("pool_kind", ["dir", "btrfs"])
def test_custom_volume_export_import(ready, btrfs_pool, tmp_path, pool_kind):
    from tests.helpers import run_prefix

    d = ready
    pool = "default" if pool_kind == "dir" else btrfs_pool
    v, v2 = run_prefix() + "v", run_prefix() + "w"
    d.lxc("storage", "volume", "create", pool, v)
    try:
        path = d.lxd_dir / "storage-pools" / pool / "custom" / f"default_{v}"
        (path / "data").write_text("first")
        os.chown(path / "data", 1000007, 1000007)
        d.lxc("storage", "volume", "snapshot", pool, v, "vs0")
        (path / "data").write_text("second")
        out = tmp_path / "vol.tar.gz"
        args = ["--optimized-storage"] if pool_kind == "btrfs" else []
        d.lxc("storage", "volume", "export", pool, v, str(out), *args)
        with tarfile.open(out) as tf:
            members = tf.getnames()
            idx = parse_index_yaml(tf.extractfile("backup/index.yaml").read())
        assert idx.type == "custom" and idx.snapshots == ["vs0"]
        if pool_kind == "dir":
            assert "backup/volume/data" in members and "backup/volume-snapshots/vs0/data" in members
        else:
            assert "backup/volume.bin" in members and "backup/volume-snapshots/vs0.bin" in members
        assert d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v}/backups").json()["metadata"] == []
        d.lxc("storage", "volume", "import", pool, str(out), v2)
        p2 = d.lxd_dir / "storage-pools" / pool / "custom" / f"default_{v2}"
        assert (p2 / "data").read_text() == "second" and os.stat(p2 / "data").st_uid == 1000007
        snaps = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v2}/snapshots").json()["metadata"]
        assert [s.rsplit("/", 1)[-1] for s in snaps] == ["vs0"]
        sdir = d.lxd_dir / "storage-pools" / pool / "custom-snapshots" / f"default_{v2}" / "vs0"
        assert (sdir / "data").read_text() == "first"
        r = d.lxc("storage", "volume", "import", pool, str(out), v2, check=False)
        assert r.returncode != 0 and "already exists" in (r.stderr + r.stdout)
        # a backup object through the API, renamed and deleted
        r = d.api("POST", f"/1.0/storage-pools/{pool}/volumes/custom/{v}/backups", json={"name": "b0"})
        assert wait_op(d, r)["status"] == "Success"
        got = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v}/backups?recursion=1").json()["metadata"]
        assert [b["name"] for b in got] == ["b0"] and got[0]["volume_only"] is False
        assert d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v}/backups/b0/export").content[:2] == b"\x1f\x8b"
        r = d.api("DELETE", f"/1.0/storage-pools/{pool}/volumes/custom/{v}/backups/b0")
        assert wait_op(d, r)["status"] == "Success"
        assert not _leftovers(d)
    finally:
        d.lxc("storage", "volume", "delete", pool, v2, check=False)
        d.lxc("storage", "volume", "delete", pool, v, check=False)


def test_custom_volume_import_refuses_instance_backups_and_bad_files(ready, names, tmp_path):
    from tests.helpers import run_prefix

    d = ready
    n = names("cv")
    data = _tar(_good_members(n))
    with d.http() as c:
        r = c.post("/1.0/storage-pools/default/volumes/custom", content=data,
                   headers={"Content-Type": "application/octet-stream", "X-LXD-name": run_prefix()})
    assert r.status_code == 400 and "not of a custom volume" in r.json()["error"]
    with d.http() as c:
        r = c.post("/1.0/storage-pools/default/volumes/custom", content=b"junk" * 300,
                   headers={"Content-Type": "application/octet-stream", "X-LXD-name": run_prefix()})
    assert r.status_code == 400 and "not a tarball" in r.json()["error"]
    assert not _leftovers(d)


# -- crash safety ---------------------------------------------------------------------------------
def test_kill_during_import_leaves_nothing(fresh_daemon, tmp_path):
    import signal
    import time

    d = fresh_daemon
    d.start()
    d.lxd("init", "--auto")
    n = "crashy"
    members = _good_members(n)
    members.insert(2, _entry("backup/snapshots", tarfile.DIRTYPE))
    members.insert(3, _entry("backup/snapshots/s0", tarfile.DIRTYPE))
    members.insert(4, _file("backup/snapshots/s0/big", b"\0" * (16 << 20)))
    members.append(_file("backup/container/rootfs/big", b"\0" * (128 << 20)))
    idx = yaml.safe_load(members[0][1])
    idx["snapshots"] = ["s0"]
    members[0] = _file("backup/index.yaml", yaml.safe_dump(idx).encode())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    blob = gzip.compress(buf.getvalue(), compresslevel=1)
    vol = d.lxd_dir / "storage-pools" / "default" / "containers" / n
    r = _import_raw(d, blob, n)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while not vol.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert vol.exists()
    d.stop(signal.SIGKILL)
    d.start()
    assert d.api("GET", f"/1.0/instances/{n}").status_code == 404
    assert not vol.exists()
    assert not (d.lxd_dir / "storage-pools" / "default" / "containers-snapshots" / n).exists()
    assert [e for e in os.listdir(d.lxd_dir / "storage-pools" / "default" / "containers")] == []
    assert not _leftovers(d)
    # and the same import, left alone, completes
    r = _import_raw(d, blob, n)
    assert wait_op(d, r, timeout=120)["status"] == "Success"
    assert (vol / "rootfs" / "hello").read_text() == "hi"


def test_full_instance_render_lists_backups(ready, names):
    d = ready
    c = names("full")
    d.lxc("init", "busybox", c)
    wait_op(d, d.api("POST", f"/1.0/instances/{c}/backups", json={"name": "b0", "instance_only": True}))
    full = d.api("GET", f"/1.0/instances/{c}?recursion=1").json()["metadata"]
    assert [b["name"] for b in full["backups"]] == ["b0"] and full["backups"][0]["instance_only"] is True
    listed = [i for i in d.api("GET", "/1.0/instances?recursion=2").json()["metadata"] if i["name"] == c]
    assert [b["name"] for b in listed[0]["backups"]] == ["b0"]
