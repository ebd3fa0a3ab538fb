"""The projects: their records (name, description, config) in memory and in the database,
which project a request's images, profiles, volumes and networks come from (the `features.*`
keys), and the project lifecycle (create, rename, delete).

The policy half (limits and restrictions, projects/policy.py) is the base class: its `configs`
are this service's projects' configs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import text

from lxd_daemon.errors import BadRequest, Conflict, Forbidden, NotFound
from lxd_daemon.projects import policy
from lxd_daemon.projects.naming import DEFAULT, query
from lxd_daemon.util.revert import Revert

# What LXD 5.0.2 turns on in a new project unless the request says otherwise.
FEATURE_DEFAULTS = ("features.images", "features.profiles", "features.storage.volumes")


@dataclass
class Project:
    id: int
    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)

    def has(self, feature: str) -> bool:
        """Whether the project has its own `feature` (images, profiles, storage.volumes, networks)."""
        return self.name == DEFAULT or policy.is_true(self.config.get(f"features.{feature}"))

    def effective(self, feature: str) -> str:
        """The project whose `feature` objects this project uses: itself, or `default`."""
        return self.name if self.has(feature) else DEFAULT

    @property
    def query(self) -> str:
        return query(self.name)


def making(projects: ProjectService | None, name: str):
    """ProjectService.making(name), or nothing to hold when there are no projects (a service
    alone, in unit tests)."""
    return projects.making(name) if projects is not None else contextlib.nullcontext()


# A contents provider: async (project name) -> the URLs of what the project holds (its `used_by`).
Provider = Callable[[str], Awaitable[list[str]]]


class ProjectService(policy.ProjectPolicy):
    def __init__(self, db, events=None):
        super().__init__(db)
        self.events = events
        self.projects: dict[str, Project] = {}
        self.providers: list[Provider] = []
        # Called after a project is created (its default profile), before an empty one is deleted,
        # and when an empty one is renamed (old, new).
        self.on_create: list[Callable[[str], Awaitable[None]]] = []
        self.on_delete: list[Callable[[str], Awaitable[None]]] = []
        self.on_rename: list[Callable[[str, str], Awaitable[None]]] = []
        # Called after a config change is written (features.* on an empty project: its default profile).
        self.on_update: list[Callable[[str], Awaitable[None]]] = []
        self.lock = asyncio.Lock()
        self.closing: set[str] = set()  # being renamed or deleted (check_open)
        self.busy: dict[str, int] = {}  # project -> things being made in it (making())

    async def load(self) -> None:
        def q(session):
            return session.execute(text("SELECT id, name, description, config FROM projects")).all()

        for r in await self.db.run(q):
            self.projects[r.name] = Project(r.id, r.name, r.description, policy.parse_config(r.config))
        await self.load_volumes()

    # -- reading ------------------------------------------------------------------------------
    def get(self, name: str) -> Project:
        p = self.projects.get(name)
        if p is None:
            raise NotFound("Project not found")
        return p

    def names(self) -> list[str]:
        return sorted(self.projects)

    def effective(self, project: str, feature: str) -> str:
        return self.get(project).effective(feature)

    # The policy's config state is the projects' own (Project.config): one copy.
    def config(self, project: str = DEFAULT) -> dict[str, str]:
        p = self.projects.get(project)
        return p.config if p is not None else {}

    def set_config(self, project: str, config: dict[str, str]) -> None:
        p = self.projects.get(project)
        if p is not None:
            p.config = dict(config)

    async def used_by(self, name: str) -> list[str]:
        out: list[str] = []
        for provider in self.providers:
            out.extend(await provider(name))
        return sorted(set(out))

    async def is_empty(self, name: str) -> bool:
        """LXD's rule: nothing but its own `default` profile (and nothing being made)."""
        if self.busy.get(name):
            return False
        return all(u.split("?")[0] == "/1.0/profiles/default" for u in await self.used_by(name))

    async def render(self, name: str) -> dict:
        p = self.get(name)
        return {"name": p.name, "description": p.description, "config": dict(p.config),
                "used_by": await self.used_by(name)}

    # -- changes ------------------------------------------------------------------------------
    async def create(self, name: str, description: str, config: dict[str, str]) -> Project:
        config = {str(k): str(v) for k, v in config.items() if v != ""}
        for feature in FEATURE_DEFAULTS:
            config.setdefault(feature, "true")
        policy.validate_config(config, {}, name)
        async with self.lock:
            if name in self.projects:
                raise Conflict(f"Project {name!r} already exists")

            def ins(session) -> int:
                return session.execute(text(
                    "INSERT INTO projects (name, description, config) VALUES (:n, :d, :c) RETURNING id"),
                    {"n": name, "d": description, "c": json.dumps(config, sort_keys=True)}).scalar_one()

            pid = await self.db.run(ins)
            project = Project(pid, name, description, dict(config))
            self.projects[name] = project
            async with Revert() as revert:
                # Undone as a whole: the on_delete hooks (each removes whatever the project has
                # of its kind, which is nothing for a hook that didn't run), then the row.
                revert.add(self._forget, name)
                for hook in self.on_delete:
                    revert.add(hook, name)
                for hook in self.on_create:
                    await hook(name)
                revert.success()
        return project

    def check_features_change(self, name: str, new: dict[str, str], empty: bool) -> None:
        """features.* can only change on an empty project (and never on default)."""
        current = self.get(name).config
        changed = [k for k in policy.changed_keys(new, current) if k.startswith("features.")]
        if changed and name != DEFAULT and not empty:
            raise BadRequest("Features can only be changed on empty projects")

    async def update(self, name: str, description: str, config: dict[str, str]) -> None:
        """Write a config already validated and checked (api/projects.py)."""
        p = self.get(name)

        def write(session, description=description, config=config):
            old = session.execute(text("SELECT description, config FROM projects WHERE name=:n"), {"n": name}).one()
            session.execute(text("UPDATE projects SET description=:d, config=:c WHERE name=:n"),
                            {"d": description, "c": json.dumps(config, sort_keys=True), "n": name})
            return old

        old = await self.db.run(write)
        p.description = description
        self.set_config(name, config)
        try:
            for hook in self.on_update:
                await hook(name)
        except BaseException:  # the caller restores the config in memory; the row goes back here
            await self.db.run(lambda s: write(s, old.description, json.loads(old.config)))
            p.description = old.description
            raise

    async def check_rename(self, name: str, new: str) -> None:
        if name == DEFAULT:
            raise Forbidden("The 'default' project cannot be renamed")
        self.get(name)
        if new in self.projects:
            raise Conflict(f"A project named {new!r} already exists")
        if not await self.is_empty(name):
            raise BadRequest("Only empty projects can be renamed")

    def check_open(self, name: str) -> None:
        """Before something is made in a project (an instance reserved, ...): the project exists and
        isn't being renamed or deleted. Both mark it closing before they check that it is empty, so
        whatever was made before the mark is seen by that check, and nothing after it."""
        if name not in self.projects or name in self.closing:
            raise NotFound("Project not found")

    @contextlib.contextmanager
    def making(self, name: str):
        """Held while something is made in a project (a custom volume, a profile, an image row):
        the project is open when it starts, and a delete or rename meanwhile finds it not empty."""
        self.check_open(name)
        self.busy[name] = self.busy.get(name, 0) + 1
        try:
            yield
        finally:
            self.busy[name] -= 1
            if not self.busy[name]:
                del self.busy[name]

    @contextlib.contextmanager
    def _closing(self, name: str):
        self.closing.add(name)
        try:
            yield
        finally:
            self.closing.discard(name)

    async def rename(self, name: str, new: str) -> None:
        async with self.lock:
            with self._closing(name):
                await self.check_rename(name, new)

                def mv(session):
                    session.execute(text("UPDATE projects SET name=:new WHERE name=:n"), {"new": new, "n": name})

                await self.db.run(mv)
                p = self.projects.pop(name)
                p.name = new
                self.projects[new] = p
                for hook in self.on_rename:
                    await hook(name, new)

    async def delete(self, name: str) -> None:
        async with self.lock:
            if name == DEFAULT:
                raise Forbidden("The 'default' project cannot be deleted")
            self.get(name)
            with self._closing(name):
                if not await self.is_empty(name):
                    raise BadRequest("Only empty projects can be removed")
                for hook in self.on_delete:
                    await hook(name)
                await self._forget(name)

    async def _forget(self, name: str) -> None:
        def rm(session):
            session.execute(text("DELETE FROM projects WHERE name=:n"), {"n": name})

        await self.db.run(rm)
        self.projects.pop(name, None)
        self.claims.pop(name, None)
