from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import Daemon, btrfs_pool_of, ensure_containers_ready, release_host_state, run_prefix
from tests.netns import NetNS


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="integration tests need root")
        for item in items:
            if "integration" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    """One daemon for the whole session (tests must not depend on each other's leftovers)."""
    base = tmp_path_factory.mktemp("lxd")
    d = Daemon(lxd_dir=base / "var", conf_dir=base / "conf")
    d.start()
    yield d
    d.stop()


@pytest.fixture
def fresh_daemon(tmp_path):
    """A daemon of the test's own, for tests that restart, kill or reconfigure it."""
    d = Daemon(lxd_dir=tmp_path / "var", conf_dir=tmp_path / "conf")
    yield d
    d.stop()
    release_host_state(d.lxd_dir)  # what a failed test's pools left mounted


@pytest.fixture(scope="module")
def net_daemon(tmp_path_factory):
    """A daemon of the test module's own inside a network namespace the module made, with a
    dir pool, the default profile's root disk and the busybox image: network tests create
    bridges, nics and nftables tables only there. The namespace (and what is left in it) goes
    when the module is done."""
    base = tmp_path_factory.mktemp("lxdnet")
    # As /var/lib/lxd is: searchable by others down to LXD_DIR (0711), so the bridges' dnsmasq
    # runs as nobody, as it does on a real host (a private LXD_DIR keeps it root).
    for d in (base, *base.parents):
        if d == Path("/") or d == Path("/tmp"):
            break
        d.chmod(d.stat().st_mode | 0o011)
    ns = NetNS(run_prefix() + "ns").create()
    ns.share(base)
    d = Daemon(lxd_dir=base / "var", conf_dir=base / "conf", netns=ns)
    try:
        d.start()
        ensure_containers_ready(d)
        yield d
    finally:
        for inst in (d.api("GET", "/1.0/instances").json().get("metadata") or []) if d.proc else []:
            d.lxc("delete", "-f", inst.rsplit("/", 1)[-1], check=False)
        d.stop()
        ns.destroy()
        release_host_state(d.lxd_dir)


@pytest.fixture
def restore_config(daemon):
    """Leave the shared daemon's server config as it was."""
    before = daemon.api("GET", "/1.0").json()["metadata"]["config"]
    yield
    now = daemon.api("GET", "/1.0").json()["metadata"]["config"]
    patch = {k: "" for k in now if k not in before}
    patch.update({k: v for k, v in before.items() if now.get(k) != v and v is not True})
    if patch:
        r = daemon.api("PATCH", "/1.0", json={"config": patch})
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def ready(daemon):
    """The shared daemon with a pool, the default profile's root disk and the busybox image."""
    ensure_containers_ready(daemon)
    return daemon


@pytest.fixture
def names(ready):
    """Makes unique names (this run's prefix + a suffix); whatever instance or profile bears one
    of them is deleted after the test."""
    made: list[str] = []
    prefix = run_prefix()

    def make(suffix: str = "") -> str:
        n = f"{prefix}-{suffix or len(made)}"
        made.append(n)
        return n

    yield make
    for n in made:
        ready.lxc("delete", "-f", n, check=False)
    for n in made:
        ready.lxc("profile", "delete", n, check=False)


@pytest.fixture
def projects(ready):
    """Makes uniquely named projects (`projects(suffix, "key=value", ...)`) on the shared daemon;
    after the test each goes with what it holds: instances, its own images, custom volumes and
    profiles."""
    made: list[str] = []
    prefix = run_prefix()

    def make(suffix: str, *config: str) -> str:
        name = f"{prefix}{suffix}"
        ready.lxc("project", "create", name, *[a for kv in config for a in ("-c", kv)])
        made.append(name)
        return name

    def names(url: str, project: str) -> list[str]:
        r = ready.api("GET", f"{url}?project={project}")
        return [u.split("?")[0].rsplit("/", 1)[-1] for u in (r.json().get("metadata") or [])]

    yield make
    for p in reversed(made):
        r = ready.api("GET", f"/1.0/projects/{p}")
        if r.status_code == 404:
            continue  # the test deleted it
        config = r.json()["metadata"]["config"]
        for n in names("/1.0/instances", p):
            ready.lxc("delete", "-f", n, "--project", p, check=False)
        if config.get("features.images") == "true":
            for fp in names("/1.0/images", p):
                ready.lxc("image", "delete", fp, "--project", p, check=False)
        if config.get("features.storage.volumes") == "true":
            for pool in names("/1.0/storage-pools", p):
                for v in names(f"/1.0/storage-pools/{pool}/volumes/custom", p):
                    ready.lxc("storage", "volume", "delete", pool, v, "--project", p, check=False)
        if config.get("features.profiles") == "true":
            for n in names("/1.0/profiles", p):
                if n != "default":
                    ready.lxc("profile", "delete", n, "--project", p, check=False)
        ready.lxc("project", "delete", p, check=False)


_BTRFS_POOLS = iter(range(1, 10_000))


@pytest.fixture(scope="module")
def btrfs_pool(ready):
    """A btrfs pool on a 1 GiB loop file the shared daemon makes for one test module; whatever
    the module leaves on it (instances, custom volumes) is deleted with it."""
    yield from btrfs_pool_of(ready, f"{run_prefix()}-bt{next(_BTRFS_POOLS)}", "1GiB")


