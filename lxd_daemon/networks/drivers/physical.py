"""Managed physical networks: a host interface (`parent`) handed whole to one `physical` nic at a
time; the network records its MTU, VLAN and gateways and puts nothing on the host itself."""

from __future__ import annotations

from lxd_daemon.networks import subnets
from lxd_daemon.networks.drivers.base import (
    is_address,
    is_bool,
    is_cidr_address,
    is_network,
    is_range,
    list_of,
    one_of,
    optional,
)
from lxd_daemon.networks.drivers.macvlan import MacvlanDriver


class PhysicalDriver(MacvlanDriver):
    type = "physical"
    keys = {
        **MacvlanDriver.keys,
        "ipv4.gateway": optional(is_cidr_address(4)),
        "ipv6.gateway": optional(is_cidr_address(6)),
        "ipv4.ovn.ranges": optional(is_range(4)),
        "ipv6.ovn.ranges": optional(is_range(6)),
        "ipv4.routes": optional(list_of(is_network(4))),
        "ipv4.routes.anycast": optional(is_bool),
        "ipv6.routes": optional(list_of(is_network(6))),
        "ipv6.routes.anycast": optional(is_bool),
        "dns.nameservers": optional(list_of(lambda v: is_address(6 if ":" in v else 4)(v))),
        "ovn.ingress_mode": optional(one_of("l2proxy", "routed")),
        "volatile.last_state.created": optional(is_bool),
    }

    def subnet(self, family: int):
        value = self.config.get(f"ipv{family}.gateway", "")
        return subnets.interface(value, family) if value else None

    def subnets_used(self) -> list:
        return []  # the gateway's subnet is outside, not something this network puts on the host
