"""Crash safety of storage operations: a daemon killed with SIGKILL in the middle of a create (image
unpack, then the root volume's fill), a copy, a snapshot, a restore, a backup or an import leaves,
after a restart, either the finished result or nothing.

The kill points are real timing, no failpoints: each operation works on a tree big enough (a few
hundred MB of random data, written on the host into a stopped container's volume, or in an image)
that it lasts well over a second here, and the test kills the daemon as soon as the operation's
first traces appear on disk (a temporary directory, a half-filled destination). A test that could
not catch its operation in the middle says so and fails: it must not pass without testing.

After the restart, the checks are the same for every operation (`assert_consistent`):
- the instances the API lists are exactly the instance rows in the database and the volumes on the
  pool (`containers/`), and each one's snapshots likewise (rows, API, `containers-snapshots/`);
- no temporary entries (`.tmp*`, `.trash-*`, `.restore-*`, `tmp-*` image volumes) are left in the
  pool, nor in the backups directory, and every backup row has its file;
- the mounts under LXD_DIR and the loop devices backed by files in it are those there were before
  the operation started (btrfs: one loop device for the pool, no stray subvolumes).
"""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import busybox_tarball, root_subids, wait_op

MiB = 1024 * 1024
DATA_FILES = 100  # x 2 MiB of random data: copying it lasts a second or more here
TEMP_PREFIXES = (".tmp", ".trash-", ".restore-", ".import-", ".stage-", ".backup_", ".spare-")


# -- set-up ------------------------------------------------------------------------------------
@pytest.fixture
def crashd(fresh_daemon, tmp_path):
    """fresh_daemon, and after the test its few hundred MB of volumes, backups and images go
    (pytest keeps the last runs' temporary directories)."""
    yield fresh_daemon
    fresh_daemon.stop()
    for sub in ("storage-pools", "backups", "images"):
        subprocess.run(["rm", "-rf", "--one-file-system", str(fresh_daemon.lxd_dir / sub)], check=False)
    for f in tmp_path.glob("*.tar"):
        f.unlink()


def start_ready(d) -> Path:
    """Start the daemon with a dir pool `default`, its root disk in the default profile and the
    busybox image (alias busybox); returns the pool's directory."""
    d.start()
    d.lxd("init", "--auto")
    d.lxc("image", "import", str(busybox_tarball()), "--alias", "busybox")
    return d.lxd_dir / "storage-pools" / "default"


def survivors(d) -> list[str]:
    """Processes (other than this test's) whose environment names the daemon's LXD_DIR."""
    needle = f"LXD_DIR={d.lxd_dir}".encode()
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle + b"\0" in f.read() + b"\0":
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmd = c.read().replace(b"\0", b" ").decode(errors="replace")
                    out.append(f"{pid}: {cmd[:80]}")
        except OSError:
            continue
    return out


def restart_after_kill(d) -> None:
    d.proc.wait(30)
    d.proc = None
    # the daemon's helper processes (liblxc workers) end with it
    deadline = time.monotonic() + 5
    while survivors(d) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not survivors(d), f"processes of the killed daemon are still running: {survivors(d)}"
    d.start()


def write_data(rootfs: Path, files: int = DATA_FILES, tag: str = "data") -> None:
    """Random files in rootfs/<tag>, owned by the container's root (the default map)."""
    uid, gid = root_subids()
    target = rootfs / tag
    target.mkdir()
    os.chown(target, uid, gid)
    for i in range(files):
        p = target / f"f{i:04d}"
        with open(p, "wb") as f:
            f.write(os.urandom(2 * MiB))
        os.chown(p, uid, gid)


def count_files(path: Path) -> int:
    return sum(len(files) for _r, _d, files in os.walk(path))


def stopped_container_with_data(d, pool: Path, name: str) -> Path:
    d.lxc("init", "busybox", name)
    rootfs = pool / "containers" / name / "rootfs"
    write_data(rootfs)
    return rootfs


