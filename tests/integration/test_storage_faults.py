"""Storage faults through the stock client and the API (issue 9, "Bad input and faults"):
pools on a path already in use, on a missing device or directory, on a block device holding a
filesystem; a full btrfs pool on a small loop file and a full dir pool on a small tmpfs; and
`lxc export` from the shared daemon then `lxc import` into a fresh daemon on a dir and on a btrfs
pool.

Each refused change answers 4xx (507 for a lack of space) naming the problem and leaves nothing
behind: no pool or volume record, no loop device, no mount, no directory or loop file. On a full
btrfs pool, what is copy-on-write (snapshot, copy within the pool, an empty volume) needs no data
space and works, as in LXD; what writes data (file push, import, copy from another pool) is
refused. Once the space is freed everything works again."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_prefix

pytestmark = pytest.mark.integration


# -- host state ------------------------------------------------------------------------------------
def _loops() -> set[str]:
    out = subprocess.run(["losetup", "-a", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def _host_state(d) -> tuple:
    pools = d.lxd_dir / "storage-pools"
    disks = d.lxd_dir / "disks"
    # (other daemons on this host come and go: only what is this daemon's counts)
    mine = str(d.lxd_dir) + "/"
    return ({x for x in _loops() if mine in x}, {x for x in _mounts() if x.startswith(mine)},
            sorted(os.listdir(pools)) if pools.is_dir() else [],
            sorted(os.listdir(disks)) if disks.is_dir() else [])


def _error(r) -> str:
    doc = r.json()
    assert doc["type"] == "error" and doc["error_code"] == r.status_code, doc
    return doc["error"]


def _create_pool(d, name: str, driver: str, **config):
    return d.api("POST", "/1.0/storage-pools", json={"name": name, "driver": driver, "config": config})


@contextlib.contextmanager
def _loop_device(path: Path, size_mb: int, mkfs: list[str] | None = None):
    """A loop device over a sparse file (with a filesystem when mkfs is given), detached after."""
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    if mkfs:
        subprocess.run([*mkfs, str(path)], check=True, capture_output=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(path)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def _umount(path: Path) -> None:
    if os.path.ismount(path):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- 1. pools on a path in use or missing --------------------------------------------------------------
def test_pool_on_a_path_in_use_or_missing_is_refused(ready, tmp_path):
    d = ready
    p = run_prefix()
    used = tmp_path / "used"
    used.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "somefile").write_text("x")
    first = f"{p}-a"
    r = _create_pool(d, first, "dir", source=str(used))
    assert r.status_code in (200, 201), r.text
    try:
        default_src = d.api("GET", "/1.0/storage-pools/default").json()["metadata"]["config"]["source"]
        before = _host_state(d)
        cases = [
            # (driver, source, words the message must hold)
            ("dir", str(used), ["already used by storage pool", first]),
            ("dir", default_src, ["already used by storage pool", "default"]),
            ("dir", str(used / "inner"), ["inside the source of storage pool", first]),
            ("dir", str(d.lxd_dir), ["within the LXD directory"]),
            ("dir", str(Path(default_src) / "custom"), ["within the LXD directory"]),
            ("dir", str(full), ["isn't empty"]),
            ("dir", str(tmp_path / "missing"), [str(tmp_path / "missing"), "doesn't exist"]),
            ("dir", str(full / "somefile"), ["not a directory"]),
            ("btrfs", "/dev/" + p + "-nodisk", ["/dev/" + p + "-nodisk", "doesn't exist"]),
            ("btrfs", "/nonexistent/" + p, ["/nonexistent/" + p, "no such directory"]),
            ("btrfs", str(used), ["already used by storage pool", first]),
        ]
        for i, (driver, source, words) in enumerate(cases):
            name = f"{p}-{i}"
            r = _create_pool(d, name, driver, source=source)
            assert r.status_code == 400, (source, r.text)
            msg = _error(r)
            for w in words:
                assert w in msg, (source, msg)
            assert d.api("GET", f"/1.0/storage-pools/{name}").status_code == 404
            assert _host_state(d) == before, source
        # the stock client shows the same message
        r = d.lxc("storage", "create", f"{p}-cli", "dir", f"source={full}", check=False)
        assert r.returncode != 0 and f"Source path {str(full)!r} isn't empty" in r.stderr.replace('"', "'"), r.stderr
        assert (full / "somefile").read_text() == "x" and os.listdir(used) != []
        assert _host_state(d) == before
    finally:
        d.lxc("storage", "delete", first, check=False)
    assert os.listdir(used) == []  # the pool's layout went with it, the directory stays


def test_btrfs_pool_on_a_block_device_holding_a_filesystem_is_refused(ready, tmp_path):
    d = ready
    p = run_prefix()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _loop_device(tmp_path / "ext4.img", 64, ["mkfs.ext4", "-q", "-F"]) as dev:
        before = _host_state(d)
        # unmounted, but holding an ext4 filesystem: never formatted over
        r = _create_pool(d, f"{p}-ext4", "btrfs", source=dev)
        assert r.status_code == 400, r.text
        msg = _error(r)
        assert dev in msg and "ext4" in msg, msg
        assert _host_state(d) == before
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            (mnt / "data").write_text("mine")
            before = _host_state(d)
            r = d.lxc("storage", "create", f"{p}-busy", "btrfs", f"source={dev}", check=False)
            assert r.returncode != 0 and dev in r.stderr and "in use" in r.stderr, r.stderr
            assert d.api("GET", f"/1.0/storage-pools/{p}-busy").status_code == 404
            assert _host_state(d) == before
            assert (mnt / "data").read_text() == "mine"
        finally:
            _umount(mnt)
        res = subprocess.run(["blkid", "-p", "-s", "TYPE", "-o", "value", dev], capture_output=True, text=True)
        assert res.stdout.strip() == "ext4"


# -- 2. a full pool ------------------------------------------------------------------------------------
def _pool_state(d, pool: str) -> tuple:
    """What is on the pool: its subvolumes and directories per type, its volume records, the
    instances and the backups' work area."""
    mount = d.lxd_dir / "storage-pools" / pool
    on_disk = sorted(f"{sub}/{e}" for sub in os.listdir(mount) if (mount / sub).is_dir()
                     for e in os.listdir(mount / sub))
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(mount)], capture_output=True, text=True).stdout
    subvols = [line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line]
    vols = sorted(d.api("GET", f"/1.0/storage-pools/{pool}/volumes").json()["metadata"])
    insts = sorted(d.api("GET", "/1.0/instances").json()["metadata"])
    backups = d.lxd_dir / "backups"
    work = sorted(e for e in os.listdir(backups) if e.startswith(".")) if backups.is_dir() else []
    return on_disk, sorted(x.strip() for x in subvols), vols, insts, work


