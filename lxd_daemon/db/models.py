"""Table definitions (SQLAlchemy Core: the daemon never loads the ORM). The schema is owned by the
Alembic migrations in migrations/; keep both in step."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, Text, UniqueConstraint

metadata = MetaData()

# Server configuration (`/1.0` config).
config = Table(
    "config", metadata,
    Column("key", String, primary_key=True),
    Column("value", Text, nullable=False),
)

# Trusted client certificates.
certificates = Table(
    "certificates", metadata,
    Column("id", Integer, primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("type", String, nullable=False, default="client"),
    Column("name", String, nullable=False, default=""),
    Column("certificate", Text, nullable=False),
    Column("restricted", Boolean, nullable=False, default=False),
    Column("projects", Text, nullable=False, default="[]"),
    Column("created_at", Float, nullable=True),  # unix time it was added (migration 0006)
    UniqueConstraint("fingerprint"),
)

projects = Table(
    "projects", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String, nullable=False, unique=True),
    Column("description", Text, nullable=False, default=""),
    Column("config", Text, nullable=False, default="{}"),
)

# Managed networks (migration 0005).
networks = Table(
    "networks", metadata,
    Column("id", Integer, primary_key=True),
    Column("project", String, nullable=False, default="default"),
    Column("name", String, nullable=False),
    Column("type", String, nullable=False, default="bridge"),
    Column("description", Text, nullable=False, default=""),
    Column("config", Text, nullable=False, default="{}"),
    Column("status", String, nullable=False, default="Created"),
    UniqueConstraint("project", "name"),
)

# Warnings the daemon raised (migration 0009): one row per (type, project, entity).
warnings = Table(
    "warnings", metadata,
    Column("id", Integer, primary_key=True),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("project", String, nullable=True),  # NULL: server-wide
    Column("type", String, nullable=False),  # LXD's type name ("Storage pool unavailable")
    Column("entity_type", String, nullable=False, default=""),  # "storage-pool", "instance", ""
    Column("entity_url", String, nullable=False, default=""),
    Column("last_message", Text, nullable=False, default=""),
    Column("count", Integer, nullable=False, default=1),
    Column("first_seen_at", Float, nullable=False),  # unix times
    Column("last_seen_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("status", String, nullable=False, default="new"),  # new | acknowledged | resolved
    Column("severity", String, nullable=False, default="low"),  # low | moderate | high
)
