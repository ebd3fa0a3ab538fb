"""The warnings on record: raised (an upsert per type, project and entity), resolved, and the
status a user sets (acknowledged, or new again), kept in the `warnings` table (migration 0009).

Types are LXD 5.0.2's type names where LXD has one for the condition, with LXD's severity;
conditions LXD has no type for get names of their own here.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib

from sqlalchemy import and_, delete, select, update

from lxd_daemon.db.models import warnings as table
from lxd_daemon.errors import BadRequest, Forbidden, NotFound
from lxd_daemon.util.timefmt import rfc3339

log = logging.getLogger("lxd.warnings")

STORAGE_POOL_UNAVAILABLE = "Storage pool unavailable"  # LXD's
INSTANCE_AUTOSTART_FAILURE = "Failed to autostart instance"  # LXD's
CRIU_UNUSABLE = "CRIU unusable"  # ours: LXD has no type for it
SCHEDULED_SNAPSHOT_FAILURE = "Failed to create scheduled snapshot"  # ours
STORAGE_POOL_NEARLY_FULL = "Storage pool nearly full"  # ours
SUBID_RANGE_MISSING = "Missing subordinate id range"  # ours

# type name -> severity (LXD's severity for LXD's types).
TYPES: dict[str, str] = {
    STORAGE_POOL_UNAVAILABLE: "high",
    INSTANCE_AUTOSTART_FAILURE: "low",
    "Network unavailable": "high",
    "Instance type not operational": "low",
    "AppArmor support has been disabled": "low",
    "Missing virtiofsd": "low",
    CRIU_UNUSABLE: "low",
    SCHEDULED_SNAPSHOT_FAILURE: "moderate",
    STORAGE_POOL_NEARLY_FULL: "moderate",
    SUBID_RANGE_MISSING: "low",
}

STATUSES = ("new", "acknowledged", "resolved")
# Resolved warnings are dropped once they have been resolved this long (as LXD's daily prune).
PRUNE_AFTER = 24 * 3600

# The kind of object an entity URL names, by its collection.
_ENTITY_TYPES = {
    "instances": "instance", "containers": "instance", "storage-pools": "storage-pool",
    "networks": "network", "images": "image", "profiles": "profile", "projects": "project",
    "certificates": "certificate",
}


def entity_type_of(url: str) -> str:
    parts = url.split("?", 1)[0].strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "1.0":
        return _ENTITY_TYPES.get(parts[1], parts[1])
    return ""


def render(row) -> dict:
    """A warning as LXD's api.Warning."""
    return {
        "status": row.status,
        "uuid": row.uuid,
        "location": "none",
        "project": row.project or "",
        "type": row.type,
        "count": row.count,
        "first_seen_at": rfc3339(row.first_seen_at),
        "last_seen_at": rfc3339(row.last_seen_at),
        "last_message": row.last_message,
        "severity": row.severity,
        "entity_url": row.entity_url,
    }


def _key(type_: str, project: str | None, entity_url: str):
    proj = table.c.project.is_(None) if project is None else table.c.project == project
    return and_(table.c.type == type_, proj, table.c.entity_url == entity_url)


