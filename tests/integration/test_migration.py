"""`lxc copy` and `lxc move` of containers between two daemons of ours over TLS (the `tls_pair`
fixture: A and B in one network namespace, A's client knows B as remote `b`), in pull, push and
relay modes, through the stock client: files, owners, modes, xattrs, snapshots and config arrive;
the copy boots on B; `--refresh` moves only the changes; `lxc move` leaves nothing on A; a copy
that fails or is cancelled halfway leaves nothing on B."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.helpers import run_prefix, wait_for

pytestmark = pytest.mark.integration

_N = iter(range(1000))


def uniq(tag: str) -> str:
    return f"{run_prefix()}-m{tag}{next(_N)}"


def inst(d, name: str) -> dict | None:
    r = d.api("GET", f"/1.0/instances/{name}")
    return r.json()["metadata"] if r.status_code == 200 else None


def snaps(d, name: str) -> list[str]:
    r = d.api("GET", f"/1.0/instances/{name}/snapshots?recursion=1")
    return sorted(s["name"] for s in r.json()["metadata"] or [])


def sh(d, name: str, script: str) -> str:
    return d.lxc("exec", name, "--", "sh", "-c", script).stdout


def volumes_on(d) -> list[str]:
    """Instance volume directories of every pool of daemon `d`, temporaries included."""
    out = []
    for p in d.api("GET", "/1.0/storage-pools?recursion=1").json()["metadata"]:
        root = d.lxd_dir / "storage-pools" / p["name"] / "containers"
        if root.is_dir():
            out += sorted(x.name for x in root.iterdir())
    return out


@pytest.fixture(scope="module")
def source(tls_pair):
    """c1 on A: busybox with files of every kind, owners, modes, an xattr, two snapshots (snap0
    without `after`, snap1 with it), stopped."""
    a = tls_pair.a
    name = uniq("src")
    a.lxc("launch", "busybox", name)
    sh(a, name, "mkdir -p /data && echo hello > /data/f && chown 1000:1001 /data/f && chmod 640 /data/f"
               " && ln -s f /data/link && mkfifo /data/fifo && echo one > /data/x")
    a.lxc("stop", "-f", name)
    rootfs = a.lxd_dir / "containers" / name / "rootfs"
    import os

    os.setxattr(rootfs / "data" / "f", "user.tag", b"v1")
    a.lxc("config", "set", name, "user.mark", "m1")
    a.lxc("snapshot", name, "snap0")
    a.lxc("start", name)
    sh(a, name, "echo after > /data/after")
    a.lxc("stop", "-f", name)
    a.lxc("snapshot", name, "snap1")
    yield name
    a.lxc("delete", "-f", name, check=False)


def check_copy(pair, src: str, dst: str) -> None:
    b = pair.b
    got = inst(b, dst)
    assert got is not None, f"{dst} missing on B"
    assert got["config"].get("user.mark") == "m1"
    assert snaps(b, dst) == ["snap0", "snap1"]
    b.lxc("start", dst)
    try:
        out = sh(b, dst, "cat /data/f; stat -c '%u:%g %a' /data/f; readlink /data/link; "
                         "stat -c %F /data/fifo; cat /data/after")
        assert out.split("\n")[:5] == ["hello", "1000:1001 640", "f", "fifo", "after"], out
    finally:
        b.lxc("stop", "-f", dst)
    import os

    assert os.getxattr(b.lxd_dir / "containers" / dst / "rootfs" / "data" / "f", "user.tag") == b"v1"
    snap0 = b.lxd_dir / "storage-pools"
    found = list(snap0.glob(f"*/containers-snapshots/{dst}/snap0/rootfs/data/f"))
    assert found and not list(snap0.glob(f"*/containers-snapshots/{dst}/snap0/rootfs/data/after"))


@pytest.mark.parametrize("mode", ["pull", "push", "relay"])
def test_copy_stopped_with_snapshots(tls_pair, source, mode):
    """Files of every kind, owners, modes, an xattr, config and both snapshots arrive; the copy boots."""
    dst = uniq(mode)
    # relay: the copy gets an isolated id map on B, so its files are shifted from A's map at its
    # first start (owners as seen inside stay the same)
    extra = ["-c", "security.idmap.isolated=true"] if mode == "relay" else []
    try:
        tls_pair.a.lxc("copy", source, f"b:{dst}", f"--mode={mode}", *extra)
        if extra:
            got = inst(tls_pair.b, dst)["config"]
            assert got["volatile.last_state.idmap"] == inst(tls_pair.a, source)["config"]["volatile.last_state.idmap"]
            assert got["volatile.idmap.next"] != got["volatile.last_state.idmap"]
        check_copy(tls_pair, source, dst)
    finally:
        tls_pair.b.lxc("delete", "-f", dst, check=False)


class OpsMonitor:
    """`lxc monitor --type=operation` (or another type) on daemon `d` (its own client), for what
    operations published (their fs_progress)."""

    def __init__(self, d, kind: str = "operation"):
        import subprocess

        self.proc = subprocess.Popen(d.lxc_argv("monitor", "--type", kind, "-f", "json"), env=d.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        time.sleep(1.0)  # connected

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> list[dict]:
        time.sleep(0.5)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=5)
        return [json.loads(x)["metadata"] for x in self.lines if x.strip().startswith("{")]


_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def moved_bytes(ops: list[dict], description: str = "Creating instance") -> int:
    """The bytes the last `fs_progress` of the (last) operation described so reports."""
    import re

    vals = [o["metadata"]["fs_progress"] for o in ops
            if o.get("description") == description and (o.get("metadata") or {}).get("fs_progress")]
    assert vals, ops
    m = re.match(r".*: ([0-9.]+)([kMG]?B) \(", vals[-1])
    assert m, vals[-1]
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def host_write(d, name: str, rel: str, data: bytes) -> None:
    p = d.lxd_dir / "containers" / name / "rootfs" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


@pytest.mark.parametrize("mode", ["pull", "push", "relay"])
def test_copy_running_stateless(tls_pair, source, mode):
    """A running container is copied stateless (frozen while its volume goes) and the copy boots."""
    a, b = tls_pair.a, tls_pair.b
    dst = uniq("run")
    a.lxc("start", source)
    try:
        # Without --stateless the client asks for a live (CRIU) migration: refused up front here
        # (test_migration_live.py runs it with CRIU's tools replaced).
        r = a.lxc("copy", source, f"b:{dst}", f"--mode={mode}", check=False)
        assert r.returncode != 0 and "Live migration needs CRIU, which doesn't work on this server" in r.stderr, \
            r.stderr
        assert inst(b, dst) is None
        a.lxc("copy", source, f"b:{dst}", "--stateless", f"--mode={mode}")
        assert inst(a, source)["status"] == "Running"  # thawed again
        check_copy(tls_pair, source, dst)
    finally:
        a.lxc("stop", "-f", source, check=False)
        b.lxc("delete", "-f", dst, check=False)


def test_live_target_refused_without_criu(tls_pair):
    """A sink asked for a live migration refuses it before any operation when CRIU can't work."""
    b = tls_pair.b
    name = uniq("lv")
    for source in ({"type": "migration", "mode": "push", "live": True},
                   {"type": "migration", "mode": "pull", "operation": f"{tls_pair.url_a}/1.0/operations/x",
                    "secrets": {"control": "c", "fs": "f", "criu": "m"}}):
        r = b.api("POST", "/1.0/instances", json={"name": name, "source": source})
        assert r.status_code == 400, r.text
        assert "Live migration needs CRIU, which doesn't work on this server" in r.json()["error"]
    assert inst(b, name) is None


