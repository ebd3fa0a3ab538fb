"""The `storage` suite (issue 9): ours against LXD 5.0.2 on the same kind of pool, in the same run.

Both daemons get the same pools: the `dir` pool `default` (as the other suites) and a `btrfs` pool
on a loop file each daemon creates itself (`size=--btrfs-size`, under its own LXD_DIR), and one
profile per pool holding only a root disk. What is measured, all through the API as the stock
client sends it unless the row says `lxc`:

- launch on btrfs: create + start to Running of the busybox image (after one warm-up launch that
  makes the pool's image volume);
- snapshot / restore / copy of a stopped busybox container on btrfs;
- snapshot / copy of a stopped container holding 500 MB of random data (written inside the
  container with `head -c ... /dev/urandom` through exec) on dir;
- `lxc export --optimized-storage --compression none` and `lxc import -s POOL` of such a
  container on btrfs (wall time of the stock client; the backup file is on the same disk; each
  step starts after a sync, so that it doesn't pay for the writeback of the step before it);
- the Debian image (`lxd-imagebuilder debian`): first launch after an import, then 5 launches
  back to back, each timed on its own, on dir and on btrfs (the image is deleted between rounds,
  so every round's first launch is a real first launch);
- disk used by 4 Debian containers launched from one image on dir: `du` of the pool directory
  (ours: containers, image cache and spare copies; LXD: containers), once right after the
  launches and once more after --rest-s seconds of rest.

An operation our daemon answers with 501 (not implemented yet), or that the stock client refuses
for a missing API extension, is skipped for ours with the reason in the table; LXD still runs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from common import APIError, UnixHTTP

REPO = Path(__file__).resolve().parents[2]
DIR_POOL = "default"


class Skip(Exception):
    """The daemon does not implement this yet (501 or a missing API extension)."""


def _is_missing(text: str) -> bool:
    t = text.lower()
    return ("http 501" in t or "not implemented" in t or "missing the required" in t
            or "method not allowed" in t)


def du_bytes(path: Path) -> int:
    """Disk blocks used under path (hard links counted once, one file system)."""
    r = subprocess.run(["du", "-s", "-x", "-B1", str(path)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and not r.stdout:
        raise RuntimeError(f"du {path}: {r.stderr.strip()}")
    return int(r.stdout.split()[0])


class KindPools:
    """The `dir` pool and a btrfs pool (on a loop file) of a suite that compares the two, each
    with a profile whose root disk is on it. prepare() makes what a daemon lacks (and the busybox
    image); drop_profiles() and drop_pools() remove what it made."""

    def __init__(self, bench, bt_pool: str, profile: dict[str, str]):
        self.b = bench
        self.bt_pool = bt_pool
        self.profile = profile  # kind ("dir", "btrfs") -> profile name
        self.pool_of = {"dir": DIR_POOL, "btrfs": bt_pool}
        self.made_pools: dict[str, list[str]] = {}

    def prepare(self, d, c: UnixHTTP, small: Path, fp: str) -> None:
        self.b.ensure_base(d, c, small, fp)  # the dir pool (DIR_POOL) and the image
        if c.request("GET", f"/1.0/storage-pools/{self.bt_pool}").status == 404:
            c.call("POST", "/1.0/storage-pools", {"name": self.bt_pool, "driver": "btrfs", "description": "",
                                                  "config": {"size": f"{self.b.args.btrfs_size}GiB"}})
            self.made_pools.setdefault(d.key, []).append(self.bt_pool)
        for kind, prof in self.profile.items():
            if c.request("GET", f"/1.0/profiles/{prof}").status == 404:
                c.call("POST", "/1.0/profiles", {
                    "name": prof, "description": f"benchmark: root disk on {kind}", "config": {},
                    "devices": {"root": {"type": "disk", "path": "/", "pool": self.pool_of[kind]}}})

    def drop_profiles(self, c: UnixHTTP) -> None:
        for prof in self.profile.values():
            c.request("DELETE", f"/1.0/profiles/{prof}")

    def drop_pools(self, d, c: UnixHTTP, log) -> None:
        """The pools this made (retried while a deleted volume is still being removed)."""
        for pool in self.made_pools.get(d.key, []):
            r = None
            for _ in range(20):
                r = c.request("DELETE", f"/1.0/storage-pools/{pool}")
                if r.status < 400:
                    break
                time.sleep(0.5)
            if r is not None and r.status >= 400:
                log(f"{d.label}: could not delete pool {pool}: {r.body[:200]!r}")


class StorageSuite:
    def __init__(self, bench):
        self.b = bench
        self.args = bench.args
        self.quick = bench.quick
        self.prefix = bench.prefix
        self.pools = KindPools(bench, f"{self.prefix}-bt", {"dir": f"{self.prefix}-sd", "btrfs": f"{self.prefix}-sb"})
        self.bt_pool, self.profile, self.pool_of = self.pools.bt_pool, self.pools.profile, self.pools.pool_of
        self.debian: tuple[Path, str] | None = None

    @staticmethod
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- running a measurement on both daemons --------------------------------------------
    def interleave(self, what: str, n: int, daemons, fn) -> tuple[dict, dict]:
        """fn(d, i) -> {metric: value or list of values}, n rounds, alternating the order. A daemon
        that fails or lacks the feature stops taking part; its reason is returned."""
        samples: dict[str, dict[str, list]] = {d.key: {} for d in daemons}
        errors: dict[str, str] = {}
        for i in range(n):
            for d in self.b.order(i, daemons):
                if d.key in errors:
                    continue
                try:
                    res = fn(d, i)
                except Skip as e:
                    errors[d.key] = f"skipped: {e}"[:300]
                    self.log(f"{what}: SKIPPED for {d.label}: {e}")
                    continue
                except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                    msg = f"{type(e).__name__}: {e}"
                    if d is self.b.ours and _is_missing(msg):
                        errors[d.key] = f"skipped: not supported by our daemon yet ({msg})"[:300]
                        self.log(f"{what}: SKIPPED for {d.label}: {msg[:200]}")
                    else:
                        errors[d.key] = f"failed: {msg}"[:300]
                        self.log(f"{what}: {d.label} {errors[d.key]}")
                    continue
                for k, v in res.items():
                    samples[d.key].setdefault(k, []).extend(v if isinstance(v, list) else [v])
        return samples, errors

    def rows(self, daemons, samples, errors, skipped, specs) -> None:
        """specs: (metric, label, unit, target)."""
        for metric, label, unit, target in specs:
            self.b.row("storage", label, unit, "lower", target,
                       self.b.values(daemons, samples, errors, metric, skipped))

    # -- set-up ----------------------------------------------------------------------------
    def prepare(self, d, small: Path, fp: str) -> None:
        with d.http() as c:
            self.pools.prepare(d, c, small, fp)

    def teardown(self, d) -> None:
        self.b.delete_prefixed(d)
        with d.http() as c:
            self.pools.drop_profiles(c)
            if self.debian:
                self.delete_image(c, self.debian[1])
            time.sleep(1)  # our daemon removes deleted volumes in the background
            self.pools.drop_pools(d, c, self.log)

    # -- API steps -------------------------------------------------------------------------
    def cname(self, d, tag: str) -> str:
        return f"{self.prefix}-{d.key[0]}{tag}"

    def create(self, c: UnixHTTP, name: str, fp: str, kind: str) -> None:
        c.sync("POST", "/1.0/instances", {"name": name, "source": {"type": "image", "fingerprint": fp},
                                          "profiles": [self.profile[kind]], "config": {}, "devices": {},
                                          "type": "container"})

    def start(self, c: UnixHTTP, name: str, timeout: float = 60) -> None:
        c.sync("PUT", f"/1.0/instances/{name}/state", {"action": "start", "timeout": 30})
        deadline = time.monotonic() + timeout
        while c.call("GET", f"/1.0/instances/{name}/state").metadata().get("status") != "Running":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not Running {timeout:.0f} s after start")
            time.sleep(0.005)

    def launch(self, c: UnixHTTP, name: str, fp: str, kind: str) -> float:
        t = time.perf_counter()
        self.create(c, name, fp, kind)
        self.start(c, name)
        return time.perf_counter() - t

    def stop(self, c: UnixHTTP, name: str) -> None:
        c.sync("PUT", f"/1.0/instances/{name}/state", {"action": "stop", "force": True, "timeout": -1})

    def fill(self, c: UnixHTTP, name: str, mb: int) -> None:
        """Write mb MB of random data inside the running container, then sync."""
        op = c.sync("POST", f"/1.0/instances/{name}/exec", {
            "command": ["sh", "-c", f"head -c {mb * 1000 * 1000} /dev/urandom > /root/data && sync"],
            "environment": {}, "interactive": False, "wait-for-websocket": False, "record-output": False,
            "width": 0, "height": 0})
        rc = (op.get("metadata") or {}).get("return")
        if rc != 0:
            raise RuntimeError(f"filling {name} with data: exec returned {rc!r}")

    def timed(self, c: UnixHTTP, method: str, path: str, body=None) -> float:
        t = time.perf_counter()
        try:
            c.sync(method, path, body)
        except APIError as e:
            if e.status == 501:
                raise Skip(f"our daemon answers 501 for {method} {path}: {e}") from None
            raise
        return time.perf_counter() - t

    def snapshot(self, c, name: str, snap: str) -> float:
        return self.timed(c, "POST", f"/1.0/instances/{name}/snapshots", {"name": snap, "stateful": False})

    def restore(self, c, name: str, snap: str) -> float:
        return self.timed(c, "PUT", f"/1.0/instances/{name}", {"restore": snap})

    def delete_snapshot(self, c, name: str, snap: str) -> None:
        c.sync("DELETE", f"/1.0/instances/{name}/snapshots/{snap}")

    def copy(self, c, src: str, dst: str, kind: str) -> float:
        """What `lxc copy SRC DST` sends (the source's profiles; no snapshots exist when it is timed)."""
        return self.timed(c, "POST", "/1.0/instances", {
            "name": dst, "type": "container", "profiles": [self.profile[kind]], "config": {}, "devices": {},
            "source": {"type": "copy", "source": src, "instance_only": False, "live": False, "refresh": False}})

    def delete(self, c, name: str) -> None:
        self.b.force_delete(c, name)

    def settle(self, d, timeout: float = 120) -> None:
        """Wait until the daemon's background removals are done (our daemon deletes a volume by
        renaming it to `.trash-*` and removing it afterwards; LXD removes it before answering), so
        that one round's deletes do not slow the next round's launches."""
        pools = d.lxd_dir / "storage-pools"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = False
            for pool in (os.listdir(pools) if pools.is_dir() else []):
                for sub in ("containers", "containers-snapshots", "images"):
                    try:
                        if any(e.startswith((".trash-", ".tmp-drop-", ".tmp-idle-"))
                               for e in os.listdir(pools / pool / sub)):
                            busy = True
                    except OSError:
                        continue
            if not busy:
                return
            time.sleep(0.2)

    @staticmethod
    def delete_image(c, fp: str) -> None:
        """Delete an image and wait for the operation, as `lxc image delete` does."""
        r = c.request("DELETE", f"/1.0/images/{fp}")
        if r.status < 400:
            c.wait(r)

    # -- the suite -------------------------------------------------------------------------------
    def run(self) -> None:
        b = self.b
        active, skipped = b.split_support("storage", "/1.0/images", "/1.0/instances", "/1.0/profiles",
                                          "/1.0/storage-pools")
        if not active:
            return
        small = b.busybox()
        from images import sha256_file
        fp = sha256_file(small)
        ready = b.prepare_each("storage", "preparing pools", active, skipped, lambda d: self.prepare(d, small, fp))
        try:
            if ready:
                steps = (self.btrfs_busybox, self.dir_500, self.export_import, self.debian_launches,
                         self.debian_disk)
                wanted = {s.strip() for s in self.args.storage_steps.split(",") if s.strip()}
                unknown = wanted - {s.__name__ for s in steps}
                if unknown:
                    raise SystemExit(f"unknown --storage-steps: {', '.join(sorted(unknown))}")
                for step in steps:
                    if wanted and step.__name__ not in wanted:
                        continue
                    b.load(f"before storage: {step.__name__}")
                    t = time.perf_counter()
                    try:
                        step(ready, dict(skipped), fp)
                    except Exception as e:  # noqa: BLE001 - keep the other steps' results
                        b.notes.append(f"storage {step.__name__}: aborted: {type(e).__name__}: {e}")
                        self.log(f"storage {step.__name__} aborted: {type(e).__name__}: {e}")
                    finally:
                        for d in ready:
                            b.delete_prefixed(d)
                    self.log(f"storage {step.__name__} took {time.perf_counter() - t:.0f}s")
        finally:
            for d in ready:
                try:
                    self.teardown(d)
                except Exception as e:  # noqa: BLE001
                    self.log(f"{d.label}: storage teardown: {e}")

    # 1. btrfs, busybox: launch; snapshot / restore / copy of a stopped container
    def btrfs_busybox(self, active, skipped, fp: str) -> None:
        n = 3 if self.quick else 8
        for d in active:  # warm-up: the pool's image volume
            with d.http() as c:
                self.launch(c, self.cname(d, "bw"), fp, "btrfs")
                self.delete(c, self.cname(d, "bw"))

        def launch_cycle(d, i):
            name = self.cname(d, f"bl{i}")
            with d.http() as c:
                try:
                    return {"launch": self.launch(c, name, fp, "btrfs") * 1000}
                finally:
                    self.delete(c, name)

        s, e = self.interleave("btrfs launch", n, active, launch_cycle)
        self.rows(active, s, e, skipped, [("launch", "launch on btrfs (create + start to Running), API", "ms",
                                           ("<=", 0.3))])
        for d in active:
            with d.http() as c:
                self.create(c, self.cname(d, "bs"), fp, "btrfs")

        def snap_cycle(d, i):
            name, snap, cp = self.cname(d, "bs"), f"s{i}", self.cname(d, f"bc{i}")
            out = {}
            with d.http() as c:
                out["snapshot"] = self.snapshot(c, name, snap) * 1000
                out["restore"] = self.restore(c, name, snap) * 1000
                self.delete_snapshot(c, name, snap)
                try:
                    out["copy"] = self.copy(c, name, cp, "btrfs") * 1000
                finally:
                    self.delete(c, cp)
            return out

        s, e = self.interleave("btrfs snapshot/restore/copy", n, active, snap_cycle)
        self.rows(active, s, e, skipped, [
            ("snapshot", "snapshot of a stopped busybox container, btrfs, API", "ms", ("<=", 0.3)),
            ("restore", "restore of a snapshot, stopped busybox container, btrfs, API", "ms", ("<=", 0.3)),
            ("copy", "copy of a stopped busybox container, btrfs, API", "ms", ("<=", 0.3))])

    def big_container(self, d, kind: str, fp: str, tag: str) -> str:
        """A stopped container on `kind` holding --data-mb MB of random data written inside it."""
        name = self.cname(d, tag)
        with d.http() as c:
            self.create(c, name, fp, kind)
            self.start(c, name)
            t = time.perf_counter()
            self.fill(c, name, self.args.data_mb)
            self.log(f"{d.label}: {self.args.data_mb} MB written in {name} ({kind}) in "
                     f"{time.perf_counter() - t:.1f}s")
            self.stop(c, name)
        return name

    # 2. dir, 500 MB: snapshot / copy
    def dir_500(self, active, skipped, fp: str) -> None:
        n = 1 if self.quick else 3
        names = {d.key: self.big_container(d, "dir", fp, "db") for d in active}

        def cycle(d, i):
            name, snap, cp = names[d.key], f"s{i}", self.cname(d, f"dc{i}")
            out = {}
            with d.http() as c:
                try:
                    out["snapshot"] = self.snapshot(c, name, snap) * 1000
                    self.delete_snapshot(c, name, snap)
                finally:
                    time.sleep(1)
                try:
                    out["copy"] = self.copy(c, name, cp, "dir") * 1000
                finally:
                    self.delete(c, cp)
                    self.settle(d)
            return out

        s, e = self.interleave("dir 500 MB snapshot/copy", n, active, cycle)
        mb = self.args.data_mb
        self.floor_copy(active[0], names[active[0].key], n)
        self.rows(active, s, e, skipped, [
            ("snapshot", f"snapshot of a stopped {mb} MB container, dir, API", "ms", ("<=", 0.5)),
            ("copy", f"copy of a stopped {mb} MB container, dir, API", "ms", ("<=", 0.5))])

    def floor_copy(self, d, name: str, n: int) -> None:
        """The floor of a dir snapshot or copy: `cp -a` of the same stopped volume on the same disk."""
        src = d.lxd_dir / "storage-pools" / DIR_POOL / "containers" / name
        if not src.is_dir():
            return
        dst = self.b.workdir / "floor-copy"
        times = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], check=True)
            times.append((time.perf_counter() - t) * 1000)
            subprocess.run(["rm", "-rf", str(dst)], check=True)
            time.sleep(1)
        times.sort()
        self.b.notes.append(f"floor of the dir snapshot/copy rows: `cp -a` of the same {self.args.data_mb} MB volume, "
                            f"median {times[len(times) // 2]:.0f} ms ({n} runs)")

    # 3. btrfs, 500 MB: lxc export --optimized-storage / lxc import
    def export_import(self, active, skipped, fp: str) -> None:
        n = 1 if self.quick else 5  # LXD's import varies 1.1-2.4 s between rounds: more rounds, steadier medians
        names = {d.key: self.big_container(d, "btrfs", fp, "eb") for d in active}

        def cycle(d, i):
            name, new = names[d.key], self.cname(d, f"ei{i}")
            f = self.b.workdir / f"export-{d.key}.tar"
            out = {}
            try:
                # Each timed step starts with nothing dirty in the page cache: otherwise it pays for
                # the writeback of the step before it (the other daemon's, when rounds alternate).
                os.sync()
                t = time.perf_counter()
                r = d.lxc("export", name, str(f), "--optimized-storage", "--compression", "none",
                          check=False, timeout=600)
                dt = time.perf_counter() - t
                if r.returncode != 0:
                    msg = (r.stderr or r.stdout).strip()
                    if d is self.b.ours and _is_missing(msg):
                        raise Skip(f"`lxc export` refused: {msg[:200]}")
                    raise RuntimeError(f"lxc export failed: {msg[:300]}")
                out["export"] = dt
                out["export_mb"] = f.stat().st_size / 1e6
                os.sync()
                t = time.perf_counter()
                r = d.lxc("import", str(f), new, "-s", self.bt_pool, check=False, timeout=600)
                dt = time.perf_counter() - t
                if r.returncode != 0:
                    msg = (r.stderr or r.stdout).strip()
                    if d is self.b.ours and _is_missing(msg):
                        raise Skip(f"`lxc import` refused: {msg[:200]}")
                    raise RuntimeError(f"lxc import failed: {msg[:300]}")
                out["import"] = dt
            finally:
                f.unlink(missing_ok=True)
                with d.http() as c:
                    self.delete(c, new)
                self.settle(d)
            return out

        s, e = self.interleave("btrfs 500 MB export/import", n, active, cycle)
        mb = self.args.data_mb
        self.rows(active, s, e, skipped, [
            ("export", f"`lxc export --optimized-storage --compression none`, {mb} MB container, btrfs, wall",
             "s", ("<=", 0.5)),
            ("import", "`lxc import` of that backup, btrfs, wall", "s", ("<=", 0.5)),
            ("export_mb", "size of that backup file", "MB", None)])

    # 4. Debian image launches (first, then 5 back to back), dir and btrfs
    def debian_image(self) -> tuple[Path, str]:
        if self.debian is None:
            from images import sha256_file
            path = Path(self.args.debian_image) if self.args.debian_image else None
            if path is None:
                out = self.b.workdir / "debian"
                out.mkdir(exist_ok=True)
                self.log("building the Debian image with lxd-imagebuilder debian (about 2 minutes)")
                cmd = [str(REPO / ".venv" / "bin" / "lxd-imagebuilder"), "debian", "-o", f"{out}/"]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if r.returncode != 0:
                    raise RuntimeError(f"lxd-imagebuilder debian failed: {r.stderr.strip()[-400:]}")
                found = sorted(out.glob("*.tar.*"))
                if not found:
                    raise RuntimeError("lxd-imagebuilder debian made no image")
                path = found[0]
            self.debian = (path, sha256_file(path))
            self.b.notes.append(f"Debian image: {path.name}, {path.stat().st_size / 1e6:.0f} MB")
        return self.debian

    def debian_launches(self, active, skipped, _fp: str) -> None:
        path, dfp = self.debian_image()
        rounds = self.args.debian_rounds or (1 if self.quick else 2)
        for kind in ("dir", "btrfs"):
            def cycle(d, i, kind=kind):
                out = {"first": None, "each": []}
                made = []
                with d.http() as c:
                    try:
                        if c.request("GET", f"/1.0/images/{dfp}").status == 404:
                            self.b.import_image(c, path, dfp)
                        for j in range(6):
                            name = self.cname(d, f"{kind[0]}d{i}{j}")
                            made.append(name)
                            dt = self.launch(c, name, dfp, kind) * 1000
                            if j == 0:
                                out["first"] = dt
                            else:
                                out["each"].append(dt)
                    finally:
                        for name in made:
                            self.delete(c, name)
                        self.delete_image(c, dfp)
                        self.settle(d)
                self.log(f"{d.label} Debian on {kind}: first {out['first']:.0f} ms, then "
                         + ", ".join(f"{x:.0f}" for x in out["each"]) + " ms")
                return out

            s, e = self.interleave(f"Debian launches on {kind}", rounds, active, cycle)
            self.b.raw.setdefault("storage_debian", {})[kind] = s
            first_target = ("<=", 1.0) if kind == "dir" else None
            each_target = ("<=", 0.5) if kind == "dir" else ("<=", 0.2)
            self.rows(active, s, e, skipped, [
                ("first", f"Debian image: first launch after import, {kind}, API", "ms", first_target),
                ("each", f"Debian image: each of 5 back-to-back launches after it, {kind}, API", "ms",
                 each_target)])

    # 5. disk used by 4 Debian containers on dir
    def debian_disk(self, active, skipped, _fp: str) -> None:
        path, dfp = self.debian_image()
        after, rest, total = {}, {}, {}
        errors = {}
        for d in active:
            made = []
            pool_dir = d.lxd_dir / "storage-pools" / DIR_POOL
            self.settle(d)
            try:
                with d.http() as c:
                    if c.request("GET", f"/1.0/images/{dfp}").status == 404:
                        self.b.import_image(c, path, dfp)
                    for j in range(4):
                        made.append(self.cname(d, f"du{j}"))
                        self.launch(c, made[-1], dfp, "dir")
                    # until background work (our spare copies) is done: the size is stable for 3 s
                    last, stable, deadline = -1, 0, time.monotonic() + 120
                    while stable < 3 and time.monotonic() < deadline:
                        now = du_bytes(pool_dir)
                        stable = stable + 1 if now == last else 0
                        last = now
                        time.sleep(1)
                    after[d.key] = [last / 1e6]
                    self.log(f"{d.label}: dir pool by entry (bytes): " + ", ".join(
                        f"{e}={du_bytes(pool_dir / e)}" for e in sorted(os.listdir(pool_dir))))
                    for name in made:
                        sub = pool_dir / "containers" / name
                        if sub.exists():
                            self.log(f"{d.label}: {name}: {du_bytes(sub)} bytes")
                    time.sleep(self.args.rest_s)
                    rest[d.key] = [du_bytes(pool_dir) / 1e6]
                    total[d.key] = [sum(du_bytes(d.lxd_dir / e) for e in os.listdir(d.lxd_dir)
                                        if e != "disks") / 1e6]
                    self.log(f"{d.label}: 4 Debian containers on dir: pool {after[d.key][0]:.0f} MB after the "
                             f"launches, {rest[d.key][0]:.0f} MB after {self.args.rest_s} s; LXD_DIR "
                             f"{total[d.key][0]:.0f} MB")
                    for name in made:
                        self.delete(c, name)
                    made = []
                    self.delete_image(c, dfp)
            except Exception as ex:  # noqa: BLE001
                errors[d.key] = f"failed: {type(ex).__name__}: {ex}"[:300]
                self.log(f"Debian disk use: {d.label}: {errors[d.key]}")
                with d.http() as c:
                    for name in made:
                        self.delete(c, name)
        for label, vals, target in (
                ("disk used by 4 Debian containers from one image, dir pool (du of the pool, right after)",
                 after, ("<=", 1.0)),
                (f"the same after {self.args.rest_s} s at rest", rest, None),
                ("the same, whole LXD_DIR but loop files (image store, database, logs included)", total, None)):
            v = {**skipped, **vals, **errors}
            self.b.row("storage", label, "MB", "lower", target, v)
