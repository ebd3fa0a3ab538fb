"""`lxc storage volume copy/move A:pool/vol b:pool/vol` between two daemons of ours over TLS (the
`tls_pair` fixture), in pull, push and relay modes, through the stock client: files, owners,
modes, xattrs and snapshots (with their descriptions) arrive; `--volume-only` leaves the
snapshots behind; `--refresh` adds only the missing snapshots and syncs the content (deleted
files go); `move` leaves nothing on A; a refused copy leaves nothing on B; projects."""

from __future__ import annotations

import os

import pytest

from tests.helpers import run_prefix

pytestmark = pytest.mark.integration

_N = iter(range(1000))
POOL = "default"


def uniq(tag: str) -> str:
    return f"{run_prefix()}-v{tag}{next(_N)}"


def vol_path(d, name: str, project: str = "default"):
    return d.lxd_dir / "storage-pools" / POOL / "custom" / f"{project}_{name}"


def snap_path(d, name: str, snap: str, project: str = "default"):
    return d.lxd_dir / "storage-pools" / POOL / "custom-snapshots" / f"{project}_{name}" / snap


def vol(d, name: str, project: str = "default") -> dict | None:
    r = d.api("GET", f"/1.0/storage-pools/{POOL}/volumes/custom/{name}?project={project}")
    return r.json()["metadata"] if r.status_code == 200 else None


def vsnaps(d, name: str, project: str = "default") -> dict[str, dict]:
    r = d.api("GET", f"/1.0/storage-pools/{POOL}/volumes/custom/{name}/snapshots?recursion=1&project={project}")
    assert r.status_code == 200, r.text
    return {s["name"]: s for s in r.json()["metadata"] or []}


def leftovers(d) -> list[str]:
    out = []
    for sub in ("custom", "custom-snapshots"):
        root = d.lxd_dir / "storage-pools" / POOL / sub
        if root.is_dir():
            out += [x.name for x in root.iterdir() if ".tmp-" in x.name]
    return out


@pytest.fixture
def srcvol(tls_pair):
    """A volume on A: a file with owner, mode and xattr, a symlink; snapshot s0 (described), then
    a second file and snapshot s1."""
    a = tls_pair.a
    name = uniq("src")
    a.lxc("storage", "volume", "create", POOL, name, "user.k=v1")
    p = vol_path(a, name)
    (p / "data").mkdir()
    (p / "data" / "f").write_text("hello\n")
    os.chown(p / "data" / "f", 1000, 1001)
    os.chmod(p / "data" / "f", 0o640)
    os.setxattr(p / "data" / "f", "user.tag", b"v1")
    os.symlink("f", p / "data" / "link")
    a.lxc("storage", "volume", "snapshot", POOL, name, "s0")
    r = a.api("PATCH", f"/1.0/storage-pools/{POOL}/volumes/custom/{name}/snapshots/s0",
              json={"description": "first"})
    assert r.status_code == 200, r.text
    (p / "data" / "g").write_text("second\n")
    a.lxc("storage", "volume", "snapshot", POOL, name, "s1")
    yield name
    a.lxc("storage", "volume", "delete", POOL, name, check=False)


