"""The SQLite store: engine, Core table definitions, migrations at start-up."""

from lxd_daemon.db.engine import Database

__all__ = ["Database"]
