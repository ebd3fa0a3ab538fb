"""migration/criu.py: the CRIU probe (cached, with its reason), the exact lxc-checkpoint command
lines, CRIU's stats image, and the pre-dump rounds, run through the real runtime workers with
fake `criu` / `lxc-checkpoint` tools on PATH that record their argv (only the tool is replaced)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.migration import criu
from lxd_daemon.runtime.client import RuntimeClient, StartFailed
from lxd_daemon.runtime.pool import WorkerPool
from tests.helpers import write_tool

FAKE_CRIU = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$*" in
  --version) echo "Version: 9.9.9"; exit 0 ;;
  check) [ -n "$FAKE_CHECK_FAIL" ] && { echo "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds" >&2;
         echo "Error (criu/crtools.c:260): Could not initialize kernel features detection." >&2; exit 1; }
         echo "Looks good."; exit 0 ;;
  "check --feature mem_dirty_track") exit ${FAKE_NO_PREDUMP:+1}0 ;;
esac
exit 3
"""

# Records its argv (one line per call, NUL-free) and drops the stats image prepared for the
# round (the -D directory's name) into that directory, as CRIU does.
FAKE_CHECKPOINT = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG"
dir=""; prev=""
for a in "$@"; do [ "$prev" = "-D" ] && dir="$a"; prev="$a"; done
if [ -f "$FAKE_FAIL" ]; then echo "Error (criu/cr-dump.c:1): Dumping FAILED." >&2; exit 1; fi
base=$(basename "$dir")
[ -f "$FAKE_STATS/$base" ] && cp "$FAKE_STATS/$base" "$dir/stats-dump"
exit 0
"""


@pytest.fixture
def fakebin(tmp_path, monkeypatch):
    d = tmp_path / "bin"
    d.mkdir()
    log = tmp_path / "argv.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    # set before any worker starts (a worker keeps the environment it was spawned with)
    (tmp_path / "stats").mkdir()
    monkeypatch.setenv("FAKE_STATS", str(tmp_path / "stats"))
    monkeypatch.setenv("FAKE_FAIL", str(tmp_path / "fail"))
    monkeypatch.setenv("PATH", f"{d}:{os.environ['PATH']}")

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    return d, calls


# -- the probe ---------------------------------------------------------------------------------
def test_probe_of_a_working_criu_is_cached(fakebin):
    d, calls = fakebin
    write_tool(d, "criu", FAKE_CRIU)
    probe = criu.Probe()

    async def go():
        return await probe.status(), await probe.status(), await probe.require("A stateful stop")

    a, b, c = asyncio.run(go())
    assert a == b == c == criu.Status(True, "", "9.9.9", predump=True)
    assert calls() == ["--version", "check", "check --feature mem_dirty_track"]  # asked once


def test_probe_failure_keeps_criu_reason_and_refuses(fakebin, monkeypatch):
    d, calls = fakebin
    write_tool(d, "criu", FAKE_CRIU)
    monkeypatch.setenv("FAKE_CHECK_FAIL", "1")
    probe = criu.Probe()
    st = asyncio.run(probe.status())
    assert not st.usable and st.version == "9.9.9"
    assert st.reason == "`criu check` failed: Could not initialize kernel features detection."
    with pytest.raises(BadRequest) as e:
        asyncio.run(probe.require("A stateful stop"))
    assert e.value.status == 400
    assert e.value.message.startswith("A stateful stop needs CRIU, which doesn't work on this server: `criu check`")
    assert calls() == ["--version", "check"]  # cached: the refusal asked nothing more
    monkeypatch.delenv("FAKE_CHECK_FAIL")
    assert asyncio.run(probe.status(refresh=True)).usable  # an explicit refresh asks again


def test_probe_without_pre_copy(fakebin, monkeypatch):
    d, _ = fakebin
    write_tool(d, "criu", FAKE_CRIU)
    monkeypatch.setenv("FAKE_NO_PREDUMP", "1")
    st = asyncio.run(criu.Probe().status())
    assert st.usable and not st.predump


def test_probe_without_thewrite_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    st = asyncio.run(criu.Probe().status())
    assert st == criu.Status(False, "the criu tool is not installed")


@pytest.mark.skipif(not shutil.which("criu"), reason="criu not installed")
def test_probe_of_this_host_matches_criu_check():
    r = subprocess.run(["criu", "check"], capture_output=True, text=True)
    st = asyncio.run(criu.Probe().status())
    assert st.usable == (r.returncode == 0)
    if not st.usable:
        assert st.reason.startswith("`criu check` failed: ") and st.reason.split(": ", 1)[1] in r.stderr


def test_startup_advertises_only_when_criu_works(fakebin, monkeypatch):
    d, _ = fakebin
    write_tool(d, "criu", FAKE_CRIU)

    class Server:
        def __init__(self):
            self.names: list[str] = []

        def advertise(self, *names):
            self.names.extend(names)

    class Services:
        server = Server()

    for fail, want in (("1", []), ("", ["migration_pre_copy"])):
        monkeypatch.setenv("FAKE_CHECK_FAIL", fail)
        s = Services()
        s.server = Server()
        monkeypatch.setattr(criu, "PROBE", criu.Probe())
        asyncio.run(criu.startup(s, delay=0))
        assert s.server.names == want
        assert criu.PROBE.cached() is not None  # probed either way


# -- command lines -----------------------------------------------------------------------------
def test_exact_command_lines():
    assert criu.dump_argv("c1", "/var/lib/lxd/containers", "/logs/c1/lxc.conf", "/var/lib/lxd/containers/c1/state",
                          logfile="/logs/c1/cp.log") == [
        "lxc-checkpoint", "-n", "c1", "-P", "/var/lib/lxd/containers", "--rcfile=/logs/c1/lxc.conf",
        "-D", "/var/lib/lxd/containers/c1/state", "-v", "-o", "/logs/c1/cp.log", "-l", "INFO", "-s"]
    assert criu.dump_argv("c1", "/L", "/c", "/s/final", predump_dir="../002") == [
        "lxc-checkpoint", "-n", "c1", "-P", "/L", "--rcfile=/c", "-D", "/s/final", "-v", "-s", "--predump-dir=../002"]
    assert criu.dump_argv("c1", "/L", "/c", "/s", stop=False) == [
        "lxc-checkpoint", "-n", "c1", "-P", "/L", "--rcfile=/c", "-D", "/s", "-v"]
    assert criu.predump_argv("c1", "/L", "/c", "/s/001", predump_dir="../000") == [
        "lxc-checkpoint", "-n", "c1", "-P", "/L", "--rcfile=/c", "-D", "/s/001", "-v", "-p", "--predump-dir=../000"]
    assert criu.restore_argv("c1", "/L", "/c", "/s") == [
        "lxc-checkpoint", "-r", "-n", "c1", "-P", "/L", "--rcfile=/c", "-D", "/s", "-v", "-d"]


def test_lxc_checkpoint_accepts_these_options():
    """The installed lxc-checkpoint knows every option the command lines use."""
    if not shutil.which("lxc-checkpoint"):
        pytest.skip("lxc-checkpoint not installed")
    r = subprocess.run(["lxc-checkpoint", "--help"], capture_output=True, text=True)
    text = r.stdout + r.stderr
    for opt in ("--name", "--lxcpath", "--rcfile", "--checkpoint-dir", "--verbose", "--stop", "--pre-dump",
                "--predump-dir", "--restore", "--daemon", "--logfile", "--logpriority"):
        assert opt in text, opt


def test_pre_copy_config():
    assert criu.PreCopy.from_config({}) == criu.PreCopy(False, 10, 70)
    assert criu.PreCopy.from_config({"migration.incremental.memory": "true",
                                     "migration.incremental.memory.iterations": "3",
                                     "migration.incremental.memory.goal": "90"}) == criu.PreCopy(True, 3, 90)
    with pytest.raises(BadRequest, match="goal"):
        criu.PreCopy.from_config({"migration.incremental.memory.goal": "101"})
    with pytest.raises(BadRequest, match="not an integer"):
        criu.PreCopy.from_config({"migration.incremental.memory.iterations": "many"})


# -- CRIU's stats image (made by CRIU's own `crit`) ----------------------------------------------
def crit_stats(path: Path, written: int, skipped: int) -> Path:
    if not shutil.which("crit"):
        pytest.skip("crit (criu) not installed")
    src = path.with_suffix(".json")
    src.write_text(json.dumps({"magic": "STATS", "entries": [{"dump": {
        "freezing_time": 1, "frozen_time": 2, "memdump_time": 3, "memwrite_time": 4, "pages_scanned": written + skipped,
        "pages_skipped_parent": skipped, "pages_written": written, "irmap_resolve": 0, "pages_lazy": 0,
        "page_pipes": 1, "page_pipe_bufs": 1}}]}))
    subprocess.run(["crit", "encode", "-i", str(src), "-o", str(path)], check=True)
    return path


def test_stats_image(tmp_path):
    img = crit_stats(tmp_path / "stats-dump", 20, 80)
    st = criu.parse_stats(img.read_bytes())
    assert st == criu.DumpStats(20, 80) and st.unchanged_percent == 80.0
    assert criu.read_stats(tmp_path) == st
    with pytest.raises(ValueError):
        criu.parse_stats(b"\0" * 16)
    assert criu.read_stats(tmp_path / "missing") is None


# -- through the real runtime workers ------------------------------------------------------------
@pytest.fixture
def runtime(fakebin):
    """A real worker pool, spawned after PATH holds the fake tools (the workers inherit it)."""
    loop = asyncio.new_event_loop()
    pool = WorkerPool(1)
    pool.spawn()
    pool.attach(loop)
    yield RuntimeClient(pool), loop.run_until_complete
    pool.close()
    loop.close()


def test_pre_dump_rounds_until_the_goal(fakebin, runtime, tmp_path, monkeypatch):
    d, calls = fakebin
    write_tool(d, "lxc-checkpoint", FAKE_CHECKPOINT)
    stats = tmp_path / "stats"
    crit_stats(stats / "000", 100, 0)
    crit_stats(stats / "001", 50, 50)  # 50% unchanged: below the goal
    crit_stats(stats / "002", 20, 80)  # 80%: the last pre-dump
    client, run = runtime
    state = tmp_path / "state"
    rounds: list[tuple[str, bool, bool]] = []

    async def after(directory: Path, final: bool) -> None:
        rounds.append((directory.name, final, (directory / "stats-dump").exists()))

    final = run(criu.live_checkpoint(client, "c1", "/L", "/c.conf", state, criu.PreCopy(True, 10, 70),
                                     predump_supported=True, after_round=after))
    assert final == state / "final"
    assert rounds == [("000", False, True), ("001", False, True), ("002", True, True)]
    assert calls() == [
        f"-n c1 -P /L --rcfile=/c.conf -D {state}/000 -v -p",
        f"-n c1 -P /L --rcfile=/c.conf -D {state}/001 -v -p --predump-dir=../000",
        f"-n c1 -P /L --rcfile=/c.conf -D {state}/002 -v -p --predump-dir=../001",
        f"-n c1 -P /L --rcfile=/c.conf -D {state}/final -v -s --predump-dir=../002",
    ]


def test_rounds_stop_at_iterations_and_without_pre_copy(fakebin, runtime, tmp_path, monkeypatch):
    d, calls = fakebin
    write_tool(d, "lxc-checkpoint", FAKE_CHECKPOINT)
    # no stats images: only `iterations` ends the rounds
    client, run = runtime
    state = tmp_path / "s"
    run(criu.live_checkpoint(client, "c1", "/L", "/c", state, criu.PreCopy(True, 2, 70), predump_supported=True))
    assert [c.split(" -v ")[1] for c in calls()] == ["-p", "-p --predump-dir=../000", "-s --predump-dir=../001"]
    (tmp_path / "argv.log").unlink()
    for precopy, supported in ((criu.PreCopy(False), True), (criu.PreCopy(True), False)):
        run(criu.live_checkpoint(client, "c1", "/L", "/c", state, precopy, predump_supported=supported))
    assert calls() == [f"-n c1 -P /L --rcfile=/c -D {state}/final -v -s"] * 2


def test_a_failed_dump_is_an_error_with_criu_reason(fakebin, runtime, tmp_path, monkeypatch):
    d, calls = fakebin
    write_tool(d, "lxc-checkpoint", FAKE_CHECKPOINT)
    (tmp_path / "fail").touch()
    client, run = runtime
    with pytest.raises(LXDError) as e:
        run(criu.checkpoint(client, "c1", "/L", "/c", tmp_path / "st", stop=True))
    assert "Failed to checkpoint the container" in e.value.message and "Dumping FAILED" in e.value.message
    assert calls() == [f"-n c1 -P /L --rcfile=/c -D {tmp_path}/st -v -s"]


def test_worker_refuses_other_command_lines(fakebin, runtime):
    client, run = runtime
    with pytest.raises(LXDError, match="not an lxc-checkpoint dump"):
        run(client.checkpoint("c1", ["sh", "-c", "true"], 5))
    with pytest.raises(LXDError, match="not an lxc-checkpoint restore"):
        run(client.restore("c1", "/L", ["lxc-checkpoint", "-n", "c1"], 5))


def test_restore_runs_lxc_checkpoint_r_and_needs_the_images(fakebin, runtime, tmp_path, monkeypatch):
    d, calls = fakebin
    monkeypatch.setattr(criu, "RESTORE_TIMEOUT", 1.0)  # how long the worker waits for RUNNING
    write_tool(d, "lxc-checkpoint", FAKE_CHECKPOINT)
    client, run = runtime
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(BadRequest, match="no saved state"):
        run(criu.restore(client, "c1", str(tmp_path), "/c", state))
    assert calls() == []
    (state / "inventory.img").write_bytes(b"x")
    # armed, a start restores instead of booting; the fake restores nothing, so no container runs
    client.arm_restore("c1", str(state))
    with pytest.raises(StartFailed) as e:
        run(client.start("c1", str(tmp_path), "/c"))
    assert "did not reach RUNNING" in e.value.reason
    assert calls() == [f"-r -n c1 -P {tmp_path} --rcfile=/c -D {state} -v -d"]
    assert "c1" not in client._restore_from  # one start only


# -- stateful snapshots: the state directory's life ----------------------------------------------
class _Instances:
    """The few things of the instances service that `snapshot_state` reads (the service itself
    runs in tests/integration/test_stateful.py)."""

    def __init__(self, root: Path, client, status: str):
        self.lxcpath = root / "containers"
        self.logs_root = root / "logs"
        self.liblxc = client
        self.status = status

    def status_of(self, name):
        return self.status, 1

    def record(self, name):
        class Rec:
            stateful = False

        return Rec()


def test_snapshot_state_dumps_left_running_and_always_drops_the_copy(fakebin, runtime, tmp_path, monkeypatch):
    d, calls = fakebin
    write_tool(d, "criu", FAKE_CRIU)
    write_tool(d, "lxc-checkpoint", FAKE_CHECKPOINT)
    monkeypatch.setattr(criu, "PROBE", criu.Probe())
    client, run = runtime
    svc = _Instances(tmp_path, client, "Running")
    state = tmp_path / "containers" / "c1" / "state"

    async def take(fail: bool) -> bool:
        async with criu.snapshot_state(svc, "c1") as st:
            seen = st == state and st.is_dir()
            (st / "inventory.img").write_bytes(b"x")  # (the snapshot copies the volume here)
            assert criu.has_state(svc, "c1")
            if fail:
                raise LXDError("the snapshot failed")
        return seen

    assert run(take(False)) and not state.exists()
    with pytest.raises(LXDError, match="the snapshot failed"):
        run(take(True))
    assert not state.exists()
    dumps = [c for c in calls() if c.startswith("-n ")]
    assert dumps == [f"-n c1 -P {tmp_path}/containers --rcfile={tmp_path}/logs/c1/lxc.conf -D {state} -v "
                     f"-o {tmp_path}/logs/c1/lxc-checkpoint.log -l INFO"] * 2  # no -s: it keeps running

    (tmp_path / "fail").touch()  # a failed dump: CRIU's words, the body never runs, no state left
    with pytest.raises(LXDError, match="Dumping FAILED"):
        run(take(False))
    assert not state.exists()
    (tmp_path / "fail").unlink()

    svc.status = "Stopped"
    with pytest.raises(BadRequest, match="isn't running"):
        run(take(False))
    monkeypatch.setenv("FAKE_CHECK_FAIL", "1")
    monkeypatch.setattr(criu, "PROBE", criu.Probe())
    svc.status = "Running"
    n = len(calls())
    with pytest.raises(BadRequest, match="A stateful snapshot needs CRIU"):
        run(take(False))
    assert [c for c in calls()[n:] if c.startswith("-n ")] == []  # refused before any dump
