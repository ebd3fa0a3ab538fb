"""Projects: instances and profiles belong to a project; their names are unique within it.

Revision ID: 0007
Revises: 0006

SQLite can't change a table's UNIQUE constraint in place, so both tables are rebuilt (the
documented create-copy-drop-rename; env.py turns foreign keys off around migrations, and row ids
are kept, so the rows that refer to them are untouched).
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_INSTANCES = """CREATE TABLE {table} (
    id INTEGER NOT NULL PRIMARY KEY,
    project VARCHAR DEFAULT 'default' NOT NULL,
    name VARCHAR NOT NULL,
    type VARCHAR DEFAULT 'container' NOT NULL,
    architecture VARCHAR DEFAULT '' NOT NULL,
    ephemeral BOOLEAN DEFAULT 0 NOT NULL,
    stateful BOOLEAN DEFAULT 0 NOT NULL,
    description TEXT DEFAULT '' NOT NULL,
    created_at VARCHAR NOT NULL,
    last_used_at VARCHAR DEFAULT '' NOT NULL,
    pending BOOLEAN DEFAULT 0 NOT NULL,
    devices TEXT DEFAULT '{{}}' NOT NULL,
    UNIQUE (project, name))"""
_INSTANCE_COLUMNS = ("id, name, type, architecture, ephemeral, stateful, description, created_at, "
                     "last_used_at, pending, devices")

_PROFILES = """CREATE TABLE {table} (
    id INTEGER NOT NULL PRIMARY KEY,
    project VARCHAR DEFAULT 'default' NOT NULL,
    name VARCHAR NOT NULL,
    description TEXT DEFAULT '' NOT NULL,
    config TEXT DEFAULT '{{}}' NOT NULL,
    devices TEXT DEFAULT '{{}}' NOT NULL,
    UNIQUE (project, name))"""
_PROFILE_COLUMNS = "id, name, description, config, devices"


def _rebuild(table: str, create: str, columns: str) -> None:
    tmp = f"_new_{table}"
    op.execute(create.format(table=tmp))
    op.execute(f"INSERT INTO {tmp} (project, {columns}) SELECT 'default', {columns} FROM {table}")
    op.execute(f"DROP TABLE {table}")
    op.execute(f"ALTER TABLE {tmp} RENAME TO {table}")


def upgrade() -> None:
    _rebuild("instances", _INSTANCES, _INSTANCE_COLUMNS)
    _rebuild("profiles", _PROFILES, _PROFILE_COLUMNS)


def downgrade() -> None:
    for table, columns in (("instances", _INSTANCE_COLUMNS), ("profiles", _PROFILE_COLUMNS)):
        op.execute(f"DELETE FROM {table} WHERE project != 'default'")
        tmp = f"_old_{table}"
        op.execute(f"CREATE TABLE {tmp} AS SELECT {columns} FROM {table}")
        op.execute(f"DROP TABLE {table}")
        op.execute(f"ALTER TABLE {tmp} RENAME TO {table}")