def test_refresh_moves_only_the_changes(tls_pair):
    import os

    a, b = tls_pair.a, tls_pair.b
    src, dst = uniq("rs"), uniq("rd")
    a.lxc("init", "busybox", src)
    try:
        host_write(a, src, "data/big", os.urandom(3_000_000))
        host_write(a, src, "data/small", b"v1")
        a.lxc("snapshot", src, "s0")
        mon = OpsMonitor(b)
        a.lxc("copy", src, f"b:{dst}")
        first = moved_bytes(mon.stop())
        assert first > 3_000_000
        host_write(a, src, "data/small", b"v2" * 1000)
        (a.lxd_dir / "containers" / src / "rootfs" / "data" / "gone").write_text("x")
        a.lxc("snapshot", src, "s1")
        (a.lxd_dir / "containers" / src / "rootfs" / "data" / "gone").unlink()
        a.lxc("snapshot", src, "s2")
        a.lxc("delete", f"{src}/s0")  # gone from the source: B drops it too
        mon = OpsMonitor(b)
        a.lxc("copy", src, f"b:{dst}", "--refresh")
        second = moved_bytes(mon.stop())
        assert second < 300_000, second  # not the 3 MB again: only the changes
        assert snaps(b, dst) == ["s1", "s2"]
        root = b.lxd_dir / "containers" / dst / "rootfs" / "data"
        assert (root / "small").read_bytes() == b"v2" * 1000
        assert not (root / "gone").exists()  # --delete
        s1 = list((b.lxd_dir / "storage-pools").glob(f"*/containers-snapshots/{dst}/s1/rootfs/data/gone"))
        assert s1, "the new snapshot s1 has its own tree"
    finally:
        a.lxc("delete", "-f", src, check=False)
        b.lxc("delete", "-f", dst, check=False)


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
def test_move_leaves_nothing_on_the_source(tls_pair, running):
    """`lxc move` (copy, then delete): a stopped one in relay mode; a running one `--stateless`
    in pull mode, which the client starts again on B."""
    a, b = tls_pair.a, tls_pair.b
    name = uniq("mv")
    a.lxc("init", "busybox", name, "-c", "user.k=v")
    try:
        a.lxc("snapshot", name, "s0")
        if running:
            a.lxc("start", name)
        before = inst(a, name)["config"]
        args = ["--stateless", "--mode=pull"] if running else ["--mode=relay"]
        a.lxc("move", name, f"b:{name}", *args)
        assert inst(a, name) is None
        # (the deleted volume is renamed `.trash-*` at once and removed in the background)
        wait_for(lambda: not [v for v in volumes_on(a) if name in v], timeout=30)
        got = inst(b, name)
        assert got["status"] == ("Running" if running else "Stopped")
        assert got["config"]["user.k"] == "v"
        assert got["config"]["volatile.uuid"] == before["volatile.uuid"]  # a move keeps volatile keys
        assert snaps(b, name) == ["s0"]
    finally:
        a.lxc("delete", "-f", name, check=False)
        b.lxc("delete", "-f", name, check=False)


