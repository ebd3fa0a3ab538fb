"""The `networks` suite (issue 10): ours against LXD 5.0.2, each daemon in its own network
namespace (the harness starts them so), each with a managed bridge the benchmark creates through
the API (`ipv4.address` 10.221.0.1/24, no NAT, no IPv6: nothing leaves the namespace) and a profile
holding a root disk and an `eth0` nic on that bridge. Measured, through the API:

- launch of the busybox image with that nic: create + start to Running;
- the same to the moment the container holds its DHCP lease (its init runs `udhcpc`): the
  instance state lists an IPv4 address on eth0;
- `lxc list` (the default columns include the addresses) with --containers running containers on
  the bridge, each holding its lease.

The bridge is deleted at the end (its dnsmasq with it), before the daemons stop.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from common import map_with_connections, run_wall
from daemons import LXC

SUBNET = "10.221.0.1/24"


class NetworksSuite:
    def __init__(self, bench):
        self.b = bench
        self.args = bench.args
        self.quick = bench.quick
        self.prefix = bench.prefix
        self.net = f"{self.prefix[:9]}n"  # an interface name: at most 15 characters
        self.profile = f"{self.prefix}-net"

    @staticmethod
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def cname(self, d, tag: str) -> str:
        return f"{self.prefix}-{d.key[0]}{tag}"

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self, d, small, fp: str) -> None:
        with d.http() as c:
            self.b.ensure_base(d, c, small, fp)
            if c.request("GET", f"/1.0/networks/{self.net}").status == 404:
                c.call("POST", "/1.0/networks", {
                    "name": self.net, "type": "bridge", "description": "benchmark bridge",
                    "config": {"ipv4.address": SUBNET, "ipv4.nat": "false", "ipv6.address": "none",
                               "ipv4.dhcp.expiry": "1h"}})
            if c.request("GET", f"/1.0/profiles/{self.profile}").status == 404:
                c.call("POST", "/1.0/profiles", {
                    "name": self.profile, "description": "benchmark: root disk and a bridged nic", "config": {},
                    "devices": {"root": {"type": "disk", "path": "/", "pool": "default"},
                                "eth0": {"type": "nic", "network": self.net, "name": "eth0"}}})

    def teardown(self, d) -> None:
        self.b.delete_prefixed(d)
        with d.http() as c:
            c.request("DELETE", f"/1.0/profiles/{self.profile}")
            r = c.request("DELETE", f"/1.0/networks/{self.net}")
            if r.status >= 400 and r.status != 404:
                self.log(f"{d.label}: deleting the bridge: HTTP {r.status} {r.body[:200]!r}")

    # -- helpers -----------------------------------------------------------------------------
    def launch(self, c, name: str, fp: str) -> tuple[float, float]:
        """(to Running, to a DHCP lease on eth0), seconds from the create request."""
        t0 = time.perf_counter()
        c.sync("POST", "/1.0/instances", {"name": name, "source": {"type": "image", "fingerprint": fp},
                                          "profiles": [self.profile], "config": {}, "devices": {}})
        c.sync("PUT", f"/1.0/instances/{name}/state", {"action": "start", "timeout": 30})
        running = None
        deadline = time.monotonic() + 60
        while True:
            st = c.call("GET", f"/1.0/instances/{name}/state").metadata() or {}
            now = time.perf_counter()
            if running is None and st.get("status") == "Running":
                running = now - t0
            if running is not None and lease_v4(st):
                return running, now - t0
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no IPv4 lease on eth0 60 s after the create "
                                   f"(status {st.get('status')})")
            time.sleep(0.01)

    # -- the suite -----------------------------------------------------------------------------
    def run(self) -> None:
        def steps(ready, skipped, fp):
            self.launches(ready, skipped, fp)
            self.mass(ready, skipped, fp)

        self.b.with_prepared("networks", "preparing the bridge",
                             ("/1.0/images", "/1.0/instances", "/1.0/profiles", "/1.0/networks"),
                             self.prepare, self.teardown, steps)

    def launches(self, active, skipped, fp: str) -> None:
        n = 3 if self.quick else 8

        def cycle(d, i):
            name = self.cname(d, f"nl{i}")
            with d.http() as c:
                try:
                    running, lease = self.launch(c, name, fp)
                    return {"running": running * 1000, "lease": lease * 1000}
                finally:
                    self.b.force_delete(c, name)

        s, e = self.b.interleave("launch with a bridged nic", n, active, cycle)
        for metric, label, target in (
                ("running", "launch with a bridged nic (create + start to Running), API", ("<=", 0.4)),
                ("lease", "launch with a bridged nic, to its DHCP lease (IPv4 on eth0 in the state), API",
                 ("<=", 0.4))):
            self.b.row("networks", label, "ms", "lower", target, self.b.values(active, s, e, metric, skipped))

    def launch_many(self, d, names: list[str], fp: str) -> None:
        """Launch `names` two at a time, each to its lease."""
        map_with_connections(d.http, names, lambda c, name: self.launch(c, name, fp))

    def mass(self, active, skipped, fp: str) -> None:
        n = self.args.containers or (10 if self.quick else 50)
        errs: dict[str, str] = {}
        for d in active:
            t = time.perf_counter()
            try:
                self.launch_many(d, [self.cname(d, f"nm{j:02d}") for j in range(n)], fp)
                self.log(f"{d.label}: {n} containers with leases in {time.perf_counter() - t:.1f}s")
            except Exception as e:  # noqa: BLE001
                errs[d.key] = f"failed: launching {n} containers with nics: {type(e).__name__}: {e}"[:300]
                self.log(errs[d.key])
        ok = [d for d in active if d.key not in errs]
        time.sleep(3)

        def listing(d, i):
            t = run_wall([LXC, "list"], d.env) * 1000
            with d.http() as c:
                docs = c.call("GET", "/1.0/instances?recursion=2").metadata()
            got = sum(1 for x in docs if x["name"].startswith(self.prefix) and lease_v4(x.get("state") or {}))
            if got != n:
                raise RuntimeError(f"{got} of {n} containers list an IPv4 address")
            return {"t": t}

        s, e = self.b.interleave("lxc list with addresses", 3 if self.quick else 6, ok, listing)
        e.update(errs)
        vals = self.b.values(ok, s, e, "t", skipped)
        vals.update(errs)
        self.b.row("networks", f"`lxc list` with {n} running containers holding DHCP leases", "ms", "lower",
                   ("<=", 0.1), vals)
        for d in active:
            t = time.perf_counter()
            names = [self.cname(d, f"nm{j:02d}") for j in range(n)]
            with ThreadPoolExecutor(4) as ex:
                def gone(name, d=d):
                    with d.http() as c:
                        self.b.force_delete(c, name)
                list(ex.map(gone, names))
            self.log(f"{d.label}: {n} containers deleted in {time.perf_counter() - t:.1f}s")


def lease_v4(state: dict) -> bool:
    """Whether a state lists a global IPv4 address on eth0."""
    eth0 = ((state.get("network") or {}).get("eth0") or {})
    return any(a.get("family") == "inet" and a.get("scope") == "global" for a in eth0.get("addresses") or [])
