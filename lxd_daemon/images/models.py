"""ORM models of the image store. The schema is owned by migrations/versions/0002_images.py."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from lxd_daemon.db.models import Base


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    project: Mapped[str] = mapped_column(String, nullable=False, default="default")
    filename: Mapped[str] = mapped_column(String, nullable=False, default="")
    size: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    architecture: Mapped[str] = mapped_column(String, nullable=False, default="")
    type: Mapped[str] = mapped_column(String, nullable=False, default="container")
    # "unified" or "split"; for split images the rootfs file format ("squashfs" or a tar compression).
    layout: Mapped[str] = mapped_column(String, nullable=False, default="unified")
    rootfs_format: Mapped[str] = mapped_column(String, nullable=False, default="")
    # The compression of the main file (the unified tarball or the metadata tarball).
    compression: Mapped[str] = mapped_column(String, nullable=False, default="")
    properties: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    profiles: Mapped[str] = mapped_column(Text, nullable=False, default='["default"]')
    public: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    auto_update: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    cached: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # Unix times; NULL is LXD's zero time.
    created_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    uploaded_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Where a cached/auto-updating image came from (filled in by the remotes work).
    source_server: Mapped[str | None] = mapped_column(String, nullable=True)
    source_protocol: Mapped[str | None] = mapped_column(String, nullable=True)
    source_certificate: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_alias: Mapped[str | None] = mapped_column(String, nullable=True)
    source_image_type: Mapped[str | None] = mapped_column(String, nullable=True)


class ImageAlias(Base):
    __tablename__ = "images_aliases"
    __table_args__ = (UniqueConstraint("project", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project: Mapped[str] = mapped_column(String, nullable=False, default="default")
    name: Mapped[str] = mapped_column(String, nullable=False)
    image_id: Mapped[int] = mapped_column(Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
