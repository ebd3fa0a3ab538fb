"""The `lxd` command: run the daemon, or talk to a running one (waitready, shutdown, init, recover, sql)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lxd_daemon import __version__
from lxd_daemon.settings import Settings, lxd_dir_from_env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lxd", description="LXD-compatible system container daemon",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="environment:\n"
               "  LXD_DIR      the daemon's state directory (default /var/lib/lxd); it listens on\n"
               "               $LXD_DIR/unix.socket, and the stock `lxc` client finds it through the\n"
               "               same variable. Every subcommand (waitready, shutdown, init, recover, sql) uses it.\n"
               "  LXD_WORKERS  default for --workers\n"
               "\n"
               "--debug logs each API request (method, url, requestor, status, time taken).")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--group", help="group that owns the unix socket")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging (includes each API request)")
    p.add_argument("-v", "--verbose", action="store_true", help="informational logging")
    p.add_argument("--logfile", help="also log to this file")
    p.add_argument("--syslog", action="store_true", help="also log to syslog")
    p.add_argument("--workers", type=int, default=int(os.environ.get("LXD_WORKERS", "1")),
                   help="number of liblxc worker processes (default 1)")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("daemon", help="run the daemon (the default)")

    w = sub.add_parser("waitready", help="wait until the daemon is ready")
    w.add_argument("--timeout", type=int, default=0, help="seconds to wait (0: for ever)")

    s = sub.add_parser("shutdown", help="stop the containers and the daemon")
    s.add_argument("--timeout", type=int, default=0, help="seconds to wait (0: for ever)")

    sub.add_parser("activateifneeded", help="start the daemon if there is work for it")

    i = sub.add_parser("init", help="configure the daemon")
    i.add_argument("--auto", action="store_true", help="non-interactive defaults")
    i.add_argument("--preseed", action="store_true", help="read a YAML configuration from stdin")
    i.add_argument("--dump", action="store_true", help="print the current configuration as preseed YAML")
    i.add_argument("--storage-backend", default="",
                   help="storage backend for --auto: dir (the default), btrfs, lvm or zfs")
    i.add_argument("--storage-create-device", default="", metavar="DEVICE",
                   help="for --auto: make the pool on this block device (not with dir)")
    i.add_argument("--storage-create-loop", type=int, default=None, metavar="SIZE",
                   help="for --auto: make the pool on a loop file of SIZE GiB (not with dir)")
    i.add_argument("--storage-pool", default="", metavar="POOL",
                   help="for --auto: with --storage-create-device/--storage-create-loop, the name of the "
                        "new pool (default: default); otherwise an existing source to use (not with dir)")
    i.add_argument("--network-address", help="address to listen on for --auto")
    i.add_argument("--network-port", type=int, default=None, help="port for --network-address (default 8443)")
    i.add_argument("--trust-password", help="trust password for --auto")

    r = sub.add_parser(
        "recover", help="recover missing instances and volumes from existing and unknown storage pools",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find instances (with their snapshots) and custom volumes that are on storage pools but\n"
                    "not in the database, show them, and recreate their records. Without options it asks\n"
                    "what LXD's `lxd recover` asks; with any of the options below it runs without asking.",
        epilog="examples:\n"
               "  lxd recover                      (interactive)\n"
               "  lxd recover --dry-run            (scan every existing pool, print what was found)\n"
               "  lxd recover --yes                (scan every existing pool, recover what was found)\n"
               "  lxd recover --unknown-pool bt:btrfs:/var/lib/lxd/disks/bt.img --yes\n"
               "                                   (a pool whose record is gone too)")
    r.add_argument("--pool", action="append", default=[], metavar="NAME",
                   help="scan this existing pool (repeat for more; default: every existing pool)")
    r.add_argument("--unknown-pool", action="append", default=[], metavar="NAME:DRIVER:SOURCE",
                   help="also scan a pool that has no record: its name, driver and source (a loop file, "
                        "block device or path); repeat for more")
    r.add_argument("--pool-config", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="an extra config key of an --unknown-pool")
    r.add_argument("--yes", action="store_true", help="recover what was found without asking")
    r.add_argument("--dry-run", action="store_true", help="only scan and print what was found")

    st = sub.add_parser("streams", help="write the simplestreams tree of the public images to a directory")
    st.add_argument("action", choices=["export"])
    st.add_argument("directory", help="where to write it (streams/v1/*.json and streams/images/*)")

    sub.add_parser("netcat", help="internal: tie stdin/stdout to a unix socket (rsync's transport in a migration)",
                   usage="lxd netcat SOCKET [NAME]")

    q = sub.add_parser("sql", help="run a SQL query against the database")
    q.add_argument("database", choices=["local", "global"])
    q.add_argument("query", help="the query, or - to read it from stdin")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["netcat"]:  # rsync's remote shell during a migration: no argparse, rsync appends its own args
        from lxd_daemon.migration.netcat import main as netcat

        rc = netcat(argv[1:])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    args = _parser().parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    lxd_dir = lxd_dir_from_env()
    sock = lxd_dir / "unix.socket"
    if args.cmd in (None, "daemon"):
        from lxd_daemon.daemon import run

        return run(Settings(lxd_dir=lxd_dir, group=args.group, debug=args.debug, verbose=args.verbose,
                            logfile=Path(args.logfile) if args.logfile else None, syslog=args.syslog,
                            workers=max(1, args.workers)))
    if args.cmd == "waitready":
        return waitready(sock, args.timeout)
    if args.cmd == "shutdown":
        return shutdown(sock, args.timeout)
    if args.cmd == "activateifneeded":
        from lxd_daemon.cli_tools import activateifneeded

        return activateifneeded(lxd_dir)
    if args.cmd == "init":
        from lxd_daemon.cli_tools import init

        return init(sock, args)
    if args.cmd == "recover":
        from lxd_daemon.cli_recover import recover

        return recover(sock, args)
    if args.cmd == "streams":
        from lxd_daemon.cli_tools import streams_export

        return streams_export(sock, args.directory)
    if args.cmd == "sql":
        from lxd_daemon.cli_tools import sql

        return sql(lxd_dir, args.database, args.query)
    return 2


def _ready(sock: Path) -> bool:
    from lxd_daemon.client import APIError, Client

    try:
        Client(sock, timeout=5).request("GET", "/internal/ready")
        return True
    except (OSError, APIError):
        return False


def waitready(sock: Path, timeout: int) -> int:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while not _ready(sock):
        if deadline is not None and time.monotonic() > deadline:
            print("Error: Daemon still not running after timeout", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def shutdown(sock: Path, timeout: int) -> int:
    """Ask the daemon to stop its containers and exit, then wait until its process is gone.

    Waiting on the pid rather than on the socket: with socket activation the socket outlives
    the daemon, and probing it would start a new one.
    """
    from lxd_daemon.client import APIError, Client

    client = Client(sock, timeout=timeout or 600)
    try:
        pid = int(client.get("/1.0")["environment"]["server_pid"])
        client.request("PUT", "/internal/shutdown")
    except (OSError, APIError, KeyError, TypeError, ValueError) as e:
        print(f"Error: failed to reach the daemon on {sock}: {e}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while _alive(pid):
        if deadline is not None and time.monotonic() > deadline:
            print("Error: Daemon still running after timeout", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