def big_image(tmp: Path, mb: int = 240) -> Path:
    """A unified, uncompressed image: busybox's rootfs plus mb MB of random files in /data."""
    out = tmp / "big.tar"
    with tarfile.open(busybox_tarball()) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        ti = tarfile.TarInfo("rootfs/data")
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
        dst.addfile(ti)
        for i in range(mb // 2):
            ti = tarfile.TarInfo(f"rootfs/data/f{i:04d}")
            ti.size, ti.mode, ti.mtime = 2 * MiB, 0o644, int(time.time())
            dst.addfile(ti, io.BytesIO(os.urandom(2 * MiB)))
    return out


# -- killing at the right moment -----------------------------------------------------------------
def kill_when(d, start, cond, timeout: float = 120) -> float:
    """Run start() in a thread (a request whose answer may never come), SIGKILL the daemon as soon
    as cond() holds; returns when it was killed (seconds after the start). Fails when the
    operation finished (or the wait timed out) before cond() was seen."""
    errors: list[BaseException] = []
    done = threading.Event()

    def run():
        try:
            start()
        except BaseException as e:  # noqa: BLE001 - the daemon dies under it
            errors.append(e)
        finally:
            done.set()

    t0 = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    while time.monotonic() - t0 < timeout:
        try:
            hit = cond()
        except OSError:
            hit = False
        if hit:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(30)
            th.join(30)
            return time.monotonic() - t0
        time.sleep(0.002)
    d.proc.send_signal(signal.SIGKILL)
    pytest.fail(f"the operation was not caught in the middle (finished: {done.is_set()}, errors: {errors})")


def post_async(d, path: str, body: dict) -> None:
    """Send a request that starts an operation; the operation runs on in the daemon."""
    r = d.api("POST", path, json=body)
    assert r.status_code in (200, 201, 202), r.text


def entries(p: Path) -> list[str]:
    try:
        return sorted(os.listdir(p))
    except OSError:
        return []


def has_entries(p: Path, prefix: str = "") -> bool:
    return any(e.startswith(prefix) for e in entries(p))


def filled(p: Path, at_least: int = 1) -> bool:
    """True when the tree at p has at least `at_least` files under data/ (a copy under way)."""
    return len(entries(p / "rootfs" / "data")) >= at_least or len(entries(p / "data")) >= at_least


# -- what the host looks like ----------------------------------------------------------------------
def mounts_under(base: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == str(base) or mp.startswith(str(base) + "/"):
                out.append(mp)
    return sorted(out)


def loops_under(base: Path) -> list[str]:
    r = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", "-l"], capture_output=True, text=True)
    return sorted(x.strip() for x in r.stdout.splitlines() if x.strip().startswith(str(base) + "/"))


def host_state(d) -> tuple[list[str], list[str]]:
    return mounts_under(d.lxd_dir), loops_under(d.lxd_dir)


def db_rows(d, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{d.lxd_dir / 'database' / 'lxd.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def api_instances(d) -> dict[str, list[str]]:
    r = d.api("GET", "/1.0/instances?recursion=1")
    assert r.status_code == 200, r.text
    out = {}
    for inst in r.json()["metadata"]:
        s = d.api("GET", f"/1.0/instances/{inst['name']}/snapshots")
        assert s.status_code == 200, s.text
        out[inst["name"]] = sorted(u.rsplit("/", 1)[-1] for u in s.json()["metadata"])
    return out


def assert_consistent(d, pool: Path, before: tuple[list[str], list[str]], *, btrfs: bool = False) -> dict:
    """The checks every crash test ends with (see the module's docstring); returns the instances
    with their snapshots."""
    insts = api_instances(d)
    rows = {n for (n,) in db_rows(d, "SELECT name FROM instances")}
    assert rows == set(insts), f"instance rows {sorted(rows)} != API {sorted(insts)}"
    vols = [e for e in entries(pool / "containers")]
    assert sorted(vols) == sorted(insts), f"volumes on the pool {vols} != instances {sorted(insts)}"
    snap_rows: dict[str, list[str]] = {}
    for iname, sname in db_rows(d, "SELECT i.name, s.name FROM instances_snapshots s "
                                   "JOIN instances i ON i.id = s.instance_id"):
        snap_rows.setdefault(iname, []).append(sname)
    for n, snaps in insts.items():
        assert sorted(snap_rows.get(n, [])) == snaps, f"{n}: snapshot rows {snap_rows.get(n)} != API {snaps}"
        assert entries(pool / "containers-snapshots" / n) == snaps, \
            f"{n}: snapshot volumes {entries(pool / 'containers-snapshots' / n)} != {snaps}"
    assert set(entries(pool / "containers-snapshots")) <= set(insts), \
        f"snapshot volumes of unknown instances: {entries(pool / 'containers-snapshots')}"
    for fp in entries(pool / "images"):
        bad = [e for e in entries(pool / "images" / fp) if e.startswith(".tmp")]
        assert not bad, f"temporary entries left in the image cache: {bad}"
    for sub in ("containers", "containers-snapshots"):
        bad = [e for e in entries(pool / sub) if e.startswith(TEMP_PREFIXES)]
        assert not bad, f"temporary entries left in {sub}/: {bad}"
    backups = d.lxd_dir / "backups"
    bad = [e for e in entries(backups) if e.startswith(TEMP_PREFIXES)]
    assert not bad, f"temporary entries left in backups/: {bad}"
    for iid, bname in db_rows(d, "SELECT instance_id, name FROM instances_backups"):
        assert (backups / "instances" / str(iid) / bname).is_file(), f"backup row {bname} has no file"
    for iid in entries(backups / "instances"):
        names = {b for (b,) in db_rows(d, f"SELECT name FROM instances_backups WHERE instance_id={int(iid)}")}
        stray = [f for f in entries(backups / "instances" / iid) if f not in names]
        assert not stray, f"backup files without rows: {stray}"
    if btrfs:
        r = subprocess.run(["btrfs", "subvolume", "list", "-o", str(pool)], capture_output=True, text=True)
        subs = [line.split(" path ", 1)[1] for line in r.stdout.splitlines() if " path " in line]
        stray = [s for s in subs if "/tmp-" in s or "/.tmp" in s or "/.trash" in s or "/.restore" in s]
        assert not stray, f"stray subvolumes: {stray}"
    assert host_state(d) == before, f"mounts/loop devices changed: {before} -> {host_state(d)}"
    return insts


# -- the tests -------------------------------------------------------------------------------------
def test_kill_during_create_from_image(crashd, tmp_path):
    """Killed while the image is unpacked into the new volume (a dir pool on ext4 unpacks into
    each volume; there is no cache)."""
    d = crashd
    pool = start_ready(d)
    img = big_image(tmp_path)
    d.lxc("image", "import", str(img), "--alias", "big")
    before = host_state(d)
    kill_when(d, lambda: post_async(d, "/1.0/instances", {"name": "c1", "source": {"type": "image", "alias": "big"}}),
              lambda: filled(pool / "containers" / "c1", 10))
    restart_after_kill(d)
    insts = assert_consistent(d, pool, before)
    assert "c1" not in insts  # the create never finished
    assert entries(pool / "images") == []
    # and the image still launches
    d.lxc("init", "big", "c2")
    assert count_files(pool / "containers" / "c2" / "rootfs" / "data") == 120


def test_kill_during_copy(crashd):
    d = crashd
    pool = start_ready(d)
    stopped_container_with_data(d, pool, "src")
    before = host_state(d)
    kill_when(d, lambda: post_async(d, "/1.0/instances", {"name": "dst", "source": {"type": "copy", "source": "src"}}),
              lambda: filled(pool / "containers" / "dst", 5))
    restart_after_kill(d)
    insts = assert_consistent(d, pool, before)
    assert "dst" not in insts
    assert count_files(pool / "containers" / "src" / "rootfs" / "data") == DATA_FILES
    d.lxc("copy", "src", "dst")  # the name is free again
    assert count_files(pool / "containers" / "dst" / "rootfs" / "data") == DATA_FILES


def test_kill_during_snapshot(crashd):
    d = crashd
    pool = start_ready(d)
    stopped_container_with_data(d, pool, "c1")
    before = host_state(d)
    kill_when(d, lambda: post_async(d, "/1.0/instances/c1/snapshots", {"name": "s1"}),
              lambda: filled(pool / "containers-snapshots" / "c1" / "s1", 5))
    restart_after_kill(d)
    insts = assert_consistent(d, pool, before)
    assert insts["c1"] == []
    d.lxc("snapshot", "c1", "s1")  # the name is free again
    assert count_files(pool / "containers-snapshots" / "c1" / "s1" / "rootfs" / "data") == DATA_FILES


def test_kill_during_restore(crashd):
    d = crashd
    pool = start_ready(d)
    rootfs = stopped_container_with_data(d, pool, "c1")
    d.lxc("snapshot", "c1", "s1")
    # After the snapshot: data/ goes, later/ comes. A restore gives data/ back and removes later/.
    subprocess.run(["rm", "-rf", str(rootfs / "data")], check=True)
    write_data(rootfs, 20, "later")
    before = host_state(d)
    kill_when(d, lambda: d.api("PUT", "/1.0/instances/c1", json={"restore": "s1"}),
              lambda: any(filled(pool / "containers" / e, 5) for e in entries(pool / "containers")
                          if e.startswith(".restore")))
    restart_after_kill(d)
    insts = assert_consistent(d, pool, before)
    assert insts["c1"] == ["s1"]
    now = pool / "containers" / "c1" / "rootfs"
    old_state = not (now / "data").exists() and count_files(now / "later") == 20
    new_state = not (now / "later").exists() and count_files(now / "data") == DATA_FILES
    assert old_state or new_state, f"half restored: {entries(now)}"
    assert count_files(pool / "containers-snapshots" / "c1" / "s1" / "rootfs" / "data") == DATA_FILES


def test_kill_during_backup(crashd):
    d = crashd
    pool = start_ready(d)
    stopped_container_with_data(d, pool, "c1")
    before = host_state(d)
    backups = d.lxd_dir / "backups"
    base = set(entries(backups)) | {f"i/{e}" for e in entries(backups / "instances")}

    def cond():
        now = set(entries(backups)) | {f"i/{e}" for e in entries(backups / "instances")}
        if now - base:
            return True
        return any(entries(backups / "instances" / e) for e in entries(backups / "instances"))

    kill_when(d, lambda: post_async(d, "/1.0/instances/c1/backups",
                                    {"name": "b1", "compression_algorithm": "gzip"}), cond)
    restart_after_kill(d)
    assert_consistent(d, pool, before)
    r = d.api("GET", "/1.0/instances/c1/backups")
    assert r.status_code == 200 and r.json()["metadata"] == [], r.text  # never finished: no backup
    op = wait_op(d, d.api("POST", "/1.0/instances/c1/backups", json={"name": "b1", "compression_algorithm": "none"}),
                 timeout=120)
    assert op["status_code"] == 200, op


def test_kill_during_import(crashd, tmp_path):
    d = crashd
    pool = start_ready(d)
    stopped_container_with_data(d, pool, "c1")
    tarball = tmp_path / "c1.tar"
    d.lxc("export", "c1", str(tarball), "--compression", "none", timeout=300)
    before = host_state(d)

    def upload():
        with open(tarball, "rb") as f, d.http(timeout=300) as c:
            c.post("/1.0/instances", content=f, headers={"Content-Type": "application/octet-stream",
                                                          "X-LXD-name": "c2", "X-LXD-pool": "default"})

    kill_when(d, upload, lambda: filled(pool / "containers" / "c2", 5) or any(
        filled(pool / "containers" / e, 5) for e in entries(pool / "containers") if e.startswith(".")))
    restart_after_kill(d)
    insts = assert_consistent(d, pool, before)
    assert "c2" not in insts
    d.lxc("import", str(tarball), "c2", timeout=300)  # the name is free again
    assert count_files(pool / "containers" / "c2" / "rootfs" / "data") == DATA_FILES


def test_kill_during_create_on_btrfs(crashd, tmp_path):
    """btrfs on a loop file: the image volume being unpacked (a `tmp-*` subvolume) when the daemon
    dies; after the restart the pool's loop device is attached once, no stray subvolume is left."""
    d = crashd
    start_ready(d)
    r = d.api("POST", "/1.0/storage-pools", json={"name": "bt", "driver": "btrfs", "config": {"size": "3GiB"}})
    assert r.status_code in (200, 201), r.text
    pool = d.lxd_dir / "storage-pools" / "bt"
    try:
        d.lxc("profile", "create", "onbt")
        d.lxc("profile", "device", "add", "onbt", "root", "disk", "path=/", "pool=bt")
        img = big_image(tmp_path)
        d.lxc("image", "import", str(img), "--alias", "big")
        before = host_state(d)
        assert len(before[1]) == 1, before  # the pool's loop file

        def cond():
            return any(e.startswith("tmp-") and filled(pool / "images" / e, 10) for e in entries(pool / "images"))

        kill_when(d, lambda: post_async(d, "/1.0/instances", {"name": "c1", "profiles": ["onbt"],
                                                              "source": {"type": "image", "alias": "big"}}), cond)
        restart_after_kill(d)
        insts = assert_consistent(d, pool, before, btrfs=True)
        assert "c1" not in insts
        d.lxc("init", "big", "c2", "-p", "onbt")
        assert count_files(pool / "containers" / "c2" / "rootfs" / "data") == 120
    finally:
        for n in ("c1", "c2"):
            d.lxc("delete", "-f", n, check=False)
        d.lxc("image", "delete", "big", check=False)
        d.lxc("profile", "delete", "onbt", check=False)
        d.api("DELETE", "/1.0/storage-pools/bt")
        # a failed test must not leave the pool's loop device attached
        for back in loops_under(d.lxd_dir):
            subprocess.run(["umount", "-l", str(pool)], stderr=subprocess.DEVNULL)
            r = subprocess.run(["losetup", "-j", back, "-O", "NAME", "-n"], capture_output=True, text=True)
            for dev in r.stdout.split():
                subprocess.run(["losetup", "-d", dev], stderr=subprocess.DEVNULL)
