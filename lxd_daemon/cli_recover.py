"""`lxd recover`: the client side of the daemon's `/internal/recover/{validate,import}`.

Interactive, it asks what LXD 5.0's `lxd recover` asks, in the same order and words: the pools to
recover besides the existing ones (name, driver, source, extra keys), whether to scan, then shows
the volumes found and what is missing, and whether to recover them. With options it asks nothing
(for scripts): `--pool` picks existing pools, `--unknown-pool NAME:DRIVER:SOURCE` adds a pool that
has no record, `--dry-run` only scans, `--yes` recovers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lxd_daemon.client import APIError, Client


class RecoverError(Exception):
    pass


def _ask(prompt: str) -> str:
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        raise RecoverError("no answer (end of input)")
    return line.strip()


def _ask_bool(prompt: str, default: str) -> bool:
    while True:
        answer = (_ask(prompt) or default).lower()
        if answer in ("yes", "y"):
            return True
        if answer in ("no", "n"):
            return False
        print("Invalid input, try again.\n", file=sys.stderr)


def _ask_string(prompt: str, check) -> str:
    while True:
        answer = _ask(prompt)
        why = check(answer)
        if why is None:
            return answer
        print(f"Invalid input: {why}\n", file=sys.stderr)


def _ask_unknown_pools(existing: list[dict], drivers: list[str]) -> list[dict]:
    pools: list[dict] = []
    while _ask_bool("Would you like to recover another storage pool? (yes/no) [default=no]: ", "no"):
        def name_ok(v: str) -> str | None:
            if not v:
                return "Pool name cannot be empty"
            if any(p["name"] == v for p in pools):
                return f"Storage pool {v!r} is already on recover list"
            return None

        name = _ask_string("Name of the storage pool: ", name_ok)
        driver = _ask_string(f"Name of the storage backend ({', '.join(drivers)}): ",
                             lambda v: None if v in drivers else f"Value must be one of: {', '.join(drivers)}")
        source = _ask_string("Source of the storage pool (block device, volume group, dataset, path, ... as "
                             "applicable): ", lambda v: None if v else "Value cannot be empty")
        config = {"source": source}
        while True:
            kv = _ask_string("Additional storage pool configuration property (KEY=VALUE, empty when done): ",
                             lambda v: None if not v or "=" in v else "Config option should be in the format KEY=VALUE")
            if not kv:
                break
            k, _, v = kv.partition("=")
            config[k] = v
        pools.append({"name": name, "driver": driver, "config": config})
    return pools


def _flag_pools(args, existing: list[dict]) -> tuple[list[dict], list[dict]]:
    names = {p["name"] for p in existing}
    chosen = existing
    if args.pool:
        missing = [n for n in args.pool if n not in names]
        if missing:
            raise RecoverError(f"Storage pool {missing[0]!r} has no record: give it with "
                               "--unknown-pool NAME:DRIVER:SOURCE")
        chosen = [p for p in existing if p["name"] in args.pool]
    unknown: list[dict] = []
    for spec in args.unknown_pool:
        parts = spec.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise RecoverError(f"Invalid --unknown-pool {spec!r}: expected NAME:DRIVER:SOURCE")
        name, driver, source = parts
        if name in names or any(p["name"] == name for p in unknown):
            raise RecoverError(f"Storage pool {name!r} is already on recover list")
        unknown.append({"name": name, "driver": driver, "config": {"source": source}})
    for spec in args.pool_config:
        name, sep, kv = spec.partition(":")
        key, eq, value = kv.partition("=")
        target = next((p for p in unknown if p["name"] == name), None)
        if not sep or not eq or not key or target is None:
            raise RecoverError(f"Invalid --pool-config {spec!r}: expected NAME:KEY=VALUE for an --unknown-pool")
        target["config"][key] = value
    return chosen, unknown


def _print_found(res: dict) -> None:
    vols = res.get("UnknownVolumes") or []
    if vols:
        print("The following unknown volumes have been found:")
        for v in vols:
            print(f" - {str(v.get('type', '')).title()} \"{v.get('name')}\" on pool \"{v.get('pool')}\" in project "
                  f"\"{v.get('project')}\" (includes {v.get('snapshotCount', 0)} snapshots)")


def recover(sock: Path, args) -> int:
    scripted = bool(args.pool or args.unknown_pool or args.pool_config or args.yes or args.dry_run)
    client = Client(sock, timeout=3600)
    try:
        server = client.get("/1.0") or {}
        existing = client.get("/1.0/storage-pools?recursion=1") or []
        print("This LXD server currently has the following storage pools:")
        for p in existing:
            print(f" - {p['name']} (backend=\"{p.get('driver', '')}\", source=\"{(p.get('config') or {}).get('source', '')}\")")
        if scripted:
            existing, unknown = _flag_pools(args, existing)
        else:
            drivers = [d.get("Name") for d in (server.get("environment") or {}).get("storage_supported_drivers") or []]
            unknown = _ask_unknown_pools(existing, drivers)
        print("The recovery process will be scanning the following storage pools:")
        for p in existing:
            print(f" - EXISTING: \"{p['name']}\" (backend=\"{p.get('driver', '')}\", "
                  f"source=\"{(p.get('config') or {}).get('source', '')}\")")
        for p in unknown:
            print(f" - NEW: \"{p['name']}\" (backend=\"{p['driver']}\", source=\"{p['config'].get('source', '')}\")")
        if not scripted and not _ask_bool(
                "Would you like to continue with scanning for lost volumes? (yes/no) [default=yes]: ", "yes"):
            return 0
        print("Scanning for unknown volumes...")
        body = {"pools": [{"name": p["name"]} for p in existing] + unknown}
        while True:
            res = client.request("POST", "/internal/recover/validate", body).get("metadata") or {}
            _print_found(res)
            errors = res.get("DependencyErrors") or []
            if errors:
                print("You are currently missing the following:")
                for e in errors:
                    print(f" - {e}")
                if scripted:
                    raise RecoverError("create the missing entries above, then run `lxd recover` again")
                _ask("Please create those missing entries and then hit ENTER: ")
                continue
            if not res.get("UnknownVolumes"):
                print("No unknown volumes found. Nothing to do.")
                return 0
            break
        if args.dry_run:
            return 0
        if not scripted and not _ask_bool("Would you like those to be recovered? (yes/no) [default=no]: ", "no"):
            return 0
        if scripted and not args.yes:
            return 0
        print("Starting recovery...")
        client.request("POST", "/internal/recover/import", body)
    except (RecoverError, APIError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"Error: can't reach the daemon on {sock}: {e}", file=sys.stderr)
        return 1
    return 0
