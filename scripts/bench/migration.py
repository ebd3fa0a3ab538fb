"""The `migration` suite (issue 13): `lxc copy` between two daemons over TLS, ours→ours against
LXD→LXD, in the same run, interleaved.

Each kind gets a pair: the harness's daemon ("A", in a network namespace of its own) and a second
daemon of the same kind ("B", a fresh LXD_DIR in the run's work dir) started inside A's namespace.
A listens on 127.0.0.1:8443, B on 127.0.0.1:8444 (loopback addresses of that namespace), both with
`core.trust_password`; A's client knows B as remote `b` and B's client knows A as remote `a`
(added with the password: trusted both ways), and each daemon trusts the other's server
certificate. Both daemons of a pair get the same pools and profiles: the `dir` pool `default` and
a `btrfs` pool on a loop file the daemon makes itself (`size=--btrfs-size`), one profile per pool
holding only a root disk. The source container (busybox, created and never started) gets
--migration-mb (500; --quick 50) MB of incompressible data written straight into its rootfs on
the host: one file of 40%, four of 5% each, 1 MB files for 20% and 100 kB files for 20%.

Measured, each round alternating which kind goes first (wall time of the stock client inside A's
namespace, after a `sync` so that no step pays for the writeback of the one before):

- `lxc copy SRC b:DST` (pull mode, the client's default) on btrfs pools (native `btrfs send` /
  `btrfs receive` on both kinds) and on dir pools (rsync);
- `lxc copy --refresh SRC b:DST` after replacing 10 MB (--quick 1 MB) of the source's 1 MB files
  with new random data (the copy's files are checked against the source afterwards);
- the bare `btrfs send | btrfs receive` of a read-only snapshot of the same source subvolume from
  A's btrfs pool into B's (the snapshot is taken before the clock starts), on each kind's pools;
- each kind's own ratio: its btrfs `lxc copy` / its bare send|receive (target: ours ≤ 2.0).

Targets: ours/LXD ≤ 0.5 for each copy row. Everything the suite creates (containers on A and B,
profiles, the btrfs pools and their loop files, the B daemons) is removed at the end, also after
a failure; cleanup() in daemons.py catches what a crash leaves (loop devices backed by files in
the work dir included).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from daemons import LXC, Daemon
from storage import KindPools

HOST = "127.0.0.1"
PORT_A, PORT_B = 8443, 8444
KINDS = ("btrfs", "dir")
COPY_TARGET = ("<=", 0.5)
BARE_TARGET = ("<=", 2.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n


def _run(argv: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
    return r


class MigrationSuite:
    def __init__(self, bench):
        self.b = bench
        self.args = bench.args
        self.quick = bench.quick
        self.prefix = bench.prefix
        self.password = uuid.uuid4().hex
        self.mb = self.args.migration_mb or (50 if self.quick else 500)
        self.change_mb = max(1, self.mb // 50)  # 10 MB of 500, 1 MB of 50
        self.pools = KindPools(bench, f"{self.prefix}-mb", {k: f"{self.prefix}-m{k[0]}" for k in KINDS})
        self.bt_pool, self.profile, self.pool_of = self.pools.bt_pool, self.pools.profile, self.pools.pool_of
        self.peers: dict[str, Daemon] = {}  # A's key -> B
        self.pem: dict[str, str] = {}
        self.files: list[tuple[str, int]] = []  # (relative path, size) of the data set
        self.small_files: list[str] = []  # the 1 MB files the refresh rounds replace
        self.changed = 0

    # -- set-up ------------------------------------------------------------------------------
    def nsenter(self, a: Daemon, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{a.pid}/ns/net", *argv]

    def start_peer(self, a: Daemon) -> Daemon:
        p = Daemon(f"{a.key}-mig", f"{a.label} (B)", a.binary, a.workdir, a.prefix, netns=f"/proc/{a.pid}/ns/net")
        self.peers[a.key] = p
        t = time.perf_counter()
        p.start()
        log(f"migration: {p.label} ready in {time.perf_counter() - t:.2f}s (pid {p.pid}, in {a.label}'s namespace)")
        return p

    def prepare_daemon(self, d: Daemon, small: Path, fp: str, port: int) -> None:
        with d.http() as c:
            self.pools.prepare(d, c, small, fp)
            r = c.request("PATCH", "/1.0", {"config": {"core.https_address": f"{HOST}:{port}",
                                                       "core.trust_password": self.password}})
            if r.status >= 400:
                raise RuntimeError(f"PATCH /1.0 core.https_address: HTTP {r.status}: {r.body[:200]!r}")
            self.pem[d.key] = c.call("GET", "/1.0").metadata()["environment"].get("certificate", "")

    def add_remote(self, ns_of: Daemon, client: Daemon, name: str, port: int) -> None:
        _run(self.nsenter(ns_of, LXC, "remote", "add", name, f"https://{HOST}:{port}",
                          f"--password={self.password}", "--accept-certificate"), env=client.env, timeout=120)

    def trust_server(self, d: Daemon, other: Daemon) -> None:
        """d trusts other's server certificate (best effort: a pull copy authenticates by secret)."""
        pem = self.pem.get(other.key, "")
        body = "".join(ln for ln in pem.strip().splitlines() if not ln.startswith("-----"))
        with d.http() as c:
            r = c.request("POST", "/1.0/certificates", {"type": "client", "certificate": body,
                                                        "name": f"{self.prefix}-{other.key}"})
            if r.status >= 400:
                log(f"migration: {d.label} trusting {other.label}'s certificate: HTTP {r.status} {r.body[:200]!r}")

    def prepare(self, a: Daemon, small: Path, fp: str) -> None:
        self.prepare_daemon(a, small, fp, PORT_A)
        p = self.start_peer(a)
        self.prepare_daemon(p, small, fp, PORT_B)
        self.add_remote(a, a, "b", PORT_B)
        self.add_remote(a, p, "a", PORT_A)
        self.trust_server(a, p)
        self.trust_server(p, a)
        for kind in KINDS:
            self.make_source(a, kind, fp)
        self.warm_up(a)

    def warm_up(self, a: Daemon) -> None:
        """One unmeasured btrfs copy per pair (first-use costs: client certificates, pool caches).
        For ours it also checks that the copy takes the native path: B's `logging` events (its
        info-level log lines, which its log file, at warning level, leaves out) must say it received
        the volume by `btrfs receive`."""
        p = self.peers[a.key]
        src, dst = self.cname(a, "sb"), self.cname(a, "wb")
        mon = None
        if a is self.b.ours:
            mon = subprocess.Popen([LXC, "monitor", "--type=logging", "--loglevel=info", "--pretty"], env=p.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(1.0)
        try:
            self.lxc(a, "copy", src, f"b:{dst}")
            self.check_copy(a, "btrfs", src, dst, [self.files[0][0], self.files[-1][0]])
        finally:
            if mon is not None:
                time.sleep(0.5)
                mon.terminate()
                out = mon.communicate(timeout=10)[0]
            self.delete_on_peer(a, dst)
        if mon is not None:
            if "receiving by btrfs receive" not in out:
                raise RuntimeError(f"{p.label} did not receive the btrfs copy by `btrfs receive` (its logging "
                                   f"events: {out.strip()[-300:]!r})")
            self.b.notes.append("migration: ours' btrfs copy checked native: B's logging events say "
                                "\"migration: receiving by btrfs receive\"")

    def cname(self, a: Daemon, tag: str) -> str:
        return f"{self.prefix}-{a.key[0]}{tag}"

    def rootfs(self, d: Daemon, kind: str, name: str) -> Path:
        return d.lxd_dir / "storage-pools" / self.pool_of[kind] / "containers" / name / "rootfs"

    def dataset(self) -> Path:
        """The data files, made once (the same bytes for every source)."""
        src = self.b.workdir / f"migration-data-{self.mb}"
        if src.is_dir():
            return src
        tmp = src.with_name(src.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        total = self.mb * 1000 * 1000
        plan = [("big", 1, total * 40 // 100), ("mid", 4, total * 5 // 100),
                ("m1", total * 20 // 100 // 1_000_000, 1_000_000), ("k100", total * 20 // 100 // 100_000, 100_000)]
        self.files = []
        for sub, count, size in plan:
            (tmp / sub).mkdir(exist_ok=True)
            for i in range(count):
                rel = f"{sub}/f{i:04d}"
                _write_random(tmp / rel, size)
                self.files.append((rel, size))
        os.replace(tmp, src)
        self.small_files = sorted(rel for rel, _ in self.files if rel.startswith("m1/"))
        log(f"migration: data set of {sum(s for _, s in self.files) / 1e6:.0f} MB in {len(self.files)} files")
        return src

    def make_source(self, a: Daemon, kind: str, fp: str) -> None:
        name = self.cname(a, f"s{kind[0]}")
        with a.http() as c:
            if c.request("GET", f"/1.0/instances/{name}").status == 404:
                c.sync("POST", "/1.0/instances", {"name": name, "source": {"type": "image", "fingerprint": fp},
                                                  "profiles": [self.profile[kind]], "config": {}, "devices": {},
                                                  "type": "container"})
        root = self.rootfs(a, kind, name)
        if not root.is_dir():
            raise RuntimeError(f"the rootfs of {name} is not at {root}")
        st = root.stat()
        dest = root / "root" / "data"
        subprocess.run(["rm", "-rf", str(dest)], check=True)
        dest.parent.mkdir(exist_ok=True)
        _run(["cp", "-a", "--reflink=never", str(self.dataset()), str(dest)])
        _run(["chown", "-R", f"{st.st_uid}:{st.st_gid}", str(dest)])
        os.sync()

    # -- the measured steps ----------------------------------------------------------------------
    def lxc(self, a: Daemon, *args: str, timeout: float = 900) -> float:
        os.sync()
        t = time.perf_counter()
        _run(self.nsenter(a, LXC, *args), env=a.env, timeout=timeout)
        return time.perf_counter() - t

    def check_copy(self, a: Daemon, kind: str, src: str, dst: str, rels: list[str]) -> None:
        """dst is on B and the listed data files match the source's."""
        p = self.peers[a.key]
        with p.http() as c:
            if c.request("GET", f"/1.0/instances/{dst}").status != 200:
                raise RuntimeError(f"{dst} is not on {p.label} after the copy")
        s_root, d_root = self.rootfs(a, kind, src) / "root" / "data", self.rootfs(p, kind, dst) / "root" / "data"
        for rel in rels:
            if _sha(s_root / rel) != _sha(d_root / rel):
                raise RuntimeError(f"{dst}: root/data/{rel} differs from the source's")

    def change(self, a: Daemon, kind: str, src: str) -> list[str]:
        """Replace change_mb of the source's 1 MB files with new random bytes (same size)."""
        root = self.rootfs(a, kind, src) / "root" / "data"
        n = self.change_mb
        picked = [self.small_files[(self.changed + j) % len(self.small_files)] for j in range(n)]
        self.changed += n
        st = root.stat()
        for rel in picked:
            _write_random(root / rel, 1_000_000)
            os.chown(root / rel, st.st_uid, st.st_gid)
        return picked

    def delete_on_peer(self, a: Daemon, name: str) -> None:
        p = self.peers[a.key]
        with p.http() as c:
            self.b.force_delete(c, name)
        self.b_settle(p)

    def b_settle(self, d: Daemon, timeout: float = 120) -> None:
        """Our daemon removes deleted volumes in the background (.trash-*): wait for that."""
        pools = d.lxd_dir / "storage-pools"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = False
            for pool in (os.listdir(pools) if pools.is_dir() else []):
                try:
                    if any(e.startswith((".trash-", ".tmp-")) for e in os.listdir(pools / pool / "containers")):
                        busy = True
                except OSError:
                    continue
            if not busy:
                return
            time.sleep(0.2)

    def bare(self, a: Daemon, i: int) -> float:
        """`btrfs send | btrfs receive` of a read-only snapshot of the btrfs source, A's pool to B's."""
        p = self.peers[a.key]
        src = self.rootfs(a, "btrfs", self.cname(a, "sb")).parent
        snap = a.lxd_dir / "storage-pools" / self.bt_pool / f"{self.prefix}-bare{i}"
        dest = p.lxd_dir / "storage-pools" / self.bt_pool / f"{self.prefix}-bare{i}"
        _run(["btrfs", "subvolume", "snapshot", "-r", str(src), str(snap)])
        try:
            dest.mkdir()
            os.sync()
            t = time.perf_counter()
            _run(["bash", "-o", "pipefail", "-c", 'btrfs send -q "$1" | btrfs receive -e "$2"',
                  "bash", str(snap), str(dest)])
            dt = time.perf_counter() - t
            got = dest / snap.name / "rootfs" / "root" / "data" / self.files[0][0]
            if not got.is_file() or got.stat().st_size != self.files[0][1]:
                raise RuntimeError(f"btrfs receive left no {got}")
            return dt
        finally:
            for sub in (dest / snap.name, snap):
                if sub.exists():
                    subprocess.run(["btrfs", "subvolume", "delete", str(sub)], capture_output=True)
            if dest.exists():
                dest.rmdir()

    def cycle(self, a: Daemon, i: int) -> dict:
        out = {}
        for kind in (KINDS if i % 2 == 0 else tuple(reversed(KINDS))):
            src, dst = self.cname(a, f"s{kind[0]}"), self.cname(a, f"c{kind[0]}{i}")
            try:
                out[f"copy_{kind}"] = self.lxc(a, "copy", src, f"b:{dst}")
                self.check_copy(a, kind, src, dst, [self.files[0][0], self.files[-1][0]])
                picked = self.change(a, kind, src)
                out[f"refresh_{kind}"] = self.lxc(a, "copy", "--refresh", src, f"b:{dst}")
                self.check_copy(a, kind, src, dst, picked)
                log(f"migration: {a.label} round {i + 1} {kind}: copy {out[f'copy_{kind}']:.2f}s, "
                    f"refresh {out[f'refresh_{kind}']:.2f}s")
            finally:
                self.delete_on_peer(a, dst)
        out["bare"] = self.bare(a, i)
        log(f"migration: {a.label} round {i + 1}: bare btrfs send | receive {out['bare']:.2f}s")
        return out

    # -- teardown ------------------------------------------------------------------------------
    def teardown(self, d: Daemon) -> None:
        try:
            self.b.delete_prefixed(d)
            with d.http() as c:
                self.pools.drop_profiles(c)
                self.b_settle(d, 60)
                self.pools.drop_pools(d, c, lambda msg: log(f"migration: {msg}"))
                c.request("PATCH", "/1.0", {"config": {"core.https_address": "", "core.trust_password": ""}})
        except Exception as e:  # noqa: BLE001
            log(f"migration: tearing down {d.label}: {type(e).__name__}: {e}")

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> None:
        b = self.b
        active, skipped = b.split_support("migration", "/1.0/images", "/1.0/instances", "/1.0/profiles",
                                          "/1.0/storage-pools")
        if not active:
            return
        from images import sha256_file

        small = b.busybox()
        fp = sha256_file(small)
        try:
            ready = b.prepare_each("migration", "preparing the pair, pools and sources", active, skipped,
                                   lambda d: self.prepare(d, small, fp))
            if ready:
                self.measure(ready, skipped)
        finally:
            for a in active:
                p = self.peers.get(a.key)
                if p is not None and p.pid is not None:
                    self.teardown(p)
                    try:
                        p.stop(timeout=30)
                    except Exception as e:  # noqa: BLE001
                        log(f"stopping {p.label}: {e}")
                self.teardown(a)
            data = self.b.workdir / f"migration-data-{self.mb}"
            subprocess.run(["rm", "-rf", str(data)], check=False)

    def measure(self, ready: list[Daemon], skipped: dict) -> None:
        b = self.b
        rounds = self.args.migration_rounds or (2 if self.quick else 3)
        s, e = b.interleave("migration", rounds, ready, self.cycle)
        mb, ch = self.mb, self.change_mb
        for metric, label in (
                ("copy_btrfs", f"`lxc copy SRC b:DST` of a stopped {mb} MB container, btrfs pools (native)"),
                ("copy_dir", f"`lxc copy SRC b:DST` of a stopped {mb} MB container, dir pools (rsync)"),
                ("refresh_btrfs", f"`lxc copy --refresh` after changing {ch} MB, btrfs pools"),
                ("refresh_dir", f"`lxc copy --refresh` after changing {ch} MB, dir pools")):
            b.row("migration", label, "s", "lower", COPY_TARGET, b.values(ready, s, e, metric, skipped))
        b.row("migration", f"bare `btrfs send` piped to `btrfs receive` of the same {mb} MB subvolume "
              "(each kind's pools)",
              "s", "lower", None, b.values(ready, s, e, "bare", skipped))
        ratios: dict[str, object] = dict(skipped)
        for d in ready:
            got = s[d.key]
            if d.key in e or not got.get("copy_btrfs") or not got.get("bare"):
                ratios[d.key] = e.get(d.key, "no samples")
                continue
            ratios[d.key] = {"n": 1, "median": statistics.median(got["copy_btrfs"]) / statistics.median(got["bare"])}
        b.row("migration", "btrfs `lxc copy` / bare send to receive (each daemon's own medians)", "×", "lower",
              BARE_TARGET, ratios)
        ours = ratios.get("ours")
        b.rows[-1]["ratio"] = ours["median"] if isinstance(ours, dict) else None
        b.raw["migration"] = {"mb": mb, "change_mb": ch, "rounds": rounds, "samples": s, "errors": e}

