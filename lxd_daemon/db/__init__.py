"""The SQLite store: engine, ORM models, one repository per entity, migrations at start-up."""

from lxd_daemon.db.engine import Database

__all__ = ["Database"]
