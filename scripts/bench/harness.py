"""Benchmark our daemon against LXD 5.0.2 (Debian `lxd`) in the same run, interleaved.

Run through scripts/bench/run.sh (it installs Debian's lxd and cleans up even after a crash).
Suites: api (issue 2), images (issue 3), containers (issue 4), storage (issue 9, storage.py),
networks (issue 10, networks.py), remote (issue 11, remote.py), projects (issue 12, projects.py),
migration (issue 13, migration.py), guest (issue 14, guest.py);
`--only files` runs only the file transfer rows of containers. A suite a daemon cannot serve yet (its endpoint answers 404) is
skipped for that daemon with a line saying so; LXD still runs, which validates the harness.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import images  # noqa: E402
from common import MiB, UnixHTTP, daemon_memory, loadavg, run_wall, summarize, write_json  # noqa: E402
from daemons import DEBIAN_LXD, LXC, OUR_LXD, REPO, Daemon, cleanup  # noqa: E402

HERE = Path(__file__).resolve().parent
VENV_PY = REPO / ".venv" / "bin" / "python"
SUITES = ("api", "images", "containers", "storage", "networks", "remote", "projects", "migration", "guest")  # what a run without --only runs
EXTRA_SUITES = ("files",)  # only with --only: a subset of a suite above, for quicker iterations
ALIASES = {"issue2": "api", "issue3": "images", "issue4": "containers", "issue9": "storage", "issue10": "networks",
           "issue11": "remote", "issue12": "projects", "issue13": "migration", "issue14": "guest"}
POOL = "default"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        st = f.read()
    fields = st[st.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.quick = args.quick
        self.workdir = workdir
        self.prefix = "lb" + uuid.uuid4().hex[:6]  # container/profile/alias names of this run
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.raw: dict = {}
        self.loads: list[tuple[str, str]] = []
        self.ours = Daemon("ours", "ours", OUR_LXD, workdir, self.prefix)
        self.lxd = Daemon("lxd", "LXD 5.0.2", DEBIAN_LXD, workdir, self.prefix)
        self.daemons = [self.ours, self.lxd]
        self._busybox: Path | None = None
        self.footnotes: list[str] = []

    # -- helpers ---------------------------------------------------------------------
    def load(self, when: str) -> None:
        self.loads.append((when, loadavg()))
        log(f"load average ({when}): {loadavg()}")

    def order(self, i: int, daemons: list[Daemon]) -> list[Daemon]:
        """Alternate which daemon goes first, round by round."""
        return list(daemons) if i % 2 == 0 else list(reversed(daemons))

    def row(self, suite: str, name: str, unit: str, better: str, target: tuple[str, float] | None,
            values: dict[str, object]) -> None:
        """values[key]: a list of samples, a ready summary dict, or a string (skipped/failed)."""
        r = {"suite": suite, "name": name, "unit": unit, "better": better, "target": target}
        for d in self.daemons:
            v = values.get(d.key, "not run")
            if isinstance(v, list):
                v = summarize(v, higher_is_better=(better == "higher")) if v else "no samples"
            r[d.key] = v
        o, lx = r["ours"], r["lxd"]
        if isinstance(o, dict) and isinstance(lx, dict) and lx.get("median"):
            r["ratio"] = o["median"] / lx["median"]
        else:
            r["ratio"] = None
        self.rows.append(r)

    def interleave(self, what: str, n: int, daemons: list[Daemon], fn) -> tuple[dict, dict]:
        """Run fn(daemon, i) -> {metric: value} n times per daemon, alternating the order.
        A daemon that fails stops taking part in this benchmark; its error is returned."""
        samples: dict[str, dict[str, list]] = {d.key: {} for d in daemons}
        errors: dict[str, str] = {}
        for i in range(n):
            for d in self.order(i, daemons):
                if d.key in errors:
                    continue
                try:
                    res = fn(d, i)
                except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                    errors[d.key] = f"failed: {type(e).__name__}: {e}"[:300]
                    log(f"{what}: {d.label} {errors[d.key]}")
                    if self.args.verbose:
                        traceback.print_exc()
                    continue
                for k, v in res.items():
                    samples[d.key].setdefault(k, []).append(v)
        return samples, errors

    def values(self, daemons, samples, errors, metric, skipped: dict[str, str]) -> dict:
        out = dict(skipped)
        for d in daemons:
            out[d.key] = errors.get(d.key) or samples[d.key].get(metric, "no samples")
        return out

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        from daemons import needs_own_filesystem

        why = "" if self.args.var_fs == "host" else needs_own_filesystem(self.workdir)
        if why or self.args.var_fs == "ext4":
            log(f"each daemon gets its own journaled ext4 for LXD_DIR ({why or '--var-fs ext4'})")
            self.notes.append(f"LXD_DIRs on journaled ext4 loop filesystems of their own: {why or '--var-fs ext4'}")
            for d in self.daemons:
                d.own_filesystem(self.args.var_fs_gib)
        for d in self.daemons:
            log(f"starting {d.label}: {d.binary} (LXD_DIR={d.lxd_dir}, own network namespace)")
            t = time.perf_counter()
            d.start()
            d.startup_s = time.perf_counter() - t
            log(f"{d.label} ready in {d.startup_s:.2f}s (server_version {d.version}, pid {d.pid})")
        self.row("startup", "start-up to first answer", "s", "lower", None,
                 {d.key: [d.startup_s] for d in self.daemons})

    # -- issue 2: the REST core -------------------------------------------------------------
    def memory_rows(self, when: str) -> None:
        mem = {}
        for d in self.daemons:
            m = daemon_memory(d.pid, str(d.lxd_dir))
            mem[d.key] = m
            self.raw.setdefault("memory", {})[f"{d.key} {when}"] = m
        mib = lambda v: [v / MiB]  # noqa: E731
        self.row("memory", f"idle RSS {when}: daemon process", "MiB", "lower", None,
                 {k: mib(m["daemon_rss"]) for k, m in mem.items()})
        self.row("memory", f"idle RSS {when}: worker/child processes", "MiB", "lower", None,
                 {k: mib(m["children_rss"] + m["helpers_rss"]) for k, m in mem.items()})
        self.row("memory", f"idle RSS {when}: total", "MiB", "lower", ("<=", 1.0),
                 {k: mib(m["total_rss"]) for k, m in mem.items()})
        self.row("memory", f"idle PSS {when}: total", "MiB", "lower", None,
                 {k: mib(m["total_pss"]) for k, m in mem.items()})
        for k, m in mem.items():
            detail = ", ".join(f"{c['pid']} {c['rss'] / MiB:.1f} MiB" for c in m["children_detail"]) or "none"
            log(f"memory {when}: {k}: daemon {m['daemon_rss'] / MiB:.1f} MiB, "
                f"{m['children']} children ({detail}), {m['helpers']} helpers, total {m['total_rss'] / MiB:.1f} MiB")

    def loadgen(self, sock: Path, clients: int, mode: str, duration: float) -> dict:
        r = subprocess.run([str(VENV_PY), str(HERE / "loadgen.py"), "client", "--socket", str(sock),
                            "--clients", str(clients), "--mode", mode, "--duration", str(duration),
                            "--warmup", "0.5"], capture_output=True, text=True, timeout=duration + 60)
        if r.returncode != 0:
            raise RuntimeError(f"load generator failed: {r.stderr.strip()[-400:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if res["errors"]:
            raise RuntimeError(f"{res['errors']} failed requests")
        return res

    def calibrate(self, cells, duration: float) -> None:
        """The generator against a trivial server answering with a body of /1.0's size."""
        with self.ours.http() as c:
            body = c.request("GET", "/1.0").body
        bf = self.workdir / "trivial-body.json"
        bf.write_bytes(body)
        sock = self.workdir / "trivial.sock"
        srv = subprocess.Popen([str(VENV_PY), str(HERE / "loadgen.py"), "server", "--socket", str(sock),
                                "--body-file", str(bf)], stdout=subprocess.PIPE, text=True)
        try:
            srv.stdout.readline()
            cal = {}
            for clients, mode in cells:
                res = self.loadgen(sock, clients, mode, duration)
                cal[f"{clients}/{mode}"] = res
                log(f"generator ceiling, {clients} client(s) {mode}: {res['rps']:.0f} req/s against a trivial "
                    f"server, generator CPU {res['gen_cpu_us_per_req']:.1f} us/request "
                    f"(= {1e6 / res['gen_cpu_us_per_req']:.0f} req/s per CPU)")
            self.raw["generator_calibration"] = cal
            self.notes.append("load generator ceiling against a trivial uvloop server with the same body ("
                              + ", ".join(f"{k}: {v['rps']:.0f} req/s, {v['gen_cpu_us_per_req']:.0f} µs CPU/req"
                                          for k, v in cal.items())
                              + "); the generator runs in its own process on the same 2 CPUs as the daemons")
        finally:
            srv.terminate()
            srv.wait(10)

    def suite_api(self) -> None:
        a = self.args
        duration = a.duration or (2.0 if self.quick else 5.0)
        rounds = a.rounds or (1 if self.quick else 3)
        cells = [(1, "keepalive"), (8, "keepalive"), (1, "newconn"), (8, "newconn")]
        self.calibrate(cells, min(duration, 3.0))
        self.load("before GET /1.0 load")
        runs: dict[tuple, dict[str, list]] = {c: {d.key: [] for d in self.daemons} for c in cells}
        for rnd in range(rounds):
            for clients, mode in cells:
                for d in self.order(rnd, self.daemons):
                    c0 = cpu_seconds(d.pid)
                    res = self.loadgen(d.socket, clients, mode, duration)
                    # daemon CPU over the whole run (warm-up included), per measured request
                    res["daemon_cpu_us_per_req"] = (cpu_seconds(d.pid) - c0) / max(1, res["requests"]) * 1e6 \
                        * res["duration"] / (res["duration"] + 0.5)
                    runs[(clients, mode)][d.key].append(res)
                    log(f"GET /1.0 {d.label:9s} {clients} client(s) {mode:9s} round {rnd + 1}: "
                        f"{res['rps']:8.0f} req/s, p50 {res['lat_ms']['p50']:.3f} ms, "
                        f"daemon CPU {res['daemon_cpu_us_per_req']:.0f} us/req, "
                        f"generator {res['gen_cpu_us_per_req']:.1f} us/req")
        self.raw["get_1_0"] = {f"{c}/{m}": v for (c, m), v in runs.items()}
        used = {d.key: statistics.median(r["gen_cpu_s"] / r["duration"] for per in runs.values()
                                         for r in per[d.key]) for d in self.daemons}
        self.notes.append("load generator CPU use during the GET /1.0 cells (median, share of one CPU): "
                          + ", ".join(f"{d.label} {used[d.key] * 100:.0f}%" for d in self.daemons))
        for (clients, mode), per in runs.items():
            label = f"{clients} client{'s' if clients > 1 else ''}, " + (
                "keep-alive" if mode == "keepalive" else "new connection per request")
            self.row("api", f"GET /1.0 req/s ({label})", "req/s", "higher", (">=", 1.5),
                     {k: [r["rps"] for r in v] for k, v in per.items()})
            lat = {}
            for k, v in per.items():
                lat[k] = {"n": len(v), "median": statistics.median(r["lat_ms"]["p50"] for r in v),
                          "p90": statistics.median(r["lat_ms"]["p90"] for r in v)}
            self.row("api", f"GET /1.0 latency ({label})", "ms", "lower", None, lat)
            self.row("api", f"GET /1.0 daemon CPU per request ({label})", "µs", "lower", None,
                     {k: [r["daemon_cpu_us_per_req"] for r in v] for k, v in per.items()})
        # lxc info, hyperfine style: warm-up runs, then N timed runs, interleaved
        n = 6 if self.quick else 20
        for d in self.daemons:
            for _ in range(2):
                run_wall([LXC, "info"], d.env)
        samples, errors = self.interleave("lxc info", n, self.daemons,
                                          lambda d, i: {"t": run_wall([LXC, "info"], d.env) * 1000})
        self.row("api", "`lxc info` wall time", "ms", "lower", None, self.values(self.daemons, samples, errors, "t", {}))
        time.sleep(2)
        self.memory_rows("after load")

    # -- support probes -------------------------------------------------------------------------
    def supports(self, d: Daemon, *paths: str) -> str | None:
        """None when every endpoint answers; else the reason to skip."""
        with d.http() as c:
            for p in paths:
                st = c.request("GET", p).status
                if st >= 400:
                    return f"not supported by our daemon yet (GET {p} returned {st})" if d is self.ours \
                        else f"{d.label}: GET {p} returned {st}"
        return None

    def split_support(self, suite: str, *paths: str) -> tuple[list[Daemon], dict[str, str]]:
        active, skipped = [], {}
        for d in self.daemons:
            why = self.supports(d, *paths)
            if why:
                skipped[d.key] = "skipped: " + why
                log(f"{suite}: SKIPPED for {d.label}: {why}")
            else:
                active.append(d)
        return active, skipped

    def busybox(self) -> Path:
        if self._busybox is None:
            self._busybox = images.build_busybox(self.workdir, self.notes)
        return self._busybox

    # -- images (issue 3) -------------------------------------------------------------------
    def import_image(self, c: UnixHTTP, path: Path, expect_fp: str) -> str:
        r = c.call("POST", "/1.0/images", body_file=path,
                   headers={"Content-Type": "application/octet-stream", "X-LXD-filename": path.name,
                            "X-LXD-public": "0"})
        op = c.wait(r)
        fp = (op.get("metadata") or {}).get("fingerprint") or expect_fp
        if fp != expect_fp:
            raise RuntimeError(f"imported fingerprint {fp} != sha256 of the file {expect_fp}")
        return fp

    def image_cycle(self, d: Daemon, path: Path, fp: str, size: int) -> dict:
        with d.http() as c:
            t0 = time.perf_counter()
            self.import_image(c, path, fp)
            t1 = time.perf_counter()
            r = c.call("GET", f"/1.0/images/{fp}/export", discard=True)
            t2 = time.perf_counter()
            if r.length != size:
                raise RuntimeError(f"export returned {r.length} bytes, expected {size}")
            c.sync("DELETE", f"/1.0/images/{fp}")
            t3 = time.perf_counter()
        return {"import": t1 - t0, "export": t2 - t1, "delete": t3 - t2,
                "import_rate": size / MiB / (t1 - t0), "export_rate": size / MiB / (t2 - t1)}

    def lxc_import_cycle(self, d: Daemon, path: Path, fp: str) -> dict:
        t = run_wall([LXC, "image", "import", str(path)], d.env)
        with d.http() as c:
            c.sync("DELETE", f"/1.0/images/{fp}")
        return {"t": t}

    def suite_images(self) -> None:
        active, skipped = self.split_support("images", "/1.0/images")
        if not active:
            return
        small = self.busybox()
        small_fp, small_size = images.sha256_file(small), small.stat().st_size
        log(f"busybox image: {small} ({small_size / 1e6:.2f} MB, {small_fp[:12]})")
        t = time.perf_counter()
        big = images.build_big(self.workdir, self.args.big_mb, compress=self.args.big_gzip)
        big_fp, big_size = images.sha256_file(big), big.stat().st_size
        log(f"big image: {big} ({big_size / 1e6:.0f} MB, built in {time.perf_counter() - t:.1f}s)")
        self.raw["images"] = {"busybox": {"file": small.name, "size": small_size, "fingerprint": small_fp},
                              "big": {"file": big.name, "size": big_size, "fingerprint": big_fp}}
        n_small = 4 if self.quick else 12
        s, e = self.interleave("busybox image", n_small, active,
                               lambda d, i: self.image_cycle(d, small, small_fp, small_size))
        ms = {k: {m: [x * 1000 for x in v] for m, v in per.items()} for k, per in s.items()}
        name = f"busybox image ({small_size / 1e6:.1f} MB)"
        self.row("images", f"{name} import, API", "ms", "lower", ("<=", 0.5),
                 self.values(active, ms, e, "import", skipped))
        self.row("images", f"{name} export, API", "ms", "lower", ("<=", 0.5),
                 self.values(active, ms, e, "export", skipped))
        self.row("images", f"{name} delete, API", "ms", "lower", None, self.values(active, ms, e, "delete", skipped))
        s, e = self.interleave("lxc image import", 3 if self.quick else 6, active,
                               lambda d, i: self.lxc_import_cycle(d, small, small_fp))
        ms = {k: {m: [x * 1000 for x in v] for m, v in per.items()} for k, per in s.items()}
        self.row("images", f"{name} `lxc image import` wall", "ms", "lower", None,
                 self.values(active, ms, e, "t", skipped))
        n_big = 1 if self.quick else 3
        s, e = self.interleave("big image", n_big, active, lambda d, i: self.image_cycle(d, big, big_fp, big_size))
        name = f"{big_size / 1e6:.0f} MB {'gzip -1' if self.args.big_gzip else 'uncompressed'} image"
        for metric, label, unit, better, target in (
                ("import", "import, API", "s", "lower", ("<=", 0.5)),
                ("import_rate", "import throughput", "MiB/s", "higher", None),
                ("export", "export, API", "s", "lower", ("<=", 0.5)),
                ("export_rate", "export throughput", "MiB/s", "higher", None),
                ("delete", "delete, API", "s", "lower", None)):
            self.row("images", f"{name} {label}", unit, better, target, self.values(active, s, e, metric, skipped))

    # -- containers (issue 4) ------------------------------------------------------------------
    def prepare_containers(self, d: Daemon, small: Path, fp: str) -> None:
        d.preseed(POOL)  # a fresh LXD_DIR: a dir pool and the default profile's root disk
        with d.http() as c:
            if c.request("GET", f"/1.0/images/{fp}").status == 404:
                self.import_image(c, small, fp)
            c.call("POST", "/1.0/images/aliases", {"name": f"{self.prefix}-bb", "target": fp, "description": ""})
            self.ensure_root_profile(c, f"{self.prefix}-p")

    def ensure_root_profile(self, c: UnixHTTP, name: str) -> bool:
        """The profile `name` with only a root disk on the dir pool (what the containers are
        launched with); True when this call made it."""
        if c.request("GET", f"/1.0/profiles/{name}").status != 404:
            return False
        c.call("POST", "/1.0/profiles", {"name": name, "description": "benchmark: root disk only", "config": {},
                                         "devices": {"root": {"type": "disk", "path": "/", "pool": POOL}}})
        return True

    def ensure_base(self, d: Daemon, c: UnixHTTP, small: Path, fp: str) -> None:
        """What a suite's own set-up starts from: the dir pool `default` with the default profile's
        root disk (lxd init --preseed), and the busybox image; each made only when missing."""
        if c.request("GET", f"/1.0/storage-pools/{POOL}").status == 404:
            d.preseed(POOL)
        if c.request("GET", f"/1.0/images/{fp}").status == 404:
            self.import_image(c, small, fp)

    def cname(self, d: Daemon, tag: str) -> str:
        return f"{self.prefix}-{d.key[0]}{tag}"

    def create_start(self, c: UnixHTTP, name: str, fp: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        c.sync("POST", "/1.0/instances", {"name": name, "source": {"type": "image", "fingerprint": fp},
                                          "profiles": [f"{self.prefix}-p"], "config": {}, "devices": {}})
        t1 = time.perf_counter()
        c.sync("PUT", f"/1.0/instances/{name}/state", {"action": "start", "timeout": 30})
        deadline = time.monotonic() + 30
        while c.call("GET", f"/1.0/instances/{name}/state").metadata().get("status") != "Running":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not Running 30 s after start")
            time.sleep(0.005)
        return t1 - t0, time.perf_counter() - t1

    def force_delete(self, c: UnixHTTP, name: str) -> None:
        st = c.request("GET", f"/1.0/instances/{name}/state")
        if st.status == 404:
            return
        if st.metadata().get("status") not in ("Stopped", None):
            c.sync("PUT", f"/1.0/instances/{name}/state", {"action": "stop", "force": True, "timeout": -1})
        c.sync("DELETE", f"/1.0/instances/{name}")

    def exec_api(self, c: UnixHTTP, name: str) -> float:
        t = time.perf_counter()
        op = c.sync("POST", f"/1.0/instances/{name}/exec",
                    {"command": ["sh", "-c", "true"], "environment": {}, "interactive": False,
                     "wait-for-websocket": False, "record-output": False, "width": 0, "height": 0})
        dt = time.perf_counter() - t
        rc = (op.get("metadata") or {}).get("return")
        if rc != 0:
            raise RuntimeError(f"exec returned {rc!r}")
        return dt

    def lifecycle_cycle(self, d: Daemon, i: int, fp: str, n_exec: int) -> dict:
        name = self.cname(d, f"a{i}")
        out: dict = {}
        with d.http() as c:
            try:
                t0 = time.perf_counter()
                create, start = self.create_start(c, name, fp)
                out["launch"] = (time.perf_counter() - t0) * 1000
                out["create"], out["start"] = create * 1000, start * 1000
                ex = [self.exec_api(c, name) * 1000 for _ in range(n_exec)]
                out["exec_api"] = statistics.median(ex)
                out["exec_cli"] = statistics.median(
                    run_wall([LXC, "exec", name, "--", "sh", "-c", "true"], d.env) * 1000 for _ in range(max(2, n_exec // 3)))
                t = time.perf_counter()
                c.sync("PUT", f"/1.0/instances/{name}/state", {"action": "stop", "force": True, "timeout": -1})
                out["stop_force"] = (time.perf_counter() - t) * 1000
                t = time.perf_counter()
                c.sync("DELETE", f"/1.0/instances/{name}")
                out["delete"] = (time.perf_counter() - t) * 1000
            except BaseException:
                self.force_delete(c, name)
                raise
        return out

    def cli_cycle(self, d: Daemon, i: int) -> dict:
        name = self.cname(d, f"c{i}")
        try:
            launch = run_wall([LXC, "launch", f"{self.prefix}-bb", name, "-p", f"{self.prefix}-p"], d.env)
            delete = run_wall([LXC, "delete", "-f", name], d.env)
        except BaseException:
            with d.http() as c:
                self.force_delete(c, name)
            raise
        return {"launch": launch * 1000, "delete": delete * 1000}

    def file_cycle(self, d: Daemon, i: int, src: Path, src_sha: str) -> dict:
        name = self.cname(d, "f")
        size = src.stat().st_size
        out = {}
        with d.http() as c:
            t = time.perf_counter()
            c.call("POST", f"/1.0/instances/{name}/files?path=/root/blob", body_file=src,
                   headers={"Content-Type": "application/octet-stream", "X-LXD-type": "file", "X-LXD-uid": "0",
                            "X-LXD-gid": "0", "X-LXD-mode": "0644", "X-LXD-write": "overwrite"})
            out["push_api"] = size / MiB / (time.perf_counter() - t)
            t = time.perf_counter()
            r = c.call("GET", f"/1.0/instances/{name}/files?path=/root/blob", discard=True)
            out["pull_api"] = size / MiB / (time.perf_counter() - t)
            if r.length != size:
                raise RuntimeError(f"pulled {r.length} bytes, expected {size}")
        out["push_cli"] = size / MiB / run_wall([LXC, "file", "push", str(src), f"{name}/root/blob2"], d.env)
        dest = self.workdir / f"pulled-{d.key}"
        out["pull_cli"] = size / MiB / run_wall([LXC, "file", "pull", f"{name}/root/blob2", str(dest)], d.env)
        if i == 0 and images.sha256_file(dest) != src_sha:
            raise RuntimeError("the pulled file differs from the pushed one")
        dest.unlink()
        return out

    def mass(self, d: Daemon, n: int, fp: str, launch: bool) -> float:
        names = [self.cname(d, f"m{j:02d}") for j in range(n)]
        local = threading.local()
        conns: list[UnixHTTP] = []

        def one(name):
            if not hasattr(local, "c"):
                local.c = d.http()
                conns.append(local.c)
            if launch:
                self.create_start(local.c, name, fp)
            else:
                self.force_delete(local.c, name)

        t = time.perf_counter()
        try:
            with ThreadPoolExecutor(2 if launch else 4) as ex:
                list(ex.map(one, names))
        finally:
            for c in conns:
                c.close()
        return time.perf_counter() - t

    def suite_containers(self) -> None:
        self.with_containers("containers", self._containers)

    def suite_storage(self) -> None:
        """Storage (issue 9): dir and btrfs pools, snapshots, copies, backups, Debian launches, disk use."""
        import storage

        storage.StorageSuite(self).run()

    def suite_networks(self) -> None:
        """Networks (issue 10): a managed bridge per daemon, launches to a DHCP lease, `lxc list`."""
        import networks

        networks.NetworksSuite(self).run()

    def suite_remote(self) -> None:
        """Remote access (issue 11): exec, list, GET /1.0 over TLS; an image pull between two daemons."""
        import remote

        remote.RemoteSuite(self, cpu_seconds).run()

    def suite_projects(self) -> None:
        """Projects (issue 12): `lxc list` and `lxc launch` in a project against default, in one run."""
        import projects

        projects.ProjectsSuite(self).run()

    def suite_migration(self) -> None:
        """Migration (issue 13): `lxc copy` between two daemons of a kind over TLS, btrfs and dir pools."""
        import migration

        migration.MigrationSuite(self).run()

    def suite_guest(self) -> None:
        """Guest (issue 14): GET /1.0/instances?recursion=2 and GET /1.0/metrics with running containers."""
        import guest

        guest.GuestSuite(self).run()

    def suite_files(self) -> None:
        """Only the file transfer rows of the containers suite (a quicker loop for that work)."""
        self.with_containers("files", self.file_rows)

    def prepare_each(self, suite: str, what: str, active: list[Daemon], skipped: dict, prepare) -> list[Daemon]:
        """prepare(d) for each daemon: the ones ready; one that fails sits the suite out, with the
        reason in `skipped`."""
        ready = []
        for d in active:
            try:
                prepare(d)
                ready.append(d)
            except Exception as e:  # noqa: BLE001
                skipped[d.key] = f"failed: {what} ({type(e).__name__}: {e})"[:300]
                log(f"{suite}: {d.label}: {skipped[d.key]}")
        return ready

    def with_prepared(self, suite: str, what: str, paths: tuple[str, ...], prepare, teardown, run) -> None:
        """The daemons serving `paths`, each prepared (prepare(d, busybox, fp); one that fails sits
        the suite out), run(ready, skipped, fp), then teardown(d) for each (failures logged)."""
        active, skipped = self.split_support(suite, *paths)
        if not active:
            return
        small = self.busybox()
        fp = images.sha256_file(small)
        ready = self.prepare_each(suite, what, active, skipped, lambda d: prepare(d, small, fp))
        try:
            if ready:
                run(ready, skipped, fp)
        finally:
            for d in ready:
                try:
                    teardown(d)
                except Exception as e:  # noqa: BLE001
                    log(f"{d.label}: {suite} teardown: {e}")

    def with_containers(self, suite: str, run) -> None:
        """Prepare both daemons for containers (pool, image, profile), call run(active, skipped, fp),
        then delete this run's instances."""
        active, skipped = self.split_support(suite, "/1.0/images", "/1.0/instances", "/1.0/profiles",
                                             "/1.0/storage-pools")
        if not active:
            return
        small = self.busybox()
        fp = images.sha256_file(small)
        active = self.prepare_each(suite, "preparing", active, skipped,
                                   lambda d: self.prepare_containers(d, small, fp))
        if not active:
            return
        try:
            run(active, skipped, fp)
        finally:
            for d in active:
                self.delete_prefixed(d)

    def _containers(self, active: list[Daemon], skipped: dict, fp: str) -> None:
        q = self.quick
        n_exec = 6 if q else 20
        s, e = self.interleave("launch/exec/stop/delete", 3 if q else 8, active,
                               lambda d, i: self.lifecycle_cycle(d, i, fp, n_exec))
        for metric, label, target in (
                ("launch", "launch (create + start to Running), API", ("<=", 0.4)),
                ("create", "create from image, API", None),
                ("start", "start to Running, API", None),
                ("exec_api", "exec `sh -c true`, API (median of each launch's runs)", ("<=", 0.5)),
                ("exec_cli", "`lxc exec -- sh -c true` wall", None),
                ("stop_force", "forced stop of a running container, API", ("<=", 0.2)),
                ("delete", "delete a stopped container, API", None)):
            self.row("containers", label, "ms", "lower", target, self.values(active, s, e, metric, skipped))
        self.load("after launch/exec/stop")
        s, e = self.interleave("lxc launch / delete -f", 3 if q else 6, active, self.cli_cycle)
        self.row("containers", "`lxc launch` wall", "ms", "lower", None, self.values(active, s, e, "launch", skipped))
        self.row("containers", "`lxc delete -f` of a running container, wall", "ms", "lower", ("<=", 0.2),
                 self.values(active, s, e, "delete", skipped))
        self.file_rows(active, skipped, fp)
        self.mass_containers(active, skipped, fp)

    def file_rows(self, active: list[Daemon], skipped: dict, fp: str) -> None:
        """File push/pull through the API and `lxc file`: one running container per daemon,
        --file-mib of random data, --file-rounds rounds."""
        src = images.random_file(self.workdir / "blob100", self.args.file_mib * MiB)
        src_sha = images.sha256_file(src)
        file_active = []
        for d in active:
            try:
                with d.http() as c:
                    self.create_start(c, self.cname(d, "f"), fp)
                file_active.append(d)
            except Exception as ex:  # noqa: BLE001
                skipped[d.key] = f"failed: {type(ex).__name__}: {ex}"[:300]
        rounds = self.args.file_rounds or (2 if self.quick else 4)
        s, e = self.interleave("file push/pull", rounds, file_active,
                               lambda d, i: self.file_cycle(d, i, src, src_sha))
        for metric, label in (("push_api", "file push, API"), ("pull_api", "file pull, API"),
                              ("push_cli", "`lxc file push` wall"), ("pull_cli", "`lxc file pull` wall")):
            self.row("containers", f"{label} ({self.args.file_mib} MiB)", "MiB/s", "higher",
                     (">=", 4.0) if "api" in metric else None, self.values(active, s, e, metric, skipped))
        for d in file_active:
            with d.http() as c:
                self.force_delete(c, self.cname(d, "f"))
        src.unlink()
        self.load("after files")

    def mass_containers(self, active: list[Daemon], skipped: dict, fp: str) -> None:
        n = self.args.containers or (10 if self.quick else 50)
        time.sleep(2)
        base, full, errs = {}, {}, {}
        for d in active:
            base[d.key] = daemon_memory(d.pid, str(d.lxd_dir))
            try:
                dt = self.mass(d, n, fp, launch=True)
                log(f"{d.label}: {n} containers launched in {dt:.1f}s")
            except Exception as e:  # noqa: BLE001
                errs[d.key] = f"failed: launching {n} containers: {type(e).__name__}: {e}"[:300]
                log(errs[d.key])
        ok = [d for d in active if d.key not in errs]
        time.sleep(3)
        for d in ok:
            full[d.key] = daemon_memory(d.pid, str(d.lxd_dir))
        self.raw.setdefault("memory", {}).update({f"{k} before {n} containers": v for k, v in base.items()})
        self.raw["memory"].update({f"{k} with {n} containers": v for k, v in full.items()})
        self.load(f"with {n} containers running")
        s, e = self.interleave("lxc list", 3 if self.quick else 6, ok,
                               lambda d, i: {"t": run_wall([LXC, "list"], d.env) * 1000})
        e.update(errs)
        vals = self.values(ok, s, e, "t", skipped)
        vals.update(errs)
        self.row("containers", f"`lxc list` with {n} running containers", "ms", "lower", ("<=", 0.1), vals)

        def api_list(d, i):
            with d.http() as c:
                t = time.perf_counter()
                docs = c.call("GET", "/1.0/instances?recursion=2").metadata()
                dt = time.perf_counter() - t
            if sum(1 for x in docs if x["name"].startswith(self.prefix) and x["status"] == "Running") != n:
                raise RuntimeError(f"expected {n} running containers in the list")
            return {"t": dt * 1000}

        s, e = self.interleave("GET /1.0/instances?recursion=2", 3 if self.quick else 6, ok, api_list)
        vals = self.values(ok, s, e, "t", skipped)
        vals.update(errs)
        self.row("containers", f"GET /1.0/instances?recursion=2 with {n} running", "ms", "lower", None, vals)
        mib = {k: [full[k]["total_rss"] / MiB] for k in full}
        mib.update(errs)
        mib.update({k: v for k, v in skipped.items() if k not in mib})
        self.row("containers", f"host memory, {n} running: daemon + helpers RSS", "MiB", "lower", ("<=", 0.3), mib)
        # RSS counts the pages a forked helper shares with its parent once per helper; PSS splits them.
        pss = {k: [full[k]["total_pss"] / MiB] for k in full}
        pss.update({k: v for k, v in {**skipped, **errs}.items() if k not in pss})
        self.row("containers", f"host memory, {n} running: daemon + helpers PSS", "MiB", "lower", ("<=", 0.3), pss)
        for label, key in (("daemon process RSS", "daemon_rss"), ("helpers RSS (monitors, workers)", None)):
            vals = {}
            for k in full:
                v = full[k]["daemon_rss"] if key else full[k]["helpers_rss"] + full[k]["children_rss"]
                vals[k] = [v / MiB]
            vals.update({k: v for k, v in {**skipped, **errs}.items() if k not in vals})
            self.row("containers", f"host memory, {n} running: {label}", "MiB", "lower", None, vals)
        inc = {k: [(full[k]["total_rss"] - base[k]["total_rss"]) / n / MiB] for k in full}
        inc.update({k: v for k, v in {**skipped, **errs}.items() if k not in inc})
        self.row("containers", "host memory per running container (RSS increment)", "MiB", "lower", None, inc)
        incp = {k: [(full[k]["total_pss"] - base[k]["total_pss"]) / n / MiB] for k in full}
        incp.update({k: v for k, v in {**skipped, **errs}.items() if k not in incp})
        self.row("containers", "host memory per running container (PSS increment)", "MiB", "lower", None, incp)
        for d in active:
            t = time.perf_counter()
            self.mass(d, n, fp, launch=False)
            log(f"{d.label}: {n} containers deleted in {time.perf_counter() - t:.1f}s")

    def delete_prefixed(self, d: Daemon) -> None:
        """Best effort: force-delete every instance of this run on a daemon."""
        try:
            with d.http() as c:
                r = c.request("GET", "/1.0/instances")
                if r.status != 200:
                    return
                for url in r.metadata() or []:
                    name = url.rsplit("/", 1)[-1]
                    if name.startswith(self.prefix):
                        try:
                            self.force_delete(c, name)
                        except Exception as e:  # noqa: BLE001
                            log(f"could not delete {name} on {d.label}: {e}")
        except OSError as e:
            log(f"could not list instances on {d.label}: {e}")

    # -- output ---------------------------------------------------------------------------------
    def table(self) -> str:
        def fmt(v) -> str:
            if v is None or (isinstance(v, float) and v != v):
                return "—"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"

        self.footnotes: list[str] = []

        def note(text: str) -> str:
            word = text.split(":", 1)[0]
            if text not in self.footnotes:
                self.footnotes.append(text)
            return f"{word} [{self.footnotes.index(text) + 1}]"

        lines = ["| suite | benchmark | unit | ours median | ours p90 | LXD median | LXD p90 | ours/LXD | target |",
                 "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            cells = []
            for k in ("ours", "lxd"):
                v = r[k]
                if isinstance(v, dict):
                    cells += [fmt(v.get("median")), fmt(v.get("p90")) if v.get("n", 1) > 1 else "—"]
                else:
                    cells += [note(str(v).replace("|", "/")), ""]
            ratio = "—"
            if r["ratio"] is not None:
                ratio = f"{r['ratio']:.2f}"
                if r["target"]:
                    op, want = r["target"]
                    ok = r["ratio"] <= want if op == "<=" else r["ratio"] >= want
                    ratio += " ✓" if ok else " ✗"
            target = f"{r['target'][0]} {r['target'][1]}" if r["target"] else ""
            lines.append(f"| {r['suite']} | {r['name']} | {r['unit']} | " + " | ".join(cells)
                         + f" | {ratio} | {target} |")
        return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[],
                    help="run only this suite: api|images|containers|storage|networks|remote|projects|migration|guest "
                         "(or issue2|3|4|9|10|11|12|13|14), "
                         "or files "
                         "(only the file push/pull rows of containers); repeatable")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and shorter cells (a smoke run)")
    ap.add_argument("--rounds", type=int, default=0, help="GET /1.0 rounds per cell (default 3, quick 1)")
    ap.add_argument("--duration", type=float, default=0, help="seconds per GET /1.0 cell (default 5, quick 2)")
    ap.add_argument("--containers", type=int, default=0, help="containers for `lxc list`/memory (default 50, quick 10)")
    ap.add_argument("--big-mb", type=int, default=200, help="size of the big image in MB (default 200)")
    ap.add_argument("--big-gzip", action="store_true", help="compress the big image with gzip -1 (default: none)")
    ap.add_argument("--file-mib", type=int, default=100, help="file push/pull size in MiB (default 100)")
    ap.add_argument("--file-rounds", type=int, default=0, help="file push/pull rounds (default 4, quick 2)")
    ap.add_argument("--btrfs-size", type=int, default=8, help="storage: btrfs loop file size in GiB (default 8)")
    ap.add_argument("--data-mb", type=int, default=500, help="storage: MB of data in the big containers (default 500)")
    ap.add_argument("--debian-image", default="", help="storage: a Debian image file to use instead of building "
                    "one with lxd-imagebuilder debian")
    ap.add_argument("--debian-rounds", type=int, default=0, help="storage: Debian launch rounds (default 2, quick 1)")
    ap.add_argument("--rest-s", type=int, default=75, help="storage: seconds of rest before the second disk "
                    "measurement (default 75: our dir pools drop an image cache and its spares 60 s after the last launch)")
    ap.add_argument("--var-fs", choices=("auto", "host", "ext4"), default="auto",
                    help="where LXD_DIRs live: auto (their own journaled ext4 when the work dir is on ext4 "
                    "without a journal, see daemons.needs_own_filesystem), host, or always ext4")
    ap.add_argument("--var-fs-gib", type=int, default=40, help="size of each daemon's ext4 (sparse, default 40)")
    ap.add_argument("--storage-steps", default="",
                    help="storage: run only these steps, comma-separated (btrfs_busybox, dir_500, export_import, "
                    "debian_launches, debian_disk)")
    ap.add_argument("--migration-mb", type=int, default=0,
                    help="migration: MB of data in the copied container (default 500, quick 50)")
    ap.add_argument("--migration-rounds", type=int, default=0, help="migration: rounds (default 3, quick 2)")
    ap.add_argument("--wait-load", type=float, default=0,
                    help="first wait (at most 10 min) until the 1-minute load average is below this")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    suites = []
    for o in args.only:
        for name in o.split(","):
            name = ALIASES.get(name.strip(), name.strip())
            if name not in SUITES + EXTRA_SUITES:
                ap.error(f"unknown suite {name!r} (choose from {', '.join(SUITES + EXTRA_SUITES)})")
            suites.append(name)
    suites = [s for s in SUITES + EXTRA_SUITES if s in suites] if suites else list(SUITES)

    if os.geteuid() != 0:
        print("the benchmarks need root (they start LXD and containers)", file=sys.stderr)
        return 2
    for binary in (OUR_LXD, DEBIAN_LXD):
        if not Path(binary).exists():
            print(f"{binary} is missing (run scripts/bench/run.sh, which installs it)", file=sys.stderr)
            return 2

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    env_dir = os.environ.get("LXDBENCH_WORKDIR")
    workdir = Path(env_dir) if env_dir else Path(tempfile.mkdtemp(prefix="lxdbench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o711)  # unprivileged container roots must traverse into their rootfs
    b = Bench(args, workdir)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log(f"benchmark run {b.prefix}: suites {', '.join(suites)}{' (quick)' if args.quick else ''}; "
        f"work dir {workdir}; {os.cpu_count()} CPUs")
    if args.wait_load:
        deadline = time.monotonic() + 600
        while os.getloadavg()[0] > args.wait_load and time.monotonic() < deadline:
            log(f"waiting for the load average to drop below {args.wait_load} (now {loadavg()})")
            time.sleep(15)
    b.load("start")
    rc = 0
    try:
        b.start()
        settle = 2 if args.quick else 5
        time.sleep(settle)
        b.memory_rows("after start-up")
        for s in suites:
            b.load(f"before {s}")
            t = time.perf_counter()
            try:
                getattr(b, f"suite_{s}")()
            except Exception as e:  # noqa: BLE001 - keep the other suites' results
                rc = 1
                b.notes.append(f"{s}: suite aborted: {type(e).__name__}: {e}")
                log(f"suite {s} aborted: {type(e).__name__}: {e}")
                traceback.print_exc()
            log(f"suite {s} took {time.perf_counter() - t:.0f}s")
        b.load("end")
    finally:
        log("cleaning up: this run's containers, both daemons, the work directory")
        for d in b.daemons:
            if d.pid is not None:
                try:
                    b.delete_prefixed(d)
                    d.stop()
                except Exception as e:  # noqa: BLE001
                    log(f"stopping {d.label}: {e}")
        cleanup(workdir, log=log)

    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta = {
        "started": started, "prefix": b.prefix, "suites": suites, "quick": args.quick,
        "argv": sys.argv[1:], "git": git.stdout.strip(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "ours_version": b.ours.version, "lxd_version": b.lxd.version, "load_average": b.loads, "notes": b.notes,
    }
    out = REPO / "bench-results" / (time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ".json")
    write_json(out, {"meta": meta, "rows": b.rows, "raw": b.raw})
    print()
    print(f"## Benchmarks: ours (git {meta['git']}) vs LXD {b.lxd.version} (Debian), same run, interleaved")
    print()
    print(f"{started}, git {meta['git']}, kernel {meta['kernel']}, {meta['cpus']} CPUs; "
          "load average (1/5/15 min): " + "; ".join(f"{w}: {lavg}" for w, lavg in b.loads))
    print()
    print(b.table())
    print()
    print("p90 is on the worse side (the 10th percentile for rates). ours/LXD compares medians; "
          "✓/✗ against the issue's target.")
    print()
    for i, text in enumerate(b.footnotes, 1):
        print(f"[{i}] {text}")
    for n in b.notes:
        print(f"- {n}")
    print(f"\nJSON: {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