def test_copy_of_a_snapshot(tls_pair, source):
    b = tls_pair.b
    dst = uniq("snap")
    try:
        tls_pair.a.lxc("copy", f"{source}/snap0", f"b:{dst}")
        assert snaps(b, dst) == []
        root = b.lxd_dir / "containers" / dst / "rootfs" / "data"
        assert (root / "f").read_text() == "hello\n" and not (root / "after").exists()
        assert inst(b, dst)["config"].get("user.mark") == "m1"
    finally:
        b.lxc("delete", "-f", dst, check=False)


def test_refused_before_any_data_moves(tls_pair, source):
    """A profile the target lacks: a clear error, nothing on B, the source untouched."""
    a, b = tls_pair.a, tls_pair.b
    dst = uniq("no")
    before = volumes_on(b)
    r = a.lxc("copy", source, f"b:{dst}", "-p", "default", "-p", "nosuchprofile", check=False)
    assert r.returncode != 0
    assert "nosuchprofile" in r.stderr, r.stderr
    assert inst(b, dst) is None and volumes_on(b) == before
    assert inst(a, source) is not None


def _rsync_left(d) -> list[str]:
    from pathlib import Path

    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("rsync") and str(d.lxd_dir) in cmd:
                out.append(cmd)
    return out


@pytest.mark.parametrize("side", ["target", "source"])
def test_cancel_halfway_leaves_nothing_on_the_target(tls_pair, side):
    """Cancelling either operation halfway (`lxc operation delete`): both ends stop, B keeps
    nothing (no instance, no temporary volume, no rsync), A's container is untouched."""
    import os
    import subprocess

    a, b = tls_pair.a, tls_pair.b
    src, dst = uniq("cs"), uniq("cd")
    a.lxc("init", "busybox", src)
    pool = inst(a, src)["expanded_devices"]["root"]["pool"]
    a.lxc("storage", "set", pool, "rsync.bwlimit", "1000")  # 1 MB/s: 20 MB take 20 s
    before = volumes_on(b)
    copier = None
    try:
        host_write(a, src, "data/big", os.urandom(20_000_000))
        copier = subprocess.Popen(a.lxc_argv("copy", src, f"b:{dst}"), env=a.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)

        def running_op():
            for op in b.api("GET", "/1.0/operations?recursion=1").json()["metadata"].get("running") or []:
                if op["description"] == "Creating instance" and (op.get("metadata") or {}).get("fs_progress"):
                    return op
            return None

        op = wait_for(running_op, timeout=30)
        assert any(".migrate-" in v for v in volumes_on(b))  # receiving into a temporary volume
        if side == "target":
            b.lxc("operation", "delete", op["id"])
        else:
            ops = a.api("GET", "/1.0/operations?recursion=1").json()["metadata"].get("running") or []
            mine = [o for o in ops if o["description"] == "Migrating instance"]
            assert len(mine) == 1, ops
            a.lxc("operation", "delete", mine[0]["id"])
        _, err = copier.communicate(timeout=60)
        assert copier.returncode != 0
        try:
            wait_for(lambda: inst(b, dst) is None and volumes_on(b) == before, timeout=30)
        except AssertionError:
            raise AssertionError(f"left on B: {inst(b, dst)} {volumes_on(b)} (before: {before})") from None
        try:
            wait_for(lambda: not _rsync_left(b) and not _rsync_left(a), timeout=30)
        except AssertionError:
            raise AssertionError(f"rsync left: {_rsync_left(a)} {_rsync_left(b)}") from None
        assert inst(a, src)["status"] == "Stopped"
        assert not [o for o in (a.api("GET", "/1.0/operations").json()["metadata"].get("running") or [])]
    finally:
        if copier is not None and copier.poll() is None:
            copier.kill()
            copier.wait()
        a.lxc("storage", "unset", pool, "rsync.bwlimit", check=False)
        a.lxc("delete", "-f", src, check=False)
        b.lxc("delete", "-f", dst, check=False)