def _push(d, name: str, path: str, data: bytes):
    return d.api("POST", f"/1.0/instances/{name}/files", params={"path": path}, content=data,
                 headers={"Content-Type": "application/octet-stream", "X-LXD-type": "file"})


def _healthy(d, *names: str) -> None:
    assert d.api("GET", "/1.0").status_code == 200
    listed = d.lxc("list", "--format", "csv", "-c", "n").stdout.split()
    assert set(names) <= set(listed), listed


@pytest.fixture
def full_pool(ready, tmp_path):
    """A btrfs pool on a 300MiB loop file (the smallest size worth testing), deleted after with
    whatever is on it."""
    d = ready
    pool = run_prefix() + "-full"
    d.lxc("storage", "create", pool, "btrfs", "size=300MiB")
    made: list[str] = []
    try:
        yield pool, made
    finally:
        for n in made:
            d.lxc("delete", "-f", n, check=False)
        for v in d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom").json().get("metadata") or []:
            d.lxc("storage", "volume", "delete", pool, v.rsplit("/", 1)[1], check=False)
        r = d.lxc("storage", "delete", pool, check=False)
        loop = d.lxd_dir / "disks" / f"{pool}.img"
        if r.returncode != 0 or loop.exists():  # never leave a mount or a loop device behind
            _umount(d.lxd_dir / "storage-pools" / pool)
            loop.unlink(missing_ok=True)
        assert r.returncode == 0, r.stderr


