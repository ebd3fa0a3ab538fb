"""The instance records in the database: the only place that knows the instance tables' SQL.

Tables (migrations/versions/0003_instances.py): instances, instances_config (key/value rows),
instances_profiles (profile ids in apply order). The service keeps Records in memory and calls
this store to persist them; each method is one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import text

from lxd_daemon.instances.models import Record
from lxd_daemon.projects.naming import storage_name


class InstanceStore:
    def __init__(self, db, profile_id: Callable[[str, str], int]):
        self.db = db
        # (instance's project, profile name) -> the row id of that profile of the project's
        # effective profiles project
        self._profile_id = profile_id

    async def load(self) -> tuple[list[Record], list[tuple[int, str]]]:
        """Every complete record, and the (id, name) of rows a crash left `pending`."""

        def q(session):
            rows = session.execute(text(
                "SELECT id, project, name, type, architecture, ephemeral, stateful, description, created_at, "
                "last_used_at, pending, devices FROM instances")).all()
            cfg = session.execute(text("SELECT instance_id, key, value FROM instances_config")).all()
            profs = session.execute(text(
                "SELECT ip.instance_id, p.name FROM instances_profiles ip JOIN profiles p ON p.id = ip.profile_id "
                "ORDER BY ip.instance_id, ip.apply_order")).all()
            return rows, cfg, profs

        rows, cfg, profs = await self.db.run(q)
        configs: dict[int, dict] = {}
        for iid, k, v in cfg:
            configs.setdefault(iid, {})[k] = v
        plist: dict[int, list[str]] = {}
        for iid, pname in profs:
            plist.setdefault(iid, []).append(pname)
        records, pending = [], []
        for r in rows:
            if r.pending:
                pending.append((r.id, storage_name(r.project, r.name)))
                continue
            records.append(Record(r.id, r.name, r.architecture, bool(r.ephemeral), bool(r.stateful),
                                  r.description, r.created_at, r.last_used_at, configs.get(r.id, {}),
                                  json.loads(r.devices), plist.get(r.id, []), r.type, r.project))
        return records, pending

    def write(self, session, rec: Record, *, pending: bool | None = None) -> None:
        """Write `rec` (an existing row) within the caller's transaction."""
        session.execute(text(
            "UPDATE instances SET name=:n, architecture=:a, ephemeral=:e, stateful=:s, description=:d, "
            "last_used_at=:l, devices=:dev" + (", pending=:p" if pending is not None else "") + " WHERE id=:i"),
            {"n": rec.name, "a": rec.architecture, "e": rec.ephemeral, "s": rec.stateful, "d": rec.description,
             "l": rec.last_used_at, "dev": json.dumps(rec.devices), "p": pending, "i": rec.id})
        session.execute(text("DELETE FROM instances_config WHERE instance_id=:i"), {"i": rec.id})
        for k, v in rec.config.items():
            session.execute(text("INSERT INTO instances_config (instance_id, key, value) VALUES (:i, :k, :v)"),
                            {"i": rec.id, "k": k, "v": v})
        session.execute(text("DELETE FROM instances_profiles WHERE instance_id=:i"), {"i": rec.id})
        for order, pname in enumerate(rec.profiles):
            session.execute(text("INSERT INTO instances_profiles (instance_id, profile_id, apply_order) "
                                 "VALUES (:i, :p, :o)"), {"i": rec.id, "p": self._profile_id(rec.project, pname),
                                                          "o": order})

    def insert(self, session, rec: Record) -> int:
        """Insert `rec` (its config, devices and profiles too) within the caller's transaction;
        sets and returns rec.id."""
        rec.id = session.execute(text(
            "INSERT INTO instances (project, name, type, architecture, ephemeral, stateful, description, "
            "created_at, last_used_at, pending, devices) VALUES (:p, :n, :t, :a, :e, :s, :d, :c, :l, 0, "
            "'{}') RETURNING id"),
            {"p": rec.project, "n": rec.name, "t": rec.type, "a": rec.architecture, "e": rec.ephemeral, "s": rec.stateful,
             "d": rec.description, "c": rec.created_at, "l": rec.last_used_at}).scalar_one()
        self.write(session, rec)
        return rec.id

    async def add(self, rec: Record) -> int:
        return await self.db.run(lambda s: self.insert(s, rec))

    async def save(self, rec: Record) -> None:
        await self.db.run(lambda s: self.write(s, rec))

    async def delete(self, iid: int) -> None:
        """Delete the row; its config, profiles, snapshots and backups rows go with it (cascade)."""

        def rm(session):
            session.execute(text("DELETE FROM instances WHERE id=:i"), {"i": iid})

        await self.db.run(rm)

    async def rename(self, iid: int, new: str) -> None:
        def upd(session):
            session.execute(text("UPDATE instances SET name=:n WHERE id=:i"), {"n": new, "i": iid})

        await self.db.run(upd)

    async def set_config_keys(self, iid: int, values: dict[str, str | None], *,
                              last_used_at: str | None = None) -> None:
        """Set (or with None, remove) config keys of one instance, and optionally last_used_at."""

        def w(session):
            if last_used_at is not None:
                session.execute(text("UPDATE instances SET last_used_at=:l WHERE id=:i"),
                                {"l": last_used_at, "i": iid})
            for k, v in values.items():
                session.execute(text("DELETE FROM instances_config WHERE instance_id=:i AND key=:k"),
                                {"i": iid, "k": k})
                if v is not None:
                    session.execute(text("INSERT INTO instances_config (instance_id, key, value) "
                                         "VALUES (:i, :k, :v)"), {"i": iid, "k": k, "v": v})

        await self.db.run(w)
