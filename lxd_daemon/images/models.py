"""Tables of the image store (SQLAlchemy Core). The schema is owned by migrations/versions/0002_images.py."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from lxd_daemon.db.models import metadata

images = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("project", String, nullable=False, default="default"),
    Column("filename", String, nullable=False, default=""),
    Column("size", BigInteger, nullable=False, default=0),
    Column("architecture", String, nullable=False, default=""),
    Column("type", String, nullable=False, default="container"),
    # "unified" or "split"; for split images the rootfs file format ("squashfs" or a tar compression).
    Column("layout", String, nullable=False, default="unified"),
    Column("rootfs_format", String, nullable=False, default=""),
    # The compression of the main file (the unified tarball or the metadata tarball).
    Column("compression", String, nullable=False, default=""),
    Column("properties", Text, nullable=False, default="{}"),
    Column("profiles", Text, nullable=False, default='["default"]'),
    Column("public", Boolean, nullable=False, default=False),
    Column("auto_update", Boolean, nullable=False, default=False),
    Column("cached", Boolean, nullable=False, default=False),
    # Unix times; NULL is LXD's zero time.
    Column("created_at", Float, nullable=True),
    Column("expires_at", Float, nullable=True),
    Column("uploaded_at", Float, nullable=True),
    Column("last_used_at", Float, nullable=True),
    # Where a cached/auto-updating image came from (filled in by the remotes work).
    Column("source_server", String, nullable=True),
    Column("source_protocol", String, nullable=True),
    Column("source_certificate", Text, nullable=True),
    Column("source_alias", String, nullable=True),
    Column("source_image_type", String, nullable=True),
    # One row per project holding the image (migration 0008); the files are shared by fingerprint.
    UniqueConstraint("project", "fingerprint"),
)

images_aliases = Table(
    "images_aliases", metadata,
    Column("id", Integer, primary_key=True),
    Column("project", String, nullable=False, default="default"),
    Column("name", String, nullable=False),
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    Column("description", Text, nullable=False, default=""),
    UniqueConstraint("project", "name"),
)