def test_full_btrfs_pool(ready, names, full_pool, tmp_path):
    d = ready
    pool, made = full_pool
    c, src, cow, imp, cp = (names(x) for x in ("full", "fsrc", "fcow", "fimp", "fcp"))
    made += [c, src, cow, imp, cp]
    # a container elsewhere (the shared pool) with 40 MB of data, and its export
    d.lxc("init", "busybox", src)
    (d.lxd_dir / "storage-pools" / "default" / "containers" / src / "rootfs" / "data").write_bytes(os.urandom(40 << 20))
    tarball = tmp_path / "src.tar.gz"
    d.lxc("export", src, str(tarball), "--instance-only", "--compression", "none")
    d.lxc("launch", "busybox", c, "-s", pool)
    r = d.lxc("exec", c, "--", "dd", "if=/dev/zero", "of=/filler", "bs=1M", check=False)
    assert r.returncode != 0 and "No space left" in r.stderr, r.stderr
    before = _pool_state(d, pool)

    # writes the daemon makes: 507 (or an error naming the lack of space), nothing half-made
    r = _push(d, c, "/big", os.urandom(8 << 20))
    assert r.status_code == 507 and "No space left" in _error(r), r.text
    assert d.lxc("exec", c, "--", "test", "-e", "/big", check=False).returncode == 1
    r = d.lxc("file", "push", "-q", str(tarball), f"{c}/big", check=False)
    assert r.returncode != 0 and "No space left" in r.stderr, r.stderr
    r = d.lxc("import", str(tarball), imp, "--storage", pool, check=False)
    assert r.returncode != 0 and "storage pool is full" in r.stderr, r.stderr
    r = d.lxc("copy", src, cp, "-s", pool, check=False)
    assert r.returncode != 0 and "No space left on the storage pool" in r.stderr, r.stderr
    assert _pool_state(d, pool) == before
    _healthy(d, c, src)

    # copy-on-write changes need no data space: they work, complete, on the full pool
    d.lxc("snapshot", c, "s1")
    d.lxc("copy", c, cow)
    d.lxc("storage", "volume", "create", pool, "v1")
    d.lxc("storage", "volume", "attach", pool, "v1", c, "/mnt/v1")
    r = d.lxc("exec", c, "--", "dd", "if=/dev/zero", "of=/mnt/v1/fill", "bs=1M", "count=20", check=False)
    assert r.returncode != 0 and "No space left" in r.stderr, r.stderr
    d.lxc("export", c, str(tmp_path / "full.tar.gz"), "--instance-only")
    after = _pool_state(d, pool)
    assert {f"containers-snapshots/{c}/s1", f"containers/{cow}", "custom/default_v1"} <= set(after[1]), after[1]
    assert d.api("GET", f"/1.0/instances/{c}/snapshots/s1").status_code == 200
    _healthy(d, c, cow)

    # once the filler (and what shares its blocks) is gone, the same writes work
    d.lxc("delete", cow)
    d.lxc("delete", f"{c}/s1")
    d.lxc("exec", c, "--", "rm", "/filler")
    mount = str(d.lxd_dir / "storage-pools" / pool)
    # btrfs frees a deleted subvolume's blocks in the background: wait for it
    subprocess.run(["btrfs", "filesystem", "sync", mount], check=True, capture_output=True)
    subprocess.run(["btrfs", "subvolume", "sync", mount], check=True, capture_output=True)
    subprocess.run(["btrfs", "filesystem", "sync", mount], check=True, capture_output=True)
    r = _push(d, c, "/big", b"x" * (8 << 20))
    assert r.status_code == 200, r.text
    d.lxc("import", str(tarball), imp, "--storage", pool)
    d.lxc("copy", src, cp, "-s", pool)
    for n in (imp, cp):
        data = d.lxd_dir / "storage-pools" / pool / "containers" / n / "rootfs" / "data"
        assert data.stat().st_size == 40 << 20
    _healthy(d, c, src, imp, cp)


# -- 3. export from one daemon, import into a fresh one -------------------------------------------
def _inside(d, name: str, cmd: str) -> str:
    return d.lxc("exec", name, "--", "sh", "-c", cmd).stdout


FILES_CMD = "cd /data && for f in f g sub sub/h link; do stat -c '%n %u %g %a %F' $f; done; cat f sub/h"