def test_copy_between_projects(tls_pair):
    """`--project` on the source and `--target-project` on B: each side's `?project=`."""
    a, b = tls_pair.a, tls_pair.b
    p, q = uniq("p"), uniq("q")
    name = uniq("pc")
    a.lxc("project", "create", p, "-c", "features.images=false", "-c", "features.profiles=false")
    b.lxc("project", "create", q, "-c", "features.images=false", "-c", "features.profiles=false")
    try:
        a.lxc("init", "busybox", name, "--project", p)
        a.lxc("snapshot", name, "s0", "--project", p)
        a.lxc("copy", name, f"b:{name}", "--project", p, "--target-project", q, "--mode=push")
        r = b.api("GET", f"/1.0/instances/{name}?project={q}")
        assert r.status_code == 200, r.text
        assert inst(b, name) is None  # not in B's default project
        assert b.lxc("info", name, "--project", q).stdout.count("s0") >= 1
        b.lxc("start", name, "--project", q)
        b.lxc("stop", "-f", name, "--project", q)
    finally:
        a.lxc("delete", "-f", name, "--project", p, check=False)
        b.lxc("delete", "-f", name, "--project", q, check=False)
        a.lxc("project", "delete", p, check=False)
        b.lxc("project", "delete", q, check=False)


def test_copy_instance_only(tls_pair, source):
    """`--instance-only`, with `-d DEVICE,KEY=VALUE` overriding one of the copy's devices."""
    a, b = tls_pair.a, tls_pair.b
    dst = uniq("io")
    a.lxc("config", "device", "add", source, "nul", "unix-char", "source=/dev/null", "path=/dev/n1")
    try:
        mon = OpsMonitor(b, "lifecycle")
        a.lxc("copy", source, f"b:{dst}", "--instance-only", "-d", "nul,path=/dev/n2")
        events = mon.stop()
        assert [e for e in events if e["action"] == "instance-created" and e["source"] == f"/1.0/instances/{dst}"]
        assert snaps(b, dst) == []
        assert (b.lxd_dir / "containers" / dst / "rootfs" / "data" / "after").read_text() == "after\n"
        assert inst(b, dst)["devices"]["nul"] == {"type": "unix-char", "source": "/dev/null", "path": "/dev/n2"}
        assert inst(a, source)["devices"]["nul"]["path"] == "/dev/n1"
    finally:
        a.lxc("config", "device", "remove", source, "nul", check=False)
        b.lxc("delete", "-f", dst, check=False)