class WarningService:
    """Raising goes to the table at once. Resolving and forgetting are asked for far more often
    than there is anything to resolve (every pool at start-up, every autostart, every deleted
    instance): an index of what is open spares those calls a database write."""

    def __init__(self, db, events=None):
        self.db = db
        self.events = events
        self.open: set[tuple[str, str | None, str]] = set()  # (type, project, entity) not resolved
        self.entities: set[str] = set()  # entity URLs with a warning on record

    async def load(self) -> None:
        """Prune (as LXD's daily task: resolved over a day ago), then index what is on record."""
        await self.prune()
        rows = await self.db.run(lambda s: s.execute(
            select(table.c.type, table.c.project, table.c.entity_url, table.c.status)).all())
        self.entities = {r.entity_url for r in rows if r.entity_url}
        self.open = {(r.type, r.project, r.entity_url or "") for r in rows if r.status != "resolved"}

    # -- raised by the daemon --------------------------------------------------------------
    async def raise_(self, type_: str, message: str, *, project: str | None = None,
                     entity_url: str | None = None) -> str:
        """Record the condition: a new warning, or the one already on record for the same type,
        project and entity seen once more (count, last message and time; new again if it had
        been resolved; an acknowledged one stays acknowledged). Returns its uuid."""
        entity = entity_url or ""
        severity = TYPES.get(type_, "low")

        def upsert(session) -> tuple[str, bool]:
            now = time.time()
            row = session.execute(select(table.c.id, table.c.uuid, table.c.status)
                                  .where(_key(type_, project, entity)).limit(1)).first()
            if row is not None:
                status = "new" if row.status == "resolved" else row.status
                session.execute(update(table).where(table.c.id == row.id).values(
                    last_message=message, last_seen_at=now, updated_at=now, status=status,
                    count=table.c.count + 1))
                return row.uuid, row.status == "resolved"
            new_uuid = str(uuidlib.uuid4())
            session.execute(table.insert().values(
                uuid=new_uuid, project=project, type=type_, entity_type=entity_type_of(entity),
                entity_url=entity, last_message=message, count=1, first_seen_at=now,
                last_seen_at=now, updated_at=now, status="new", severity=severity))
            return new_uuid, True

        uuid, fresh = await self.db.run(upsert)
        self.open.add((type_, project, entity))
        if entity:
            self.entities.add(entity)
        if fresh:
            log.warning(message, extra={"warning": type_, "entity": entity, "uuid": uuid})
        return uuid

    async def resolve(self, type_: str, *, project: str | None = None, entity_url: str | None = None) -> int:
        """Mark the warning of this type, project and entity resolved (the condition is gone).
        Returns how many were resolved (0 or 1)."""
        entity = entity_url or ""
        if (type_, project, entity) not in self.open:
            return 0
        self.open.discard((type_, project, entity))

        def res(session) -> int:
            return session.execute(update(table).where(_key(type_, project, entity),
                                                       table.c.status != "resolved")
                                   .values(status="resolved", updated_at=time.time())).rowcount

        n = await self.db.run(res)
        if n:
            log.info("warning resolved", extra={"warning": type_, "entity": entity})
        return n

    async def forget(self, entity_url: str) -> int:
        """Delete every warning about an object (when the object itself is deleted)."""
        if entity_url not in self.entities:
            return 0
        self.entities.discard(entity_url)
        self.open = {k for k in self.open if k[2] != entity_url}
        return await self.db.run(
            lambda s: s.execute(delete(table).where(table.c.entity_url == entity_url)).rowcount)

    async def prune(self, older_than: float = PRUNE_AFTER) -> int:
        """Delete the warnings resolved more than `older_than` seconds ago."""
        cutoff = time.time() - older_than
        return await self.db.run(lambda s: s.execute(delete(table).where(
            table.c.status == "resolved", table.c.updated_at < cutoff)).rowcount)

    # -- the API ---------------------------------------------------------------------------
    async def list(self, project: str | None = None) -> list[dict]:
        """Every warning, or with `project` only that project's, oldest first."""
        def q(session):
            stmt = select(table).order_by(table.c.id)
            if project is not None:
                stmt = stmt.where(table.c.project == project)
            return session.execute(stmt).all()

        return [render(r) for r in await self.db.run(q)]

    async def get(self, uuid: str) -> dict:
        row = await self.db.run(lambda s: s.execute(select(table).where(table.c.uuid == uuid)).first())
        if row is None:
            raise NotFound("Warning not found")
        return render(row)

    async def set_status(self, uuid: str, status: str) -> None:
        """A user's change: "acknowledged", or "new" again. Resolution is the daemon's."""
        if status not in STATUSES:
            raise BadRequest(f"Invalid warning status {status!r}")
        if status == "resolved":
            raise Forbidden('Status may only be set to "acknowledged" or "new"')

        def upd(session) -> int:
            return session.execute(update(table).where(table.c.uuid == uuid)
                                   .values(status=status, updated_at=time.time())).rowcount

        if not await self.db.run(upd):
            raise NotFound("Warning not found")

    async def delete(self, uuid: str) -> None:
        def rm(session):
            row = session.execute(select(table.c.type, table.c.project, table.c.entity_url)
                                  .where(table.c.uuid == uuid)).first()
            if row is not None:
                session.execute(delete(table).where(table.c.uuid == uuid))
            return row

        row = await self.db.run(rm)
        if row is None:
            raise NotFound("Warning not found")
        self.open.discard((row.type, row.project, row.entity_url or ""))
