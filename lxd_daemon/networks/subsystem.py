"""Wires networks into the daemon: the host's interfaces, read-only."""

from __future__ import annotations

from lxd_daemon.api import networks
from lxd_daemon.networks.service import NetworkService


async def setup(services) -> list:
    services.networks = NetworkService(services)
    # `network` gates every `lxc network` command, `network_state` `lxc network info`.
    services.server.advertise("network", "network_state")
    return [networks.router]