def _btrfs_pool(d, name: str) -> None:
    drivers = {x["Name"] for x in d.api("GET", "/1.0").json()["metadata"]["environment"]["storage_supported_drivers"]}
    if "btrfs" not in drivers:
        pytest.skip("btrfs can't run on this host")
    r = d.api("POST", "/1.0/storage-pools", json={"name": name, "driver": "btrfs", "config": {"size": "1GiB"}})
    assert r.status_code == 201, r.text


def test_copy_btrfs_to_btrfs_is_native(tls_pair):
    """Both pools btrfs: the volume and its snapshot travel as `btrfs send` streams (B's log says
    it received them with `btrfs receive`), and the copy matches and boots."""
    a, b = tls_pair.a, tls_pair.b
    pa, pb_, name = uniq("bta"), uniq("btb"), uniq("nat")
    _btrfs_pool(a, pa)
    try:
        _btrfs_pool(b, pb_)
        a.lxc("init", "busybox", name, "-s", pa)
        host_write(a, name, "marker", b"snap")
        a.lxc("snapshot", name, "s0")
        host_write(a, name, "marker", b"main!")
        a.lxc("copy", name, f"b:{name}", "-s", pb_)
        assert f'msg="migration: receiving by btrfs receive" instance={name}' in b.log.read_text()
        assert snaps(b, name) == ["s0"]
        assert (b.lxd_dir / "storage-pools" / pb_ / "containers-snapshots" / name / "s0" / "rootfs"
                / "marker").read_bytes() == b"snap"
        b.lxc("start", name)
        assert sh(b, name, "cat /marker") == "main!"
        b.lxc("stop", "-f", name)

        # running (stateless): a read-only snapshot of the volume is sent, in one pass
        a.lxc("start", name)
        sh(a, name, "echo running > /marker2")
        a.lxc("copy", name, f"b:{name}-r", "-s", pb_, "--stateless")
        assert f'msg="migration: receiving by btrfs receive" instance={name}-r' in b.log.read_text()
        assert inst(a, name)["status"] == "Running"
        assert snaps(b, f"{name}-r") == ["s0"]
        b.lxc("start", f"{name}-r")
        assert sh(b, f"{name}-r", "cat /marker /marker2") == "main!running\n"
        b.lxc("stop", "-f", f"{name}-r")
    finally:
        a.lxc("delete", "-f", name, check=False)
        b.lxc("delete", "-f", name, check=False)
        b.lxc("delete", "-f", f"{name}-r", check=False)
        a.api("DELETE", f"/1.0/storage-pools/{pa}")
        b.api("DELETE", f"/1.0/storage-pools/{pb_}")


# -- with LXD 5.0.2 (Debian's `lxd`, in the pair's network namespace, on a dir pool) -------------

# (the `lxd502` fixture: tests/conftest.py)

