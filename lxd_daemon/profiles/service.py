"""The profile store (kept in memory, written through to the database) and profile updates,
validated against and applied to every instance that uses the profile.

Profiles belong to a project: each project with `features.profiles` has its own (and its own
`default` profile); the others use default's. Every method takes the caller's project and
resolves the project the profiles come from (`effective(project, "profiles")`) itself.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from sqlalchemy import text

from lxd_daemon import names
from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.instances import validation
from lxd_daemon.projects.naming import DEFAULT, query
from lxd_daemon.projects.service import making


@dataclass
class Profile:
    id: int
    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    project: str = DEFAULT  # the project the profile is stored in

    def as_expand_input(self) -> dict:
        return {"config": self.config, "devices": self.devices}

    @property
    def url(self) -> str:
        return f"/1.0/profiles/{self.name}{query(self.project)}"


def validate_name(name: str) -> None:
    try:
        names.profile(name)
    except names.InvalidName as e:
        raise BadRequest(e.message) from None


def default_description(project: str) -> str:
    return "Default LXD profile" if project == DEFAULT else f"Default LXD profile for project {project}"


class ProfileService:
    def __init__(self, services):
        self.services = services
        self.db = services.db
        # project the profiles are stored in -> name -> Profile
        self.by_project: dict[str, dict[str, Profile]] = {}
        self.lock = asyncio.Lock()

    async def load(self) -> None:
        def q(session):
            return session.execute(text(
                "SELECT id, project, name, description, config, devices FROM profiles")).all()

        for r in await self.db.run(q):
            self.by_project.setdefault(r.project, {})[r.name] = Profile(
                r.id, r.name, r.description, json.loads(r.config), json.loads(r.devices), r.project)
        projects = self.services.projects
        if projects is not None:
            projects.on_create.append(self._project_created)
            projects.on_delete.append(self._project_deleted)
            projects.on_rename.append(self._project_renamed)
            projects.on_update.append(self._project_updated)
            projects.providers.append(self._project_used_by)

    # -- reading ------------------------------------------------------------------------------
    def effective(self, project: str) -> str:
        """The project whose profiles `project` uses (404 "Project not found" for no project)."""
        projects = self.services.projects
        return projects.effective(project, "profiles") if projects is not None else DEFAULT

    def in_project(self, project: str) -> dict[str, Profile]:
        """The profiles `project` uses, by name (those of its effective profiles project)."""
        return self.by_project.get(self.effective(project), {})

    def get(self, project: str, name: str) -> Profile:
        p = self.in_project(project).get(name)
        if p is None:
            raise NotFound("Profile not found")
        return p

    def id_of(self, project: str, name: str) -> int:
        return self.get(project, name).id

    def used_by(self, p: Profile) -> list[str]:
        """The instances (of every project whose profiles are `p`'s project's) that use `p`."""
        inst = self.services.instances
        if inst is None:
            return []
        return [inst.url(k) for k in inst.keys_using_profile(p.project, p.name)]

    def render(self, p: Profile) -> dict:
        return {"name": p.name, "description": p.description, "config": dict(p.config),
                "devices": {k: dict(v) for k, v in p.devices.items()}, "used_by": self.used_by(p)}

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

    # -- changes ------------------------------------------------------------------------------
    async def _insert(self, project: str, name: str, description: str, config: dict, devices: dict) -> Profile:
        def ins(session):
            return session.execute(
                text("INSERT INTO profiles (project, name, description, config, devices) "
                     "VALUES (:p, :n, :d, :c, :v) RETURNING id"),
                {"p": project, "n": name, "d": description, "c": json.dumps(config),
                 "v": json.dumps(devices)}).scalar_one()

        pid = await self.db.run(ins)
        p = Profile(pid, name, description, dict(config), {k: dict(v) for k, v in devices.items()}, project)
        self.by_project.setdefault(project, {})[name] = p
        return p

    async def create(self, project: str, name: str, description: str, config: dict, devices: dict) -> Profile:
        validate_name(name)
        eff = self.effective(project)
        config = {k: v for k, v in config.items() if v != ""}  # an empty value unsets the key
        self.validate(config, devices)
        await self._check_raw_lxc(config)
        with making(self.services.projects, eff):  # not in a project being deleted
            async with self.lock:
                if name in self.by_project.get(eff, {}):
                    raise Conflict(f"Profile {name!r} already exists")
                inst = self.services.instances
                if inst is not None:  # the project's limits and restrictions (no instance uses it yet)
                    await inst.check_profile_change(eff, name, config, devices)
                return await self._insert(eff, name, description, config, devices)

    async def update(self, project: str, name: str, description: str, config: dict, devices: dict) -> None:
        p = self.get(project, name)
        config = {k: v for k, v in config.items() if v != ""}  # an empty value unsets the key
        self.validate(config, devices)
        if config.get("raw.lxc") != p.config.get("raw.lxc"):
            await self._check_raw_lxc(config)
        async with self.lock:
            old = (p.description, p.config, p.devices)
            new = (description, dict(config), {k: dict(v) for k, v in devices.items()})
            inst = self.services.instances
            # Check every instance using the profile (in any project using p's project's
            # profiles) accepts the change before writing anything.
            if inst is not None:
                await inst.check_profile_change(p.project, name, new[1], new[2])

            def upd(session):
                session.execute(text("UPDATE profiles SET description=:d, config=:c, devices=:v WHERE id=:i"),
                                {"d": description, "c": json.dumps(new[1]), "v": json.dumps(new[2]), "i": p.id})

            await self.db.run(upd)
            users = inst.keys_using_profile(p.project, name) if inst is not None else []
            before = {k: inst.expanded(k) for k in users}
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
                    await inst.apply_profile_change({k: inst.expanded(k) for k in before}, best_effort=True)
                    raise

    async def rename(self, project: str, name: str, new_name: str) -> Profile:
        p = self.get(project, name)
        if name == "default":
            raise BadRequest("The 'default' profile cannot be renamed")
        validate_name(new_name)
        async with self.lock:
            profiles = self.by_project[p.project]
            if new_name in profiles:
                raise Conflict(f"Name {new_name!r} already in use")

            def upd(session):
                session.execute(text("UPDATE profiles SET name=:n WHERE id=:i"), {"n": new_name, "i": p.id})

            await self.db.run(upd)
            del profiles[name]
            p.name = new_name
            profiles[new_name] = p
            inst = self.services.instances
            if inst is not None:  # (the instances refer to the profile by id in the database)
                inst.profile_renamed(p.project, name, new_name)
            return p

    async def delete(self, project: str, name: str) -> Profile:
        p = self.get(project, name)
        if name == "default":
            raise BadRequest("The 'default' profile cannot be deleted")
        async with self.lock:
            if self.used_by(p):
                raise BadRequest("Profile is currently in use")
            await self._delete_row(p)
            return p

    async def _delete_row(self, p: Profile) -> None:
        def rm(session):
            session.execute(text("DELETE FROM profiles WHERE id=:i"), {"i": p.id})

        await self.db.run(rm)
        self.by_project.get(p.project, {}).pop(p.name, None)

    # -- project hooks (projects/service.py) ------------------------------------------------------
    async def _ensure_default(self, project: str) -> None:
        """A project with features.profiles has its own `default` profile; one without has none."""
        if project == DEFAULT:
            return
        own = self.services.projects.get(project).has("profiles")
        async with self.lock:
            profiles = self.by_project.get(project, {})
            if own and "default" not in profiles:
                await self._insert(project, "default", default_description(project), {}, {})
            elif not own and set(profiles) == {"default"}:
                # (features.profiles only changes on an empty project: nothing but its default profile)
                await self._delete_row(profiles["default"])
                self.by_project.pop(project, None)

    async def _project_created(self, project: str) -> None:
        await self._ensure_default(project)

    async def _project_updated(self, project: str) -> None:
        await self._ensure_default(project)

    async def _project_deleted(self, project: str) -> None:
        async with self.lock:
            def rm(session):
                session.execute(text("DELETE FROM profiles WHERE project=:p"), {"p": project})

            await self.db.run(rm)
            self.by_project.pop(project, None)

    async def _project_renamed(self, old: str, new: str) -> None:
        async with self.lock:
            def mv(session):
                session.execute(text("UPDATE profiles SET project=:new WHERE project=:old"), {"new": new, "old": old})

            await self.db.run(mv)
            profiles = self.by_project.pop(old, {})
            for p in profiles.values():
                p.project = new
            if profiles:
                self.by_project[new] = profiles

    async def _project_used_by(self, project: str) -> list[str]:
        """A project's own profiles (none for a project using default's)."""
        if self.effective(project) != project:
            return []
        return [p.url for _, p in sorted(self.by_project.get(project, {}).items())]
