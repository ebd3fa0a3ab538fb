"""`lxd init`, `lxd sql`, `lxd activateifneeded` and `lxd streams export`: clients of a running
daemon or of its files."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from lxd_daemon.client import APIError, Client

SECTIONS = ("config", "networks", "storage_pools", "profiles", "projects", "cluster")
_ENDPOINT_NAMES = {"networks": "networks", "storage_pools": "storage pools", "profiles": "profiles"}


class InitError(Exception):
    pass


def _exists(client: Client, path: str, what: str) -> bool:
    try:
        client.request("GET", path)
        return True
    except APIError as e:
        if e.status == 404:
            # Tell "no such object" from "no such endpoint".
            try:
                client.request("GET", path.rsplit("/", 1)[0])
            except APIError as e2:
                if e2.status == 404:
                    raise InitError(f"This daemon does not support {what} yet") from None
                raise
            return False
        raise


def apply_preseed(client: Client, seed: dict) -> None:
    if not isinstance(seed, dict):
        raise InitError("Invalid preseed: expected a YAML mapping")
    unknown = [k for k in seed if k not in SECTIONS]
    if unknown:
        raise InitError(f"Invalid preseed: unknown section {unknown[0]!r}")
    if seed.get("cluster"):
        raise InitError("Clustering is not supported by this daemon")
    for project in seed.get("projects") or []:
        if not project.get("name"):
            raise InitError("Invalid preseed: a project has no name")
    if seed.get("config"):
        client.request("PATCH", "/1.0", {"config": seed["config"]})
    for item in seed.get("projects") or []:
        name = item["name"]
        if _exists(client, f"/1.0/projects/{name}", "projects"):
            put = {k: v for k, v in item.items() if k in ("config", "description")}
            client.request("PATCH", f"/1.0/projects/{name}", put)
        else:
            client.request("POST", "/1.0/projects", {k: v for k, v in item.items()
                                                     if k in ("name", "config", "description")})
    for section, base in (("storage_pools", "/1.0/storage-pools"), ("networks", "/1.0/networks")):
        for item in seed.get(section) or []:
            name = item.get("name")
            if not name:
                raise InitError(f"Invalid preseed: an entry in {section} has no name")
            if _exists(client, f"{base}/{name}", _ENDPOINT_NAMES[section]):
                put = {k: v for k, v in item.items() if k in ("config", "description")}
                client.wait(client.request("PATCH", f"{base}/{name}", put))
            else:
                client.wait(client.request("POST", base, item))
    for item in seed.get("profiles") or []:
        name = item.get("name")
        if not name:
            raise InitError("Invalid preseed: a profile has no name")
        if _exists(client, f"/1.0/profiles/{name}", "profiles"):
            current = client.get(f"/1.0/profiles/{name}")
            put = {
                "description": item.get("description", current.get("description", "")),
                "config": {**current.get("config", {}), **(item.get("config") or {})},
                "devices": {**current.get("devices", {}), **(item.get("devices") or {})},
            }
            client.request("PUT", f"/1.0/profiles/{name}", put)
        else:
            client.request("POST", "/1.0/profiles", item)


# Sections of `lxd init --dump`: (section, collection, fields kept, keep an entry?).
_DUMP = (
    ("networks", "/1.0/networks", ("name", "description", "type", "config"), lambda n: n.get("managed", True)),
    ("storage_pools", "/1.0/storage-pools", ("name", "description", "driver", "config"), None),
    ("profiles", "/1.0/profiles", ("name", "description", "config", "devices"), None),
    ("projects", "/1.0/projects", ("name", "description", "config"), None),
)


def dump(client: Client) -> dict:
    """The current configuration as a preseed (what `lxd init --preseed` would recreate)."""
    server = client.get("/1.0") or {}
    out: dict = {"config": {k: v for k, v in (server.get("config") or {}).items()
                            if k != "core.trust_password"}}
    for section, path, fields, keep in _DUMP:
        try:
            items = client.get(f"{path}?recursion=1") or []
        except APIError as e:
            if e.status == 404:  # an endpoint this daemon does not serve yet
                out[section] = []
                continue
            raise
        out[section] = [{f: item.get(f) for f in fields if f in item}
                        for item in items if isinstance(item, dict) and (keep is None or keep(item))]
    out["cluster"] = None
    return out


STORAGE_BACKENDS = ("dir", "btrfs", "lvm", "zfs")


def _auto_pool(args) -> dict | None:
    """The pool `lxd init --auto` makes, as LXD 5.0 makes it from the storage flags: named
    `default` (or --storage-pool with a device or loop), on --storage-create-device (`source`),
    on a loop file of --storage-create-loop GiB (`size`), or on an existing --storage-pool
    (`source`); the driver decides what it can do with them (lvm and zfs refuse on hosts
    without device-mapper or ZFS)."""
    backend = getattr(args, "storage_backend", "") or ""
    device = getattr(args, "storage_create_device", "") or ""
    loop = getattr(args, "storage_create_loop", None)
    source_pool = getattr(args, "storage_pool", "") or ""
    if backend and backend not in STORAGE_BACKENDS:
        raise InitError(f"The requested backend {backend!r} isn't supported by lxd init "
                        f"(supported: {', '.join(STORAGE_BACKENDS)})")
    if backend in ("", "dir"):
        if device or loop is not None or source_pool:
            raise InitError("None of --storage-pool, --storage-create-device or --storage-create-loop "
                            "may be used with the 'dir' backend")
    elif device and loop is not None:
        raise InitError("Only one of --storage-create-device or --storage-create-loop can be specified")
    if loop is not None and loop < 1:
        raise InitError(f"Invalid --storage-create-loop {loop}: a size in GiB, at least 1")
    pool: dict = {"name": "default", "driver": backend or "dir", "config": {}}
    if device:
        pool["config"]["source"] = device
    elif loop is not None:
        pool["config"]["size"] = f"{loop}GiB"
    elif source_pool:
        pool["config"]["source"] = source_pool
    if source_pool and (device or loop is not None):
        pool["name"] = source_pool
    return pool


def _storage_configured(client: Client, pool: dict, args) -> bool:
    """Whether storage is set up already (the default profile has a root disk, or the pool
    exists): then --auto leaves it alone, and refuses storage flags as LXD does."""
    try:
        devices = (client.get("/1.0/profiles/default") or {}).get("devices") or {}
    except APIError as e:
        if e.status != 404:
            raise
        devices = {}
    configured = any(d.get("type") == "disk" and d.get("path") == "/" for d in devices.values())
    if not configured:
        try:
            client.request("GET", f"/1.0/storage-pools/{pool['name']}")
            configured = True
        except APIError as e:
            if e.status != 404:
                raise
    flags = (getattr(args, "storage_backend", "") or getattr(args, "storage_create_device", "")
             or getattr(args, "storage_create_loop", None) is not None or getattr(args, "storage_pool", ""))
    if configured and flags:
        raise InitError("Storage has already been configured")
    return configured


def https_address(address: str, port: int | None) -> str:
    """`--network-address`/`--network-port` as `core.https_address` (an IPv6 address in brackets;
    an address that carries its own port keeps it), as LXD writes it."""
    port = 8443 if port is None else port
    if not 0 < port < 65536:
        raise InitError(f"Invalid --network-port {port}: a port number (1-65535)")
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{port}"
    if address.count(":") > 1:  # a bare IPv6 address
        return f"[{address}]:{port}"
    if ":" in address:
        return address
    return f"{address}:{port}"


def auto_seed(args, client: Client | None = None) -> dict:
    seed: dict = {"config": {}}
    port = getattr(args, "network_port", None)
    if args.network_address:
        seed["config"]["core.https_address"] = https_address(args.network_address, port)
        if args.trust_password:
            seed["config"]["core.trust_password"] = args.trust_password
    elif port is not None:
        raise InitError("--network-port can't be used without --network-address")
    elif args.trust_password:
        raise InitError("--trust-password can't be used without --network-address")
    pool = _auto_pool(args)
    if pool is not None and not (client is not None and _storage_configured(client, pool, args)):
        seed["storage_pools"] = [pool]
        seed["profiles"] = [{"name": "default", "devices": {
            "root": {"type": "disk", "path": "/", "pool": pool["name"]}}}]
    if not seed["config"]:
        del seed["config"]
    return seed


def init(sock: Path, args) -> int:
    import yaml

    client = Client(sock, timeout=600)
    try:
        if args.dump:
            print(yaml.safe_dump(dump(client), sort_keys=False), end="")
            return 0
        if args.preseed:
            try:
                seed = yaml.safe_load(sys.stdin.read()) or {}
            except yaml.YAMLError as e:
                raise InitError(f"Failed to parse the preseed: {e}") from None
        elif args.auto:
            seed = auto_seed(args, client)
        else:
            raise InitError("Interactive init is not supported: use --auto or --preseed")
        apply_preseed(client, seed)
    except (InitError, APIError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"Error: can't reach the daemon on {sock}: {e}", file=sys.stderr)
        return 1
    return 0


def _table(headers: list[str], rows: list[tuple]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [sep, "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |", sep]
    for row in cells:
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    out.append(sep)
    return "\n".join(out)


def sql(lxd_dir: Path, database: str, query: str) -> int:
    """Query the store. This daemon keeps one SQLite database; `local` and `global` both name it."""
    if query == "-":
        query = sys.stdin.read()
    db = lxd_dir / "database" / "lxd.db"
    if not db.exists():
        print(f"Error: no database at {db}", file=sys.stderr)
        return 1
    con = sqlite3.connect(db, timeout=10)
    try:
        if query.strip() == ".dump":
            print("\n".join(con.iterdump()))
            return 0
        if query.strip() == ".schema":
            for (stmt,) in con.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"):
                print(stmt + ";")
            return 0
        with con:
            cur = con.execute(query)
            if cur.description is not None:
                headers = [d[0] for d in cur.description]
                print(_table(headers, cur.fetchall()))
            else:
                print(f"Rows affected: {cur.rowcount}")
    except sqlite3.Error as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    finally:
        con.close()
    return 0


_TRUE = ("true", "1", "yes", "on")


def _needs_autostart(con: sqlite3.Connection) -> bool:
    """Whether an instance will be started at daemon start, by the instances subsystem's rule:
    boot.autostart true in its expanded config, or unset and it was running when the daemon stopped."""
    import json

    try:
        config: dict[int, dict[str, str]] = {}
        for iid, key, value in con.execute("SELECT instance_id, key, value FROM instances_config"):
            config.setdefault(iid, {})[key] = value
        profiles: dict[int, list[dict]] = {}
        for iid, raw in con.execute(
                "SELECT ip.instance_id, p.config FROM instances_profiles ip JOIN profiles p "
                "ON p.id = ip.profile_id ORDER BY ip.instance_id, ip.apply_order"):
            profiles.setdefault(iid, []).append(json.loads(raw or "{}"))
        ids = [row[0] for row in con.execute("SELECT id FROM instances")]
    except (sqlite3.OperationalError, ValueError):
        return False  # no instances schema yet
    for iid in ids:
        expanded: dict[str, str] = {}
        for prof in profiles.get(iid, []):
            expanded.update(prof)
        expanded.update(config.get(iid, {}))
        want = expanded.get("boot.autostart")
        if want is not None and str(want).lower() in _TRUE:
            return True
        if want is None and expanded.get("volatile.last_state.power") == "RUNNING":
            return True
    return False


def activateifneeded(lxd_dir: Path) -> int:
    """Wake a socket-activated daemon at boot when it has work: a network listener to open or
    containers to autostart. Otherwise leave it asleep until a client connects."""
    db = lxd_dir / "database" / "lxd.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        try:
            need = con.execute(
                "SELECT 1 FROM config WHERE key='core.https_address' AND value != ''").fetchone() is not None
        except sqlite3.OperationalError:
            need = False
        need = need or _needs_autostart(con)
    finally:
        con.close()
    if not need:
        return 0
    try:
        Client(lxd_dir / "unix.socket", timeout=60).request("GET", "/1.0")
    except (OSError, APIError) as e:
        print(f"Error: failed to activate the daemon: {e}", file=sys.stderr)
        return 1
    return 0


def streams_export(sock: Path, directory: str) -> int:
    """`lxd streams export DIR`: the daemon writes the simplestreams tree of its public images
    (streams/v1/index.json, the catalogue, streams/images/<fingerprint>/<file>) under DIR, for any static
    web server; a remote then uses it with `lxc remote add NAME URL --protocol simplestreams`."""
    dest = Path(directory).resolve()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        meta = Client(sock, timeout=3600).request("POST", "/internal/streams/export", {"path": str(dest)})
    except (OSError, APIError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    files = (meta.get("metadata") or {}).get("files") or []
    images = {f.split("/")[2] for f in files if f.startswith("streams/images/")}
    print(f"Wrote the simplestreams tree of {len(images)} image(s) to {dest}")
    return 0
