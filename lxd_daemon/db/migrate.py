"""Schema migrations at start-up.

The daemon only imports Alembic when the database is behind the newest migration, so an
up-to-date start-up costs one SELECT. History is linear: revision ids are the numeric
prefixes of the files in migrations/versions (0001, 0002, ...).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger("lxd.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"


def head_revision(migrations_dir: Path = MIGRATIONS_DIR) -> str:
    revs = sorted(p.name.split("_", 1)[0] for p in (migrations_dir / "versions").glob("[0-9]*_*.py"))
    if not revs:
        raise RuntimeError(f"no migrations found in {migrations_dir}")
    return revs[-1]


def current_revision(db_path: Path) -> str | None:
    if not db_path.exists():
        return None
    con = sqlite3.connect(db_path)
    try:
        row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()
    return row[0] if row else None


def alembic_config(db_path: Path, migrations_dir: Path = MIGRATIONS_DIR):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("sqlalchemy.url", f"sqlite:///{db_path}")
    return cfg


def upgrade(db_path: Path, migrations_dir: Path = MIGRATIONS_DIR) -> bool:
    """Bring the database to the newest schema. Returns True if anything was applied."""
    head = head_revision(migrations_dir)
    current = current_revision(db_path)
    if current == head:
        return False
    from alembic import command

    log.info("applying schema migrations", extra={"from": current or "empty", "to": head})
    command.upgrade(alembic_config(db_path, migrations_dir), "head")
    return True
