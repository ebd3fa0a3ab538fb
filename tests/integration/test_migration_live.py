"""Live migration (`lxc move`/`lxc copy` of a running container without --stateless) between two
daemons of ours, with CRIU's tools replaced.

CRIU can't run on this host, so both daemons of this module's pair have on their PATH a fake
`criu` (it passes the probe, dirty-page tracking included) and a fake `lxc-checkpoint` that
records its argv; "dumps" by writing an inventory image naming the container and the round (a
pre-dump round also CRIU's stats image, a round with `--predump-dir` CRIU's `parent` link) and, for
the final dump, killing the container; and "restores" by booting it with lxc-start, after logging
which dump it restores and what the images directory holds. Everything else is the daemons' own
code: the `criu` websocket, the pre-dump rounds and their MigrationSync messages, the final
files' pass, the sink's restore, the source's rollback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import make_tls_pair
from tests.helpers import FAKE_CRIU, init_pid, run_prefix, wait_for, write_tool

pytestmark = pytest.mark.integration

FAKE_CHECKPOINT = r'''#!/usr/bin/python3
import os, struct, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(argv) + "\n")
opt = {}
for i, a in enumerate(argv):
    if a in ("-n", "-P", "-D") and i + 1 < len(argv):
        opt[a] = argv[i + 1]
    elif a.startswith("--rcfile="):
        opt["conf"] = a.split("=", 1)[1]
    elif a.startswith("--predump-dir="):
        opt["prev"] = a.split("=", 1)[1]
name, lxcpath, d = opt["-n"], opt["-P"], opt["-D"]
if os.path.exists(os.environ["FAKE_FAIL"]):
    sys.stderr.write("Error (criu/cr-dump.c:1): Dumping FAILED.\n")
    sys.exit(1)
if "-r" in argv:
    inv = os.path.join(d, "inventory.img")
    if not os.path.exists(inv):
        sys.stderr.write("no images in " + d + "\n")
        sys.exit(2)
    parent = os.path.join(d, "parent")
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write("restored-from: " + open(inv).read().strip() + "\n")
        f.write("images: " + " ".join(sorted(os.listdir(os.path.dirname(d.rstrip("/"))))) + " parent="
                + (os.readlink(parent) if os.path.islink(parent) else "-") + "\n")
    os.execvp("lxc-start", ["lxc-start", "-n", name, "-P", lxcpath, "-f", opt["conf"]])
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, "inventory.img"), "w") as f:
    f.write(name + " " + os.path.basename(d.rstrip("/")) + "\n")
if "prev" in opt:
    os.symlink(opt["prev"], os.path.join(d, "parent"))
if "-p" in argv:  # CRIU's stats: the first round writes every page, the next ones few
    n = int(os.path.basename(d.rstrip("/")))
    written, skipped = (100, 0) if n == 0 else (10, 90)
    inner = bytes([0x30, skipped, 0x38, written])
    entry = bytes([0x0A, len(inner)]) + inner
    with open(os.path.join(d, "stats-dump"), "wb") as f:
        f.write(struct.pack("<III", 0x55105940, 0x57093306, len(entry)) + entry)
if "-s" in argv:
    subprocess.run(["lxc-stop", "-k", "-n", name, "-P", lxcpath], check=True)
'''


def _env(tag: str, base: Path) -> dict:
    bindir = base / "bin"
    if not bindir.exists():
        bindir.mkdir()
        write_tool(bindir, "criu", FAKE_CRIU)
        write_tool(bindir, "lxc-checkpoint", FAKE_CHECKPOINT)
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_LOG": str(base / tag / "argv.log"),
            "FAKE_FAIL": str(base / tag / "fail")}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    yield from make_tls_pair(tmp_path_factory, _env)


_N = iter(range(1000))


def uniq(tag: str) -> str:
    return f"{run_prefix()}-l{tag}{next(_N)}"


def log_of(d) -> Path:
    return d.lxd_dir.parent / "argv.log"


def fail_flag(d) -> Path:
    return d.lxd_dir.parent / "fail"


def lines_after(d, n: int) -> list[str]:
    p = log_of(d)
    return p.read_text().splitlines()[n:] if p.exists() else []


def mark(d) -> int:
    return len(lines_after(d, 0))


def status(d, name: str) -> str | None:
    r = d.api("GET", f"/1.0/instances/{name}")
    return r.json()["metadata"]["status"] if r.status_code == 200 else None


def leftovers(d) -> list[str]:
    """What live migrations left in `$LXD_DIR/migration` (CRIU images)."""
    root = d.lxd_dir / "migration"
    return sorted(os.listdir(root)) if root.exists() else []


def launch(d, name: str) -> None:
    d.lxc("launch", "busybox", name)
    d.lxc("exec", name, "--", "sh", "-c", "echo live > /marker")


def wait_advertised(d) -> None:
    wait_for(lambda: "migration_pre_copy" in d.api("GET", "/1.0").json()["metadata"]["api_extensions"],
             timeout=30)  # the pre-copy extension, once CRIU's probe passed


@pytest.mark.parametrize("mode", ["pull", "push", "relay"])
def test_live_move_with_precopy(pair, mode):
    """`lxc move c b:c` of a running container: two pre-dump rounds (the second one's stats end
    them), the final dump stopping it on A, its images over `criu` (every round's, with the
    `parent` link), B restoring it from the final dump; nothing left on A."""
    a, b = pair.a, pair.b
    wait_advertised(a)
    wait_advertised(b)
    name = uniq("mv")
    launch(a, name)
    a.lxc("config", "set", name, "migration.incremental.memory", "true")
    na, nb = mark(a), mark(b)
    try:
        a.lxc("move", name, f"b:{name}", f"--mode={mode}")
        assert status(a, name) is None
        assert status(b, name) == "Running"
        assert b.lxc("exec", name, "--", "cat", "/marker").stdout.strip() == "live"

        dumps = lines_after(a, na)
        assert len(dumps) == 3, dumps
        state = dumps[0].split(" -D ", 1)[1].split()[0].rsplit("/", 1)[0]
        assert Path(state).parent == a.lxd_dir / "migration"
        conf = a.lxd_dir / "logs" / name / "lxc.conf"
        common = f"-n {name} -P {a.lxd_dir / 'containers'} --rcfile={conf}"
        tail = f"-v -o {a.lxd_dir / 'logs' / name / 'lxc-checkpoint.log'} -l INFO"
        assert dumps[0] == f"{common} -D {state}/000 {tail} -p"
        assert dumps[1] == f"{common} -D {state}/001 {tail} -p --predump-dir=../000"
        assert dumps[2] == f"{common} -D {state}/final {tail} -s --predump-dir=../001"

        restores = lines_after(b, nb)
        assert len(restores) == 3, restores
        assert restores[0].startswith(f"-r -n {name} -P {b.lxd_dir / 'containers'} ")
        assert f"/final -v -o {b.lxd_dir / 'logs' / name / 'lxc-checkpoint.log'} -l INFO -d" in restores[0]
        assert restores[1] == f"restored-from: {name} final"
        assert restores[2] == "images: 000 001 final parent=../001"
        assert leftovers(a) == [] and leftovers(b) == []
    finally:
        a.lxc("delete", "-f", name, check=False)
        b.lxc("delete", "-f", name, check=False)


def test_live_copy_without_precopy_then_failed_restore_rolls_back(pair):
    """Without migration.incremental.memory: one dump, no rounds. A copy whose restore fails on
    B leaves nothing on B, and A's container runs again, restored from its own final dump."""
    a, b = pair.a, pair.b
    wait_advertised(a)
    name, dst = uniq("cp"), uniq("cpd")
    launch(a, name)
    try:
        na, nb = mark(a), mark(b)
        fail_flag(b).touch()
        try:
            r = a.lxc("copy", name, f"b:{dst}", check=False)
        finally:
            fail_flag(b).unlink()
        assert r.returncode != 0 and "Dumping FAILED" in r.stderr, r.stderr
        assert status(b, dst) is None
        assert not list((b.lxd_dir / "storage-pools").glob(f"*/containers/*{dst}*"))
        # (the client returns once B's operation failed; A's rollback follows when A hears it)
        wait_for(lambda: status(a, name) == "Running", timeout=30)
        dumps = lines_after(a, na)
        assert [ln.split(" -D ")[1].split()[0].rsplit("/", 1)[1] for ln in dumps if not ln.startswith(
            ("-r", "restored-from", "images"))] == ["final"], dumps
        assert dumps[-3].startswith(f"-r -n {name} ") and dumps[-2] == f"restored-from: {name} final", dumps
        assert len(lines_after(b, nb)) == 1  # B's one restore attempt, which failed
        assert status(a, name) == "Running"
        assert a.lxc("exec", name, "--", "cat", "/marker").stdout.strip() == "live"
        assert leftovers(a) == [] and leftovers(b) == []

        # a copy that works: the source was stopped by the final dump (as LXD's), the copy runs
        a.lxc("copy", name, f"b:{dst}")
        assert status(b, dst) == "Running" and status(a, name) == "Stopped"
        assert b.lxc("exec", dst, "--", "cat", "/marker").stdout.strip() == "live"
    finally:
        a.lxc("delete", "-f", name, check=False)
        b.lxc("delete", "-f", dst, check=False)


def test_failed_dump_leaves_the_source_running(pair):
    """A dump that fails on A: the move fails with CRIU's words, A's container runs on with the
    same init, B has nothing."""
    a, b = pair.a, pair.b
    wait_advertised(a)
    name = uniq("df")
    launch(a, name)
    try:
        pid = init_pid(a, name)
        fail_flag(a).touch()
        try:
            r = a.lxc("move", name, f"b:{name}", check=False)
        finally:
            fail_flag(a).unlink()
        assert r.returncode != 0 and "Dumping FAILED" in r.stderr, r.stderr
        assert status(a, name) == "Running" and init_pid(a, name) == pid
        assert status(b, name) is None
        assert leftovers(a) == [] and leftovers(b) == []
    finally:
        a.lxc("delete", "-f", name, check=False)
        b.lxc("delete", "-f", name, check=False)