def check_copy(pair, src: str, dst: str, *, snapshots=("s0", "s1")) -> None:
    b = pair.b
    got = vol(b, dst)
    assert got is not None, f"{dst} missing on B"
    assert got["config"].get("user.k") == "v1"
    assert sorted(vsnaps(b, dst)) == sorted(snapshots)
    p = vol_path(b, dst)
    st = os.stat(p / "data" / "f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1000, 1001, 0o640)
    assert os.getxattr(p / "data" / "f", "user.tag") == b"v1"
    assert os.readlink(p / "data" / "link") == "f"
    assert (p / "data" / "g").read_text() == "second\n"
    if "s0" in snapshots:
        assert vsnaps(b, dst)["s0"]["description"] == "first"
        assert not (snap_path(b, dst, "s0") / "data" / "g").exists()  # s0 holds what it held on A
        assert (snap_path(b, dst, "s0") / "data" / "f").read_text() == "hello\n"
        assert (snap_path(b, dst, "s1") / "data" / "g").read_text() == "second\n"
    assert leftovers(b) == []


@pytest.mark.parametrize("mode", ["pull", "push", "relay"])
def test_copy_modes(tls_pair, srcvol, mode):
    a, b = tls_pair.a, tls_pair.b
    dst = uniq("dst")
    try:
        a.lxc("storage", "volume", "copy", f"{POOL}/{srcvol}", f"b:{POOL}/{dst}", "--mode", mode)
        check_copy(tls_pair, srcvol, dst)
        assert vol(a, srcvol) is not None  # a copy leaves the source alone
    finally:
        b.lxc("storage", "volume", "delete", POOL, dst, check=False)


def test_volume_only_and_refresh(tls_pair, srcvol):
    a, b = tls_pair.a, tls_pair.b
    dst = uniq("dst")
    try:
        a.lxc("storage", "volume", "copy", f"{POOL}/{srcvol}", f"b:{POOL}/{dst}", "--volume-only")
        check_copy(tls_pair, srcvol, dst, snapshots=())
        b.lxc("storage", "volume", "delete", POOL, dst)
        a.lxc("storage", "volume", "copy", f"{POOL}/{srcvol}", f"b:{POOL}/{dst}")
        s1_created = vsnaps(b, dst)["s1"]["created_at"]
        # Changes on A: a file goes, one comes, a new snapshot; B has a stray file of its own.
        p = vol_path(a, srcvol)
        (p / "data" / "g").unlink()
        (p / "data" / "h").write_text("third\n")
        a.lxc("storage", "volume", "snapshot", POOL, srcvol, "s2")
        (vol_path(b, dst) / "stray").write_text("x")
        a.lxc("storage", "volume", "copy", f"{POOL}/{srcvol}", f"b:{POOL}/{dst}", "--refresh")
        got = vsnaps(b, dst)
        assert sorted(got) == ["s0", "s1", "s2"]
        assert got["s1"]["created_at"] == s1_created  # kept, not sent again
        q = vol_path(b, dst)
        assert (q / "data" / "h").read_text() == "third\n"
        assert not (q / "data" / "g").exists() and not (q / "stray").exists()
        assert (snap_path(b, dst, "s2") / "data" / "h").exists()
        assert leftovers(b) == []
    finally:
        b.lxc("storage", "volume", "delete", POOL, dst, check=False)


def test_move_and_refusals(tls_pair, srcvol):
    a, b = tls_pair.a, tls_pair.b
    dst = uniq("dst")
    try:
        b.lxc("storage", "volume", "create", POOL, dst)
        r = a.lxc("storage", "volume", "copy", f"{POOL}/{srcvol}", f"b:{POOL}/{dst}", check=False)
        assert r.returncode != 0 and "already exists" in r.stderr
        assert vsnaps(b, dst) == {} and leftovers(b) == []
        b.lxc("storage", "volume", "delete", POOL, dst)
        r = a.lxc("storage", "volume", "copy", f"{POOL}/nosuch", f"b:{POOL}/{dst}", check=False)
        assert r.returncode != 0 and vol(b, dst) is None
        a.lxc("storage", "volume", "move", f"{POOL}/{srcvol}", f"b:{POOL}/{dst}")
        assert vol(a, srcvol) is None and not vol_path(a, srcvol).exists()
        check_copy(tls_pair, srcvol, dst)
    finally:
        b.lxc("storage", "volume", "delete", POOL, dst, check=False)


def test_projects(tls_pair, srcvol):
    a, b = tls_pair.a, tls_pair.b
    proj = uniq("p")
    dst = uniq("dst")
    b.lxc("project", "create", proj, "-c", "features.storage.volumes=true")
    try:
        a.lxc("storage", "volume", "copy", f"{POOL}/{srcvol}", f"b:{POOL}/{dst}", "--target-project", proj)
        assert vol(b, dst) is None
        got = vol(b, dst, proj)
        assert got is not None and got["config"].get("user.k") == "v1"
        assert sorted(vsnaps(b, dst, proj)) == ["s0", "s1"]
        assert (vol_path(b, dst, proj) / "data" / "g").read_text() == "second\n"
        # `--project` on both sides: the source's volume is looked up in A's project too.
        a.lxc("project", "create", proj, "-c", "features.storage.volumes=true")
        a.lxc("storage", "volume", "create", POOL, "pv", "user.p=1", "--project", proj)
        (vol_path(a, "pv", proj) / "m").write_text("in project")
        for mode in ("pull", "push"):
            a.lxc("storage", "volume", "copy", f"{POOL}/pv", f"b:{POOL}/pv-{mode}", "--project", proj,
                  "--mode", mode)
            assert vol(b, f"pv-{mode}", proj)["config"].get("user.p") == "1"
            assert (vol_path(b, f"pv-{mode}", proj) / "m").read_text() == "in project"
    finally:
        for v in (dst, "pv-pull", "pv-push"):
            b.lxc("storage", "volume", "delete", POOL, v, "--project", proj, check=False)
        a.lxc("storage", "volume", "delete", POOL, "pv", "--project", proj, check=False)
        b.lxc("project", "delete", proj, check=False)
        a.lxc("project", "delete", proj, check=False)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_copy_to_and_from_lxd502(tls_pair, lxd502, mode):
    """A volume with a snapshot, ours -> LXD 5.0.2 and LXD 5.0.2 -> ours (the `lxd502` fixture,
    tests/conftest.py): content, snapshot content and config arrive on the other side."""
    import json

    a, lxd = tls_pair.a, lxd502
    ours, theirs = uniq("ol"), uniq("lo")
    lroot = lxd.lxd_dir / "storage-pools" / "default"
    try:
        a.lxc("storage", "volume", "create", POOL, ours, "user.from=ours")
        (vol_path(a, ours) / "marker").write_text("snap")
        a.lxc("storage", "volume", "snapshot", POOL, ours, "s0")
        (vol_path(a, ours) / "marker").write_text("ours!")  # another size: rsync compares size and mtime
        a.lxc("storage", "volume", "copy", f"{POOL}/{ours}", f"lx:default/{ours}", f"--mode={mode}")
        got = json.loads(lxd.lxc("query", f"/1.0/storage-pools/default/volumes/custom/{ours}").stdout)
        assert got["config"].get("user.from") == "ours"
        lsnaps = json.loads(lxd.lxc("query", f"/1.0/storage-pools/default/volumes/custom/{ours}/snapshots").stdout)
        assert [s.rsplit("/", 1)[-1] for s in lsnaps] == ["s0"]
        assert (lroot / "custom" / f"default_{ours}" / "marker").read_text() == "ours!"
        assert (lroot / "custom-snapshots" / f"default_{ours}" / "s0" / "marker").read_text() == "snap"

        lxd.lxc("storage", "volume", "create", "default", theirs, "user.from=lxd")
        (lroot / "custom" / f"default_{theirs}" / "marker").write_text("lsnap")
        lxd.lxc("storage", "volume", "snapshot", "default", theirs, "ls0")
        (lroot / "custom" / f"default_{theirs}" / "marker").write_text("lxd")
        lxd.lxc_ns("storage", "volume", "copy", f"default/{theirs}", f"ou:{POOL}/{theirs}", f"--mode={mode}")
        mine = vol(a, theirs)
        assert mine is not None and mine["config"].get("user.from") == "lxd"
        assert sorted(vsnaps(a, theirs)) == ["ls0"]
        assert vsnaps(a, theirs)["ls0"]["expires_at"].startswith("0001-01-01")  # never, as on LXD
        assert (vol_path(a, theirs) / "marker").read_text() == "lxd"
        assert (snap_path(a, theirs, "ls0") / "marker").read_text() == "lsnap"
        assert leftovers(a) == []
    finally:
        a.lxc("storage", "volume", "delete", POOL, ours, check=False)
        a.lxc("storage", "volume", "delete", POOL, theirs, check=False)
        lxd.lxc("storage", "volume", "delete", "default", ours, check=False)
        lxd.lxc("storage", "volume", "delete", "default", theirs, check=False)


@pytest.mark.parametrize("side", ["target", "source"])
def test_cancel_halfway_leaves_nothing_on_the_target(tls_pair, side):
    """Cancelling either operation while the data moves (`lxc operation delete`): B keeps no
    volume, no record and no temporary; A's volume is untouched; the sink showed `fs_progress`."""
    import subprocess

    from tests.helpers import wait_for

    a, b = tls_pair.a, tls_pair.b
    src, dst = uniq("cs"), uniq("cd")
    a.lxc("storage", "set", POOL, "rsync.bwlimit", "1000")  # 1 MB/s: 20 MB take 20 s
    copier = None
    try:
        a.lxc("storage", "volume", "create", POOL, src)
        (vol_path(a, src) / "big").write_bytes(os.urandom(20_000_000))
        copier = subprocess.Popen(a.lxc_argv("storage", "volume", "copy", f"{POOL}/{src}", f"b:{POOL}/{dst}"),
                                  env=a.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def running_op():
            for op in b.api("GET", "/1.0/operations?recursion=1").json()["metadata"].get("running") or []:
                if op["description"] == "Creating storage volume" and (op.get("metadata") or {}).get("fs_progress"):
                    return op
            return None

        op = wait_for(running_op, timeout=30)
        assert leftovers(b), "not receiving into a temporary volume"
        if side == "target":
            b.lxc("operation", "delete", op["id"])
        else:
            ops = a.api("GET", "/1.0/operations?recursion=1").json()["metadata"].get("running") or []
            mine = [o for o in ops if o["description"] == "Migrating storage volume"]
            assert len(mine) == 1, ops
            a.lxc("operation", "delete", mine[0]["id"])
        copier.communicate(timeout=60)
        assert copier.returncode != 0
        try:
            wait_for(lambda: vol(b, dst) is None and not leftovers(b) and not vol_path(b, dst).exists(), timeout=30)
        except AssertionError:
            raise AssertionError(f"left on B: {vol(b, dst)} {leftovers(b)}") from None
        assert vol(a, src) is not None and (vol_path(a, src) / "big").stat().st_size == 20_000_000
        wait_for(lambda: not (a.api("GET", "/1.0/operations").json()["metadata"].get("running") or []), timeout=30)
    finally:
        if copier is not None and copier.poll() is None:
            copier.kill()
            copier.wait()
        a.lxc("storage", "unset", POOL, "rsync.bwlimit", check=False)
        a.lxc("storage", "volume", "delete", POOL, src, check=False)
        b.lxc("storage", "volume", "delete", POOL, dst, check=False)