def test_export_then_import_into_a_fresh_daemon(ready, names, fresh_daemon, tmp_path):
    d = ready
    src = names("exp")
    share = tmp_path / "share"
    share.mkdir()
    d.lxc("launch", "busybox", src, "-c", "user.note=kept", "-c", "user.other=2")
    d.lxc("config", "device", "add", src, "extra", "disk", f"source={share}", "path=/mnt/extra")
    _inside(d, src, "mkdir -p /data/sub && echo one > /data/f && echo gee > /data/g && echo h > /data/sub/h"
                    " && ln -s f /data/link && chown 1234:5678 /data/f && chown 42:43 /data/sub"
                    " && chmod 640 /data/f && chmod 4751 /data/g && chmod 700 /data/sub")
    rootfs = d.lxd_dir / "storage-pools" / "default" / "containers" / src / "rootfs"
    os.setxattr(rootfs / "data" / "f", "user.test", b"x1")
    d.lxc("snapshot", src, "s0")
    _inside(d, src, "echo two > /data/f && chmod 604 /data/f")
    os.setxattr(rootfs / "data" / "sub" / "h", "user.more", b"y2")
    want_files = _inside(d, src, FILES_CMD)
    want_snap = (d.lxd_dir / "storage-pools" / "default" / "containers-snapshots" / src / "s0" / "rootfs"
                 / "data" / "f").read_text()
    want = d.api("GET", f"/1.0/instances/{src}").json()["metadata"]
    tarball = tmp_path / "exp.tar.gz"
    d.lxc("export", src, str(tarball))

    f = fresh_daemon.start()
    f.lxd("init", "--auto")
    bp = run_prefix() + "-bp"
    f.lxc("storage", "create", bp, "btrfs", "size=300MiB")
    made = []
    try:
        for pool, name in (("default", "onedir"), (bp, "onebtrfs")):
            f.lxc("import", str(tarball), name, "--storage", pool)
            made.append(name)
            got = f.api("GET", f"/1.0/instances/{name}").json()["metadata"]
            assert {k: v for k, v in got["config"].items() if k.startswith("user.")} == \
                {"user.note": "kept", "user.other": "2"}
            # (on another pool than the profile's, the instance gets a root disk of its own, as in LXD)
            assert {k: v for k, v in got["devices"].items() if k != "root" or pool == "default"} == want["devices"]
            assert got["profiles"] == want["profiles"] == ["default"]
            assert got["expanded_devices"]["root"]["pool"] == pool
            snaps = f.api("GET", f"/1.0/instances/{name}/snapshots").json()["metadata"]
            assert snaps == [f"/1.0/instances/{name}/snapshots/s0"]
            base = f.lxd_dir / "storage-pools" / pool
            assert (base / "containers-snapshots" / name / "s0" / "rootfs" / "data" / "f").read_text() == want_snap
            new_root = base / "containers" / name / "rootfs"
            assert os.getxattr(new_root / "data" / "f", "user.test") == b"x1"
            assert os.getxattr(new_root / "data" / "sub" / "h", "user.more") == b"y2"
            f.lxc("start", name)
            assert _inside(f, name, FILES_CMD) == want_files
        assert f.api("GET", "/1.0/images").json()["metadata"] == []  # the image was never needed
    finally:
        for name in made:
            f.lxc("delete", "-f", name, check=False)
        r = f.lxc("storage", "delete", bp, check=False)
        if r.returncode != 0:
            _umount(f.lxd_dir / "storage-pools" / bp)
        (f.lxd_dir / "disks" / f"{bp}.img").unlink(missing_ok=True)


def test_full_dir_pool(ready, names, tmp_path):
    """A dir pool whose source is a small tmpfs: snapshots and copies are real copies there."""
    d = ready
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(small)], check=True)
    pool = run_prefix() + "-dfull"
    c, c2 = names("dfull"), names("dfcp")

    def state() -> tuple:
        on_disk = sorted(f"{sub}/{e}" for sub in ("containers", "containers-snapshots", "custom")
                         for e in os.listdir(small / sub))
        vols = sorted(d.api("GET", f"/1.0/storage-pools/{pool}/volumes").json()["metadata"])
        return on_disk, vols, sorted(d.api("GET", "/1.0/instances").json()["metadata"])

    try:
        d.lxc("storage", "create", pool, "dir", f"source={small}")
        d.lxc("init", "busybox", c, "-s", pool)
        filler = small / "containers" / c / "rootfs" / "filler"
        r = subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True, text=True)
        assert r.returncode != 0 and "No space left" in r.stderr
        before = state()
        for args in (["snapshot", c, "s1"], ["copy", c, c2]):
            r = d.lxc(*args, check=False)
            msg = r.stderr.strip()
            assert r.returncode != 0 and msg.startswith("Error: No space left on the storage pool"), msg
            assert len(msg.splitlines()) == 1, msg  # one clear line, not a tool's whole output
        r = _push(d, c, "/big", os.urandom(4 << 20))
        assert r.status_code == 507 and "No space left" in _error(r), r.text
        assert d.api("GET", f"/1.0/instances/{c}/snapshots/s1").status_code == 404
        assert state() == before
        _healthy(d, c)
        filler.unlink()
        d.lxc("snapshot", c, "s1")
        d.lxc("copy", c, c2)
        assert (small / "containers-snapshots" / c / "s1" / "rootfs" / "bin").is_dir()
        _healthy(d, c, c2)
    finally:
        for n in (c, c2):
            d.lxc("delete", "-f", n, check=False)
        r = d.lxc("storage", "delete", pool, check=False)
        _umount(small)
    assert r.returncode == 0, r.stderr
