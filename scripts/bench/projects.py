"""The `projects` suite (issue 12): `lxc list` and `lxc launch` in a non-default project against
the same in `default`, on the same daemon, in one run; ours and LXD 5.0.2 side by side.

Each daemon gets a project `<prefix>p` with `features.images=false` (it uses default's busybox
image) and its own profiles (its `default` profile gets the pool's root disk, as `lxd init` gives
default's). Measured, interleaved (the daemons alternate, and within a round so do the projects):

- `lxc list` with --containers (50) STOPPED containers in each of the two projects (the same
  names in both: created, never started), `lxc list` vs `lxc list --project P`;
- `lxc launch ALIAS NAME` (create + start) wall, in default vs in P, each followed by an
  unmeasured `lxc delete -f`.

Rows: each measurement for ours and LXD, then the issue's target: for each daemon the ratio of
its medians, project / default (within 10%: <= 1.10). In those rows the ratio column is ours'
own project/default ratio (not ours/LXD); LXD's ratio is in its median column.

Everything the suite creates (instances in both projects, the project, the alias) is removed at
the end, before the daemons stop.
"""

from __future__ import annotations

import time

from common import map_with_connections, run_wall
from daemons import LXC

TARGET = ("<=", 1.10)


class ProjectsSuite:
    def __init__(self, bench):
        self.b = bench
        self.args = bench.args
        self.quick = bench.quick
        self.prefix = bench.prefix
        self.project = f"{self.prefix}p"
        self.alias = f"{self.prefix}-pbb"

    @staticmethod
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def q(self, project: str) -> str:
        return "" if project == "default" else f"?project={project}"

    def flag(self, project: str) -> list[str]:
        return [] if project == "default" else ["--project", project]

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self, d, small, fp: str) -> None:
        with d.http() as c:
            self.b.ensure_base(d, c, small, fp)
            if c.request("GET", f"/1.0/images/aliases/{self.alias}").status == 404:
                c.call("POST", "/1.0/images/aliases", {"name": self.alias, "target": fp, "description": ""})
            if c.request("GET", f"/1.0/projects/{self.project}").status == 404:
                c.call("POST", "/1.0/projects", {
                    "name": self.project, "description": "benchmark project",
                    "config": {"features.images": "false", "features.profiles": "true"}})
            prof = c.call("GET", f"/1.0/profiles/default{self.q(self.project)}").metadata()
            devices = dict(prof.get("devices") or {})
            devices["root"] = {"type": "disk", "path": "/", "pool": "default"}
            c.call("PUT", f"/1.0/profiles/default{self.q(self.project)}", {
                "description": prof.get("description", ""), "config": prof.get("config") or {},
                "devices": devices})

    def delete_all(self, d, project: str) -> None:
        with d.http() as c:
            r = c.request("GET", f"/1.0/instances{self.q(project)}")
            if r.status != 200:
                return
            names = [u.split("?")[0].rsplit("/", 1)[-1] for u in r.metadata() or []]
        names = [n for n in names if n.startswith(self.prefix)]

        def gone(c, name):
            path = f"/1.0/instances/{name}{self.q(project)}"
            st = c.request("GET", f"/1.0/instances/{name}/state{self.q(project)}")
            if st.status == 404:
                return
            if (st.metadata() or {}).get("status") not in ("Stopped", None):
                c.sync("PUT", f"/1.0/instances/{name}/state{self.q(project)}",
                       {"action": "stop", "force": True, "timeout": -1})
            c.sync("DELETE", path)

        if names:
            map_with_connections(d.http, names, gone)

    def teardown(self, d) -> None:
        for project in (self.project, "default"):
            self.delete_all(d, project)
        with d.http() as c:
            r = c.request("DELETE", f"/1.0/projects/{self.project}")
            if r.status >= 400 and r.status != 404:
                self.log(f"{d.label}: deleting the project: HTTP {r.status} {r.body[:200]!r}")
            c.request("DELETE", f"/1.0/images/aliases/{self.alias}")

    # -- the suite -----------------------------------------------------------------------------
    def run(self) -> None:
        def steps(ready, skipped, fp):
            self.listing(ready, skipped, fp)
            self.launches(ready, skipped)

        self.b.with_prepared("projects", "preparing the project",
                             ("/1.0/images", "/1.0/instances", "/1.0/profiles", "/1.0/projects"),
                             self.prepare, self.teardown, steps)

    def pair_rows(self, active, skipped, samples, errors, what: str, label: str) -> None:
        """The default and project rows of one measurement, then the project/default ratio row."""
        for where, tag in (("default", "in default"), ("project", "in a project")):
            self.b.row("projects", f"{label} {tag}", "ms", "lower", None,
                       self.b.values(active, samples, errors, f"{what}_{where}", skipped))
        ratios: dict[str, object] = dict(skipped)
        for d in active:
            got = samples[d.key]
            if d.key in errors or not got.get(f"{what}_default") or not got.get(f"{what}_project"):
                ratios[d.key] = errors.get(d.key, "no samples")
                continue
            from statistics import median
            ratios[d.key] = {"n": 1, "median": median(got[f"{what}_project"]) / median(got[f"{what}_default"])}
        self.b.row("projects", f"{label}: project / default (each daemon's own medians)", "×", "lower",
                   TARGET, ratios)
        ours = ratios.get("ours")
        self.b.rows[-1]["ratio"] = ours["median"] if isinstance(ours, dict) else None

    def listing(self, active, skipped, fp: str) -> None:
        n = self.args.containers or (10 if self.quick else 50)
        errs: dict[str, str] = {}
        for d in active:
            t = time.perf_counter()
            names = [f"{self.prefix}-l{j:02d}" for j in range(n)]
            try:
                for project in ("default", self.project):
                    def create(c, name, project=project):
                        c.sync("POST", f"/1.0/instances{self.q(project)}", {
                            "name": name, "source": {"type": "image", "fingerprint": fp}, "config": {},
                            "devices": {}})
                    map_with_connections(d.http, names, create)
                for project in ("default", self.project):  # each list holds its own project's only
                    with d.http() as c:
                        got = [u for u in c.call("GET", f"/1.0/instances{self.q(project)}").metadata()
                               if u.split("?")[0].rsplit("/", 1)[-1].startswith(self.prefix)]
                    if len(got) != n:
                        raise RuntimeError(f"project {project} lists {len(got)} of its {n} containers")
                self.log(f"{d.label}: {n} stopped containers in each project in {time.perf_counter() - t:.1f}s")
            except Exception as e:  # noqa: BLE001
                errs[d.key] = f"failed: creating {n} containers per project: {type(e).__name__}: {e}"[:300]
                self.log(errs[d.key])
        ok = [d for d in active if d.key not in errs]

        def cycle(d, i):
            out = {}
            order = [("default", "default"), ("project", self.project)]
            for where, project in (order if i % 2 == 0 else reversed(order)):
                out[f"list_{where}"] = run_wall([LXC, "list", *self.flag(project)], d.env) * 1000
            return out

        s, e = self.b.interleave("lxc list per project", 3 if self.quick else 8, ok, cycle)
        e.update(errs)
        self.pair_rows(active, skipped, s, e, "list", f"`lxc list` with {n} stopped containers")
        for d in ok:
            for project in (self.project, "default"):
                self.delete_all(d, project)

    def launches(self, active, skipped) -> None:
        def cycle(d, i):
            out = {}
            order = [("default", "default"), ("project", self.project)]
            for where, project in (order if i % 2 == 0 else reversed(order)):
                name = f"{self.prefix}-la{i}"
                try:
                    out[f"launch_{where}"] = run_wall([LXC, "launch", self.alias, name, *self.flag(project)],
                                                      d.env) * 1000
                finally:
                    run_wall([LXC, "delete", "-f", name, *self.flag(project)], d.env, check=False)
            return out

        s, e = self.b.interleave("lxc launch per project", 3 if self.quick else 8, active, cycle)
        self.pair_rows(active, skipped, s, e, "launch", "`lxc launch` (create + start) wall")
