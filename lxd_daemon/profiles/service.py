"""The profile store (kept in memory, written through to the database) and profile updates,
validated against and applied to every instance that uses the profile."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from sqlalchemy import text

from lxd_daemon import names
from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.instances import validation


@dataclass
class Profile:
    id: int
    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_expand_input(self) -> dict:
        return {"config": self.config, "devices": self.devices}


def validate_name(name: str) -> None:
    try:
        names.profile(name)
    except names.InvalidName as e:
        raise BadRequest(e.message) from None


class ProfileService:
    def __init__(self, services):
        self.services = services
        self.db = services.db
        self.profiles: dict[str, Profile] = {}
        self.lock = asyncio.Lock()

    async def load(self) -> None:
        def q(session):
            return session.execute(text("SELECT id, name, description, config, devices FROM profiles")).all()

        for r in await self.db.run(q):
            self.profiles[r.name] = Profile(r.id, r.name, r.description, json.loads(r.config), json.loads(r.devices))

    def get(self, name: str) -> Profile:
        p = self.profiles.get(name)
        if p is None:
            raise NotFound("Profile not found")
        return p

    def used_by(self, name: str) -> list[str]:
        inst = self.services.instances
        if inst is None:
            return []
        return [f"/1.0/instances/{n}" for n in inst.names_using_profile(name)]

    def render(self, p: Profile) -> dict:
        return {"name": p.name, "description": p.description, "config": dict(p.config),
                "devices": {k: dict(v) for k, v in p.devices.items()}, "used_by": self.used_by(p.name)}

    def _pools(self) -> set[str] | None:
        storage = self.services.storage
        return set(storage.pools) if storage is not None else None

    def validate(self, config: dict, devices: dict) -> None:
        validation.validate_config(config, profile=True)
        validation.validate_devices(devices, profile=True, pools=self._pools())

    async def _check_raw_lxc(self, config: dict) -> None:
        """raw.lxc is checked by liblxc (through a worker) when it is set, as LXD does."""
        from lxd_daemon.instances.lxcconf import check_raw_lxc

        await check_raw_lxc(self.services.runtime, config.get("raw.lxc"))

    async def create(self, name: str, description: str, config: dict, devices: dict) -> Profile:
        validate_name(name)
        config = {k: v for k, v in config.items() if v != ""}  # an empty value unsets the key
        self.validate(config, devices)
        await self._check_raw_lxc(config)
        async with self.lock:
            if name in self.profiles:
                raise Conflict(f"Profile {name!r} already exists")

            def ins(session):
                return session.execute(
                    text("INSERT INTO profiles (name, description, config, devices) VALUES (:n, :d, :c, :v) "
                         "RETURNING id"),
                    {"n": name, "d": description, "c": json.dumps(config), "v": json.dumps(devices)}).scalar_one()

            pid = await self.db.run(ins)
            p = Profile(pid, name, description, dict(config), {k: dict(v) for k, v in devices.items()})
            self.profiles[name] = p
            return p

    async def update(self, name: str, description: str, config: dict, devices: dict) -> None:
        p = self.get(name)
        config = {k: v for k, v in config.items() if v != ""}  # an empty value unsets the key
        self.validate(config, devices)
        if config.get("raw.lxc") != p.config.get("raw.lxc"):
            await self._check_raw_lxc(config)
        async with self.lock:
            old = (p.description, p.config, p.devices)
            new = (description, dict(config), {k: dict(v) for k, v in devices.items()})
            inst = self.services.instances
            # Check every instance using the profile accepts the change before writing anything.
            if inst is not None:
                await inst.check_profile_change(name, new[1], new[2])

            def upd(session):
                session.execute(text("UPDATE profiles SET description=:d, config=:c, devices=:v WHERE id=:i"),
                                {"d": description, "c": json.dumps(new[1]), "v": json.dumps(new[2]), "i": p.id})

            await self.db.run(upd)
            before = {n: inst.expanded(n) for n in inst.names_using_profile(name)} if inst is not None else {}
            p.description, p.config, p.devices = new
            if inst is not None:
                try:
                    await inst.apply_profile_change(before)
                except Exception:
                    # Roll back the profile if any running instance refused the change live.
                    p.description, p.config, p.devices = old

                    def back(session):
                        session.execute(
                            text("UPDATE profiles SET description=:d, config=:c, devices=:v WHERE id=:i"),
                            {"d": old[0], "c": json.dumps(old[1]), "v": json.dumps(old[2]), "i": p.id})

                    await self.db.run(back)
                    await inst.apply_profile_change({n: inst.expanded(n) for n in before}, best_effort=True)
                    raise

    async def rename(self, name: str, new_name: str) -> None:
        p = self.get(name)
        if name == "default":
            raise BadRequest("The 'default' profile cannot be renamed")
        validate_name(new_name)
        async with self.lock:
            if new_name in self.profiles:
                raise Conflict(f"Name {new_name!r} already in use")

            def upd(session):
                session.execute(text("UPDATE profiles SET name=:n WHERE id=:i"), {"n": new_name, "i": p.id})

            await self.db.run(upd)
            del self.profiles[name]
            p.name = new_name
            self.profiles[new_name] = p
            inst = self.services.instances
            if inst is not None:
                inst.profile_renamed(name, new_name)

    async def delete(self, name: str) -> None:
        p = self.get(name)
        if name == "default":
            raise BadRequest("The 'default' profile cannot be deleted")
        async with self.lock:
            if self.used_by(name):
                raise BadRequest("Profile is currently in use")

            def rm(session):
                session.execute(text("DELETE FROM profiles WHERE id=:i"), {"i": p.id})

            await self.db.run(rm)
            del self.profiles[name]