@pytest.mark.parametrize("mode", ["pull", "push"])
def test_copy_to_and_from_lxd502(tls_pair, lxd502, mode):
    """A stopped container with a snapshot, ours -> LXD 5.0.2 and LXD 5.0.2 -> ours: files,
    the snapshot (never expiring) and config arrive, and the copy boots on the other side."""
    a, lxd = tls_pair.a, lxd502
    ours_src, lxd_src = uniq("ol"), uniq("lo")
    lxd_root = lxd.lxd_dir / "storage-pools" / "default" / "containers"
    try:
        a.lxc("init", "busybox", ours_src, "-c", "user.from=ours")
        host_write(a, ours_src, "marker", b"snap")
        a.lxc("snapshot", ours_src, "s0")
        host_write(a, ours_src, "marker", b"ours!")  # (another size: LXD's rsync compares size and mtime in seconds)
        a.lxc("copy", ours_src, f"lx:{ours_src}", f"--mode={mode}")
        got = json.loads(lxd.lxc("list", ours_src, "--format=json").stdout)[0]
        assert got["config"]["user.from"] == "ours"
        assert [s["name"] for s in got["snapshots"]] == ["s0"]
        assert got["snapshots"][0]["expires_at"].startswith("0001-01-01")
        assert (lxd_root / ours_src / "rootfs" / "marker").read_text() == "ours!"
        assert (lxd.lxd_dir / "storage-pools" / "default" / "containers-snapshots" / ours_src / "s0" / "rootfs"
                / "marker").read_text() == "snap"
        lxd.lxc("start", ours_src)
        lxd.lxc("stop", "-f", ours_src)

        lxd.lxc("init", "busybox", lxd_src, "-c", "user.from=lxd")
        (lxd_root / lxd_src / "rootfs" / "marker").write_text("lsnap")
        lxd.lxc("snapshot", lxd_src, "ls0")
        (lxd_root / lxd_src / "rootfs" / "marker").write_text("lxd")
        lxd.lxc_ns("copy", lxd_src, f"ou:{lxd_src}", f"--mode={mode}")
        mine = inst(a, lxd_src)
        assert mine["config"]["user.from"] == "lxd"
        assert snaps(a, lxd_src) == ["ls0"]
        s0 = a.api("GET", f"/1.0/instances/{lxd_src}/snapshots/ls0").json()["metadata"]
        assert s0["expires_at"].startswith("0001-01-01")  # never, as on LXD
        a.lxc("start", lxd_src)
        assert sh(a, lxd_src, "cat /marker") == "lxd"
        a.lxc("stop", "-f", lxd_src)
    finally:
        a.lxc("delete", "-f", lxd_src, check=False)
        a.lxc("delete", "-f", ours_src, check=False)
        lxd.lxc("delete", "-f", ours_src, check=False)
        lxd.lxc("delete", "-f", lxd_src, check=False)


def test_copy_dir_to_btrfs_falls_back_to_rsync(tls_pair, source):
    """A btrfs pool on B (`-s POOL`): the dir source offers rsync, B receives into a btrfs
    subvolume (snapshots as btrfs snapshots) and the copy boots."""
    b = tls_pair.b
    drivers = {x["Name"] for x in b.api("GET", "/1.0").json()["metadata"]["environment"]["storage_supported_drivers"]}
    if "btrfs" not in drivers:
        pytest.skip("btrfs can't run on this host")
    pool, dst = uniq("bt"), uniq("tobt")
    r = b.api("POST", "/1.0/storage-pools", json={"name": pool, "driver": "btrfs", "config": {"size": "1GiB"}})
    assert r.status_code == 201, r.text
    try:
        tls_pair.a.lxc("copy", source, f"b:{dst}", "-s", pool)
        assert inst(b, dst)["expanded_devices"]["root"]["pool"] == pool
        check_copy(tls_pair, source, dst)
    finally:
        b.lxc("delete", "-f", dst, check=False)
        r = b.api("DELETE", f"/1.0/storage-pools/{pool}")
        assert r.status_code == 200, r.text


def test_rsync_compression_false_turns_compress_off(tls_pair, source):
    """`rsync.compression=false` on the source's pool: the rsync streams go uncompressed (B's
    receiver runs without --compress), as LXD's; the copy is whole."""
    a, b = tls_pair.a, tls_pair.b
    dst = uniq("nc")
    a.lxc("storage", "set", "default", "rsync.compression", "false")
    try:
        a.lxc("copy", source, f"b:{dst}", "--instance-only")
        mine = [ln for ln in b.log.read_text().splitlines() if "rsync receive:" in ln and dst in ln]
        assert mine and all("--compress" not in ln for ln in mine), mine
        assert (b.lxd_dir / "containers" / dst / "rootfs" / "data" / "after").read_text() == "after\n"
    finally:
        a.lxc("storage", "unset", "default", "rsync.compression")
        b.lxc("delete", "-f", dst, check=False)
