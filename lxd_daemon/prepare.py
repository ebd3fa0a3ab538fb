"""First-start work the daemon runs in a child process: the server key pair and schema migrations.

Alembic and cryptography are heavy imports that only this work needs. Running it in a short-lived
child (`python -m lxd_daemon.prepare LXD_DIR`) keeps them out of the long-running daemon's memory.
The parent holds $LXD_DIR/lxd.lock for the whole time, so nothing else touches the state meanwhile.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("lxd.prepare")


def needed(lxd_dir: Path) -> bool:
    """Whether there is first-start or upgrade work (a cheap check: two stats and one SELECT)."""
    from lxd_daemon.db import migrate

    if not (lxd_dir / "server.crt").exists() or not (lxd_dir / "server.key").exists():
        return True
    return migrate.current_revision(lxd_dir / "database" / "lxd.db") != migrate.head_revision()


def prepare(lxd_dir: Path) -> None:
    from lxd_daemon.db import migrate
    from lxd_daemon.trust.certs import ensure_server_cert

    ensure_server_cert(lxd_dir)
    migrate.upgrade(lxd_dir / "database" / "lxd.db")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    args = [a for a in argv if a != "--verbose"]
    if len(args) != 1:
        print("usage: python -m lxd_daemon.prepare [--verbose] LXD_DIR", file=sys.stderr)
        return 2
    from lxd_daemon import logs

    logs.setup(debug=False, verbose=verbose, logfile=None, syslog=False)
    try:
        prepare(Path(args[0]))
    except Exception as e:
        log.error("failed to prepare the state directory", extra={"err": f"{e.__class__.__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
