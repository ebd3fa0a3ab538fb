"""Wires networks into the daemon: managed networks (brought up at start-up, left running at
exit) and the host's interfaces, read-only."""

from __future__ import annotations

from lxd_daemon.api import networks
from lxd_daemon.networks.service import NetworkService

# LXD 5.0.2's API extensions for what is implemented here: the network API itself, state and
# leases, and the bridge, macvlan and physical keys the drivers handle.
EXTENSIONS = (
    "network",
    "network_state",
    "network_leases",
    "network_leases_location",
    "network_dhcp_expiry",
    "network_dhcp_gateway",
    "network_routes",
    "network_hwaddr",
    "network_nat_order",
    "network_nat_address",
    "network_dns_search",
    "network_state_bond_bridge",
    "network_state_vlan",
    "network_type_macvlan",
    "network_type_physical",
)


async def setup(services) -> list:
    svc = NetworkService(services)
    await svc.load()
    services.networks = svc

    async def project_used_by(project: str) -> list[str]:  # a project's own managed networks
        return [svc.url(n, project) for n in svc.managed_names(project)]

    services.projects.providers.append(project_used_by)
    # Up before the instances that use them autostart (startup hooks run after every setup()).
    await svc.start_all()
    services.exit_hooks.append(svc.close)
    services.server.advertise(*EXTENSIONS)
    return [networks.router]
