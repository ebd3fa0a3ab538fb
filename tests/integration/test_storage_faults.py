"""Storage faults through the stock client and the API (issue 9, "Bad input and faults"):
pools on a path already in use, on a missing device or directory, on a block device holding a
filesystem; a full btrfs pool on a small loop file; and `lxc export` from the shared daemon then
`lxc import` into a fresh daemon on a dir and on a btrfs pool.

Each refused change answers 4xx (507 for a lack of space) naming the problem and leaves nothing
behind: no pool or volume record, no loop device, no mount, no directory or loop file."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import busybox_tarball, run_prefix

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
    return (_loops(), _mounts(), sorted(os.listdir(pools)) if pools.is_dir() else [],
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
SPACE_WORDS = ("space", "full", "quota")


def _says_no_space(text: str) -> bool:
    return any(w in text.lower() for w in SPACE_WORDS) and "Internal error" not in text


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
    assert r.returncode != 0 and _says_no_space(r.stderr), r.stderr
    r = d.lxc("copy", src, cp, "-s", pool, check=False)
    assert r.returncode != 0 and _says_no_space(r.stderr), r.stderr
    assert _pool_state(d, pool) == before
    _healthy(d, c, src)

    # copy-on-write changes need no data space: they work, complete, on the full pool
    d.lxc("snapshot", c, "s1")
    d.lxc("copy", c, cow)
    d.lxc("storage", "volume", "create", pool, "v1")
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
