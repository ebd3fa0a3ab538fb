"""The network service: host interfaces as LXD's unmanaged networks (managed networks come later).

Reads run in a thread (sysfs, procfs and netlink block). Instances and profiles that name an
interface in a `nic` device (`parent` or `network`) are listed in its `used_by`, as LXD does.
"""

from __future__ import annotations

import asyncio

from lxd_daemon.errors import NotFound, NotImplementedYet
from lxd_daemon.networks import host

MANAGED_NOT_YET = "Managed networks are not implemented yet"


class NetworkService:
    def __init__(self, services):
        self.services = services

    async def names(self) -> list[str]:
        return await asyncio.to_thread(host.interface_names)

    async def _check(self, name: str) -> None:
        if not await asyncio.to_thread(host.exists, name):
            raise NotFound("Network not found")

    def _used_by(self, name: str) -> list[str]:
        def uses(devices: dict) -> bool:
            return any(d.get("type") == "nic" and name in (d.get("parent"), d.get("network"))
                       for d in devices.values())

        out = []
        profiles = self.services.profiles
        for pname, p in sorted((profiles.profiles if profiles else {}).items()):
            if uses(p.devices):
                out.append(f"/1.0/profiles/{pname}")
        instances = self.services.instances
        for n in sorted(instances.records if instances else ()):
            if uses(instances.expanded(n)[1]):
                out.append(f"/1.0/instances/{n}")
        return out

    async def render(self, name: str) -> dict:
        """api.Network of a host interface (404 when there is none by that name)."""
        await self._check(name)
        kind = await asyncio.to_thread(host.kind, name)
        return {"config": {}, "description": "", "name": name, "type": kind,
                "used_by": [] if kind == "loopback" else self._used_by(name),
                "managed": False, "status": "", "locations": None}

    async def render_all(self) -> list[dict]:
        out = []
        for name in await self.names():
            try:
                out.append(await self.render(name))
            except NotFound:  # went away meanwhile
                continue
        return out

    async def state(self, name: str) -> dict:
        if not await asyncio.to_thread(host.exists, name):
            raise NotFound(f"Network interface {name!r} not found")
        return await asyncio.to_thread(host.state, name)

    async def refuse_change(self, name: str | None = None) -> None:
        """Creating, changing, renaming or deleting a network: managed networks do not exist yet."""
        if name is None:
            raise NotImplementedYet(MANAGED_NOT_YET)
        await self._check(name)
        raise NotImplementedYet(f"{MANAGED_NOT_YET}: {name!r} is a host interface, which LXD lists but "
                                "does not manage")
