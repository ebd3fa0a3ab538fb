"""Managed macvlan networks: a named parent for macvlan nics (`nictype=macvlan` or
`network=NAME`); the network itself puts nothing on the host."""

from __future__ import annotations

import asyncio

from lxd_daemon.networks.drivers.base import (
    InvalidConfig,
    NetworkDriver,
    is_any,
    is_bool,
    is_interface_name,
    is_mtu,
    is_vlan,
    optional,
    required,
)


class MacvlanDriver(NetworkDriver):
    type = "macvlan"
    keys = {
        "parent": required(is_interface_name),
        "mtu": optional(is_mtu),
        "vlan": optional(is_vlan),
        "gvrp": optional(is_bool),
        "maas.subnet.ipv4": is_any,
        "maas.subnet.ipv6": is_any,
    }

    def nic_parent(self) -> str:
        return self.config["parent"]

    def running(self) -> bool:
        from lxd_daemon.networks import host

        return host.exists(self.nic_parent())

    async def start(self, old_config: dict[str, str] | None = None) -> None:
        if not await asyncio.to_thread(self.running):
            raise InvalidConfig(f"Parent interface {self.nic_parent()!r} not found")

    async def update(self, old_config: dict[str, str]) -> None:
        await self.start(old_config)