_FREE_PORTS = """
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
"""


class TLSPair:
    """Two daemons of ours in one network namespace, each serving HTTPS on a loopback port."""

    def __init__(self, ns: NetNS, a: Daemon, b: Daemon, port_a: int, port_b: int, password: str):
        self.ns, self.a, self.b, self.password = ns, a, b, password
        self.port_a, self.port_b = port_a, port_b
        self.url_a = f"https://127.0.0.1:{port_a}"
        self.url_b = f"https://127.0.0.1:{port_b}"

    def remote_add(self, client: Daemon, name: str, url: str) -> None:
        """`lxc remote add NAME URL --password=PW --accept-certificate` with client's LXD_CONF;
        an existing remote of that name is replaced (idempotent)."""
        client.lxc("remote", "remove", name, check=False)
        client.lxc("remote", "add", name, url, f"--password={self.password}", "--accept-certificate")


def make_tls_pair(tmp_path_factory, extra_env=None):
    """The `tls_pair` fixture's body (a generator), for modules that need the pair's daemons
    started with `extra_env(tag, base)` added to their environment ("a" and "b")."""
    base = tmp_path_factory.mktemp("lxdtls")
    ns = NetNS(run_prefix() + "ns").create()
    daemons: list[Daemon] = []
    try:
        ns.share(base)
        port_a, port_b = (int(p) for p in ns.run("/usr/bin/python3", "-c", _FREE_PORTS).stdout.split())
        password = "pw-" + run_prefix()
        for tag in ("a", "b"):
            (base / tag).mkdir()
            d = Daemon(lxd_dir=base / tag / "var", conf_dir=base / tag / "conf", netns=ns, clients_in_netns=True,
                       extra_env=extra_env(tag, base) if extra_env else {})
            daemons.append(d.start(wait=False))
        for d, port in zip(daemons, (port_a, port_b), strict=True):
            d.waitready()
            ensure_containers_ready(d)
            r = d.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{port}",
                                                        "core.trust_password": password}})
            assert r.status_code == 200, r.text
        pair = TLSPair(ns, daemons[0], daemons[1], port_a, port_b, password)
        pair.remote_add(pair.a, "b", pair.url_b)
        yield pair
    finally:
        for d in daemons:
            try:
                for inst in (d.api("GET", "/1.0/instances").json().get("metadata") or []) if d.proc else []:
                    d.lxc("delete", "-f", inst.rsplit("/", 1)[-1], check=False)
            except Exception:  # a daemon that died: stop() and the namespace take the rest
                pass
            d.stop()
        ns.destroy()
        for d in daemons:
            release_host_state(d.lxd_dir)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    """Two daemons (`.a`, `.b`) in one network namespace this module made, each with a dir pool,
    the default profile's root disk, the busybox image, `core.https_address=127.0.0.1:PORT` and
    `core.trust_password`. Their `lxc()` runs inside the namespace; A's client knows B as remote
    `b`. Everything goes when the module is done."""
    yield from make_tls_pair(tmp_path_factory)


@pytest.fixture(scope="module")
def lxd502(tls_pair, tmp_path_factory):
    """LXD 5.0.2 started by scripts/bench/daemons.py inside the pair's namespace, with the busybox
    image and a TLS listener on loopback; A's client knows it as `lx`, its own client knows A as
    `ou`. (Used by tests/integration/test_migration*.py; test_backups_lxd_interop.py has its own.)"""
    import json
    import subprocess

    from tests.helpers import busybox_tarball, lxd502_setup

    daemons, wd = lxd502_setup(tmp_path_factory, "miglxd")
    d = daemons.Daemon("lxd", "LXD 5.0.2", daemons.DEBIAN_LXD, wd, run_prefix(), netns=str(tls_pair.ns.path))
    port = int(tls_pair.ns.run("/usr/bin/python3", "-c", "import socket; s = socket.socket(); "
                               "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])").stdout)
    try:
        d.start()
        d.preseed("default")
        d.lxc("image", "import", str(busybox_tarball()), "--alias", "busybox")
        d.lxc("config", "set", "core.https_address", f"127.0.0.1:{port}")
        d.lxc("config", "set", "core.trust_password", tls_pair.password)
        tls_pair.remote_add(tls_pair.a, "lx", f"https://127.0.0.1:{port}")
        r = subprocess.run(["nsenter", f"--net={tls_pair.ns.path}", daemons.LXC, "remote", "add", "ou",
                            tls_pair.url_a, f"--password={tls_pair.password}", "--accept-certificate"],
                           env=d.env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

        def lxc_ns(*args, check=True):
            r = subprocess.run(["nsenter", f"--net={tls_pair.ns.path}", daemons.LXC, *args], env=d.env,
                               capture_output=True, text=True, timeout=300)
            assert not check or r.returncode == 0, r.stderr
            return r

        d.lxc_ns = lxc_ns
        yield d
    finally:
        try:
            for inst_ in json.loads(d.lxc("list", "--format=json", check=False).stdout or "[]"):
                d.lxc("delete", "-f", inst_["name"], check=False)
            d.stop()
        finally:
            daemons.cleanup(wd, log=lambda *_: None)
