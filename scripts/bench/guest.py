"""The `guest` suite (issue 14): what reading a running container's state costs, ours against
LXD 5.0.2 in the same run, interleaved (the daemons alternate round by round).

With --containers (50; --quick 10) RUNNING busybox containers on each daemon (the dir pool, a
profile with only a root disk), over the unix socket, one keep-alive connection:

- `GET /1.0/instances?recursion=2`: the median of several back-to-back requests per round
  (target ours/LXD <= 0.2);
- `GET /1.0/metrics`, uncached: one request per round, each at least CACHE_S seconds after the
  daemon's previous metrics request. LXD 5.0.2 keeps each project's instance metrics for 8 s and
  answers repeated requests from that cache, so this row is the cost of one Prometheus scrape at
  any usual scrape interval (target ours/LXD <= 0.2);
- `GET /1.0/metrics`, back to back: the median of several requests in a row (LXD answers all but
  the first from its cache; ours has no cache); shown, no target;
- `/dev/lxd` `GET /1.0/config` round trip from inside a container (target <= 0.5): the test
  suite's static client (tests/integration/devlxd_client.c, built with gcc) pushed into one running
  container of each daemon, timing DEVLXD_ROUNDS round trips itself.

Every first request of a round is checked: the list holds the n running containers, the metrics
hold an `lxd_procs_total` sample for each of them. The containers, and the profile if this suite
made it, are removed at the end, before the daemons stop.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from pathlib import Path

TARGET_LIST = ("<=", 0.2)
TARGET_METRICS = ("<=", 0.2)
TARGET_DEVLXD = ("<=", 0.5)
DEVLXD_CLIENT = Path(__file__).resolve().parents[2] / "tests" / "integration" / "devlxd_client.c"
DEVLXD_ROUNDS = 200
NAME = re.compile(r'[{,]name="([^"]*)"')
CACHE_S = 8.5  # LXD 5.0.2 keeps a project's instance metrics for 8 s


class GuestSuite:
    def __init__(self, bench):
        self.b = bench
        self.args = bench.args
        self.quick = bench.quick
        self.prefix = bench.prefix
        self.profile = f"{self.prefix}-p"  # the containers suite's profile name (root disk only)
        self.made_profile: set[str] = set()
        self.n = self.args.containers or (10 if self.quick else 50)
        self.last_metrics: dict[str, float] = {}

    @staticmethod
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self, d, small, fp: str) -> None:
        with d.http() as c:
            self.b.ensure_base(d, c, small, fp)
            if self.b.ensure_root_profile(c, self.profile):
                self.made_profile.add(d.key)
        t = time.perf_counter()
        self.b.mass(d, self.n, fp, launch=True)
        self.log(f"{d.label}: {self.n} running containers in {time.perf_counter() - t:.1f}s")

    def teardown(self, d) -> None:
        t = time.perf_counter()
        try:
            self.b.mass(d, self.n, "", launch=False)
        finally:
            self.b.delete_prefixed(d)  # whatever a failed launch left
        self.log(f"{d.label}: {self.n} containers deleted in {time.perf_counter() - t:.1f}s")
        if d.key in self.made_profile:
            with d.http() as c:
                c.request("DELETE", f"/1.0/profiles/{self.profile}")

    # -- the suite -----------------------------------------------------------------------------
    def run(self) -> None:
        self.b.with_prepared("guest", f"launching {self.n} containers",
                             ("/1.0/images", "/1.0/instances", "/1.0/profiles", "/1.0/metrics"),
                             self.prepare, self.teardown, self.steps)

    def steps(self, ready, skipped, fp: str) -> None:
        self.b.load(f"guest: {self.n} containers running")
        self.state_rows(ready, skipped)
        self.devlxd_rows(ready, skipped)

    def names(self, d) -> set[str]:
        return {self.b.cname(d, f"m{j:02d}") for j in range(self.n)}

    def check_list(self, d, docs) -> None:
        running = {x["name"] for x in docs if x.get("status") == "Running" and x.get("state")}
        if not self.names(d) <= running:
            raise RuntimeError(f"recursion=2 lists {len(self.names(d) & running)} of the {self.n} running "
                               "containers with their state")

    def check_metrics(self, d, body: bytes) -> None:
        sampled = set()
        for line in body.decode().splitlines():
            if line.startswith("lxd_procs_total{"):
                m = NAME.search(line)
                if m:
                    sampled.add(m.group(1))
        missing = sorted(self.names(d) - sampled)
        if missing:
            raise RuntimeError(f"no lxd_procs_total sample for {len(missing)} of the {self.n} containers "
                               f"(e.g. {missing[0]})")

    def state_cycle(self, d, i: int) -> dict:
        k = 4 if self.quick else 10
        out = {}
        with d.http() as c:
            c.call("GET", "/1.0")  # the connection is open before anything is timed
            # metrics, uncached: LXD's 8 s cache of this daemon's previous scrape has expired
            wait = self.last_metrics.get(d.key, 0) + CACHE_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            t = time.perf_counter()
            r = c.call("GET", "/1.0/metrics")
            out["metrics_cold"] = (time.perf_counter() - t) * 1000
            self.check_metrics(d, r.body)
            times = []
            for _ in range(k):
                t = time.perf_counter()
                c.call("GET", "/1.0/metrics")
                times.append((time.perf_counter() - t) * 1000)
            self.last_metrics[d.key] = time.monotonic()
            out["metrics_warm"] = statistics.median(times)
            out["metrics_bytes"] = len(r.body)

            self.check_list(d, c.call("GET", "/1.0/instances?recursion=2").metadata())
            times = []
            for _ in range(k):
                t = time.perf_counter()
                c.call("GET", "/1.0/instances?recursion=2")
                times.append((time.perf_counter() - t) * 1000)
            out["list"] = statistics.median(times)
        return out

    def state_rows(self, active, skipped) -> None:
        n = self.n
        s, e = self.b.interleave("guest: recursion=2 and metrics", 3 if self.quick else 8, active, self.state_cycle)
        self.b.row("guest", f"GET /1.0/instances?recursion=2 with {n} running (median per round)", "ms", "lower",
                   TARGET_LIST, self.b.values(active, s, e, "list", skipped))
        self.b.row("guest", f"GET /1.0/metrics with {n} running, uncached (one scrape per round, "
                   f">= {CACHE_S:g} s apart)", "ms", "lower", TARGET_METRICS,
                   self.b.values(active, s, e, "metrics_cold", skipped))
        self.b.row("guest", f"GET /1.0/metrics with {n} running, back to back (median per round; "
                   "LXD answers from its 8 s cache)", "ms", "lower", None,
                   self.b.values(active, s, e, "metrics_warm", skipped))
        size = dict(skipped)
        for d in active:
            got = s[d.key].get("metrics_bytes")
            size[d.key] = e.get(d.key) or ([v / 1024 for v in got] if got else "no samples")
        self.b.row("guest", f"GET /1.0/metrics body with {n} running", "KiB", "lower", None, size)

    # -- /dev/lxd ---------------------------------------------------------------------------------
    def devlxd_client(self) -> Path:
        """The test suite's static /dev/lxd client (tests/integration/devlxd_client.c), built once."""
        out = self.b.workdir / "devlxd-client"
        if not out.exists():
            subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(DEVLXD_CLIENT)], check=True,
                           capture_output=True, timeout=120)
        return out

    def devlxd_cycle(self, d, i: int) -> dict:
        name = self.b.cname(d, "m00")
        r = d.lxc("exec", name, "--", "/root/devlxd", "bench", str(DEVLXD_ROUNDS), "/1.0/config")
        got = dict(kv.split("=", 1) for kv in r.stdout.split())
        return {"devlxd": int(got["median_us"]) / 1000}

    def devlxd_rows(self, active, skipped) -> None:
        """`GET /1.0/config` through /dev/lxd/sock from inside one running container of each
        daemon: DEVLXD_ROUNDS round trips per round (a connection each, as curl makes them),
        timed by the client itself, so that `lxc exec` isn't counted."""
        client = self.devlxd_client()
        for d in active:
            name = self.b.cname(d, "m00")
            d.lxc("config", "set", name, "user.bench", "1")
            d.lxc("file", "push", str(client), f"{name}/root/devlxd", "--mode", "0755")
        s, e = self.b.interleave("guest: /dev/lxd", 3 if self.quick else 7, active, self.devlxd_cycle)
        self.b.row("guest", f"/dev/lxd GET /1.0/config round trip from inside a container (median of "
                   f"{DEVLXD_ROUNDS})", "ms", "lower", TARGET_DEVLXD, self.b.values(active, s, e, "devlxd", skipped))
