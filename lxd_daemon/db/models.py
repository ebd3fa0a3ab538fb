"""ORM models. The schema is owned by the Alembic migrations in migrations/; keep both in step."""

from __future__ import annotations

from sqlalchemy import Boolean, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ConfigEntry(Base):
    """Server configuration (`/1.0` config)."""

    __tablename__ = "config"

    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)


class Certificate(Base):
    """Trusted client certificates."""

    __tablename__ = "certificates"
    __table_args__ = (UniqueConstraint("fingerprint"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    type: Mapped[str] = mapped_column(String, nullable=False, default="client")
    name: Mapped[str] = mapped_column(String, nullable=False, default="")
    certificate: Mapped[str] = mapped_column(Text, nullable=False)
    restricted: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    projects: Mapped[str] = mapped_column(Text, nullable=False, default="[]")


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    config: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
