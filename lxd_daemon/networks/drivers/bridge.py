"""Managed bridges (`bridge.driver=native`): the bridge interface, its addresses, forwarding,
the network's nftables chains (NAT, DHCP/DNS access, forwarding) and one supervised dnsmasq.

start() is declarative: each step makes the host match the config and keeps what already
matches, so it serves create, every daemon start (a running bridge, its ports and a running
dnsmasq are adopted as they are) and config changes alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
from pathlib import Path

from lxd_daemon.networks import subnets
from lxd_daemon.networks.drivers.base import (
    InvalidConfig,
    NetworkDriver,
    address_or,
    falsy_or_empty,
    is_address,
    is_any,
    is_bool,
    is_duration,
    is_interface_name,
    is_mac,
    is_mtu,
    is_network,
    is_range,
    list_of,
    one_of,
    optional,
    truthy,
)

log = logging.getLogger("lxd.networks")


def ipv6_enabled_by_default() -> bool:
    """LXD fills `ipv6.address=auto` only where the kernel gives new interfaces IPv6."""
    try:
        return Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").read_text() == "0\n"
    except OSError:
        return False


def stable_hwaddr(seed: str) -> str:
    """A MAC address in LXD's 00:16:3e range derived from `seed` (same seed, same address)."""
    d = hashlib.sha256(seed.encode()).digest()
    return f"00:16:3e:{d[0]:02x}:{d[1]:02x}:{d[2]:02x}"


class BridgeDriver(NetworkDriver):
    type = "bridge"
    has_interface = True
    keys = {
        "bridge.driver": optional(one_of("native", "openvswitch")),
        "bridge.external_interfaces": optional(list_of(is_interface_name, "Invalid interface name")),
        "bridge.hwaddr": optional(is_mac),
        "bridge.mtu": optional(is_mtu),
        "bridge.mode": optional(one_of("standard", "fan")),
        "fan.overlay_subnet": optional(is_network(4)),
        "fan.underlay_subnet": optional(lambda v: None if v == "auto" else is_network(4)(v)),
        "fan.type": optional(one_of("vxlan", "ipip")),
        "ipv4.address": optional(address_or(4, "none", "auto")),
        "ipv4.firewall": optional(is_bool),
        "ipv4.nat": optional(is_bool),
        "ipv4.nat.order": optional(one_of("before", "after")),
        "ipv4.nat.address": optional(is_address(4)),
        "ipv4.dhcp": optional(is_bool),
        "ipv4.dhcp.gateway": optional(is_address(4)),
        "ipv4.dhcp.expiry": optional(is_duration),
        "ipv4.dhcp.ranges": optional(is_range(4)),
        "ipv4.routes": optional(list_of(is_network(4))),
        "ipv4.routing": optional(is_bool),
        "ipv6.address": optional(address_or(6, "none", "auto")),
        "ipv6.firewall": optional(is_bool),
        "ipv6.nat": optional(is_bool),
        "ipv6.nat.order": optional(one_of("before", "after")),
        "ipv6.nat.address": optional(is_address(6)),
        "ipv6.dhcp": optional(is_bool),
        "ipv6.dhcp.expiry": optional(is_duration),
        "ipv6.dhcp.stateful": optional(is_bool),
        "ipv6.dhcp.ranges": optional(is_range(6)),
        "ipv6.routes": optional(list_of(is_network(6))),
        "ipv6.routing": optional(is_bool),
        "dns.domain": is_any,
        "dns.mode": optional(one_of("dynamic", "managed", "none")),
        "dns.search": is_any,
        "raw.dnsmasq": is_any,
        "maas.subnet.ipv4": is_any,
        "maas.subnet.ipv6": is_any,
        "security.acls": is_any,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dnsmasq = None  # networks.dnsmasq.Dnsmasq while one runs for the bridge
        self._dnsmasq_cfg = None  # the config it runs with
        self._lock = asyncio.Lock()

    # -- names and config ----------------------------------------------------------------------

    @classmethod
    def validate_name(cls, name: str) -> None:
        is_interface_name(name)
        super().validate_name(name)

    def fill_config(self, config: dict[str, str]) -> dict[str, str]:
        """LXD's defaults: an `auto` IPv4 subnet (and IPv6 where the kernel has it), with NAT
        when the address is `auto`. `auto` is then replaced by populate_auto()."""
        config = dict(config)
        if config.get("bridge.mode") != "fan":
            if not config.get("ipv4.address"):
                config["ipv4.address"] = "auto"
            if config["ipv4.address"] == "auto" and not config.get("ipv4.nat"):
                config["ipv4.nat"] = "true"
            if not config.get("ipv6.address") and ipv6_enabled_by_default():
                config["ipv6.address"] = "auto"
            if config.get("ipv6.address") == "auto" and not config.get("ipv6.nat"):
                config["ipv6.nat"] = "true"
        return config

    def populate_auto(self, config: dict[str, str], used: list) -> dict[str, str]:
        """Replace `auto` addresses by unused subnets (ValueError when none is found)."""
        config = dict(config)
        for family in (4, 6):
            key = f"ipv{family}.address"
            if config.get(key) == "auto":
                config[key] = subnets.pick(family, used)
                used = [*used, ipaddress.ip_interface(config[key]).network]
        return config

    def check(self, config: dict[str, str]) -> None:
        if config.get("bridge.driver") == "openvswitch":
            raise InvalidConfig("Open vSwitch isn't installed on this system")
        mode = config.get("bridge.mode", "")
        if mode == "fan":
            raise InvalidConfig("The FAN bridge mode is not supported by this server")
        for key, value in config.items():
            if key.startswith("fan.") and value:
                raise InvalidConfig("FAN configuration may only be set when in 'fan' mode")
        if config.get("security.acls"):
            raise InvalidConfig("Network ACLs are not supported by this server (security.acls)")
        if config.get("bridge.hwaddr") and config.get("bridge.external_interfaces") \
                and config.get("ipv4.address") == "none" and config.get("ipv6.address") == "none":
            raise InvalidConfig('Cannot use static "bridge.hwaddr" MAC address when bridge has no IP addresses '
                                'and has external interfaces set')
        for family in (4, 6):
            value = config.get(f"ipv{family}.address", "")
            if not subnets.is_set(value) or value == "auto":
                continue
            subnet = subnets.interface(value, family).network
            rngs = config.get(f"ipv{family}.dhcp.ranges", "")
            if rngs:
                outside = subnets.ranges_within(subnets.ranges(rngs, family), subnet)
                if outside:
                    raise InvalidConfig(f"The range {outside!r} in \"ipv{family}.dhcp.ranges\" is not inside "
                                        f"the network's subnet {subnet}")

    # -- values nics use -----------------------------------------------------------------------

    def nic_parent(self) -> str:
        return self.name

    def mtu(self) -> int | None:
        value = self.config.get("bridge.mtu", "")
        return int(value) if value else None

    def subnet(self, family: int):
        value = self.config.get(f"ipv{family}.address", "")
        if not subnets.is_set(value) or value == "auto":
            return None
        return subnets.interface(value, family)

    def hwaddr(self) -> str:
        return self.config.get("bridge.hwaddr") or stable_hwaddr(f"{self.ctx.seed}.0.{self.id}")

    def dhcp(self, family: int) -> bool:
        return self.subnet(family) is not None and not falsy_or_empty(self.config.get(f"ipv{family}.dhcp", "true"))

    # -- host ----------------------------------------------------------------------------------

    async def create(self) -> None:
        from lxd_daemon.networks import netlink

        if await asyncio.to_thread(netlink.link_exists, self.name):
            raise InvalidConfig(f"Network interface {self.name!r} already exists")

    def _external(self, config: dict[str, str] | None = None) -> list[str]:
        value = (config if config is not None else self.config).get("bridge.external_interfaces", "")
        return [e.strip() for e in value.split(",") if e.strip()]

    def _routes(self, config: dict[str, str], family: int) -> list[str]:
        value = config.get(f"ipv{family}.routes", "")
        return [str(subnets.network(r, family)) for r in value.split(",") if r.strip()]

    def _ensure_host(self, old_config: dict[str, str] | None) -> None:
        """The blocking part of start(): interface, addresses, sysctls, routes, firewall."""
        from lxd_daemon.networks import netlink

        name = self.name
        if self.subnet(6) is not None and not Path("/proc/sys/net/ipv6").exists():
            raise InvalidConfig("Network has ipv6.address but kernel IPv6 support is missing")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o711)
        mtu = self.mtu() or 1500
        netlink.create_bridge(name)
        netlink.set_link(name, mtu=mtu, hwaddr=self.hwaddr())
        v4, v6 = self.subnet(4), self.subnet(6)
        if Path("/proc/sys/net/ipv6").exists():
            if v6 is not None:
                netlink.set_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "0")
                netlink.set_sysctl(f"net/ipv6/conf/{name}/autoconf", "0")
                netlink.set_sysctl(f"net/ipv6/conf/{name}/accept_dad", "0")
            else:
                # No guessable link-local address for the host on a bridge without IPv6.
                netlink.set_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")
        netlink.set_link(name, up=True)

        # External interfaces: attach the listed ones (only unconfigured ones), detach dropped ones.
        if old_config is not None:
            for dev in self._external(old_config):
                if dev not in self._external() and netlink.link_exists(dev):
                    netlink.set_link(dev, master="")
        if self._external():
            addrs = _global_addresses_by_link()
            for dev in self._external():
                if not netlink.link_exists(dev):
                    log.warning("skipping missing external interface", extra={"network": name, "interface": dev})
                    continue
                if addrs.get(dev):
                    raise InvalidConfig("Only unconfigured network interfaces can be bridged")
                netlink.set_link(dev, master=name, up=True)

        netlink.set_addresses(name, [a for a in (v4, v6) if a is not None])

        # Extra routes to the bridge (ipv4.routes / ipv6.routes).
        for family in (4, 6):
            wanted = self._routes(self.config, family) if self.subnet(family) is not None else []
            if old_config is not None:
                for r in self._routes(old_config, family):
                    if r not in wanted:
                        netlink.del_route(r, name)
            for r in wanted:
                netlink.add_route(r, name)

        if v4 is not None and not falsy_or_empty(self.config.get("ipv4.routing", "true")):
            netlink.set_sysctl("net/ipv4/ip_forward", "1")
        if v6 is not None and not falsy_or_empty(self.config.get("ipv6.routing", "true")):
            conf = Path("/proc/sys/net/ipv6/conf")
            for entry in sorted(os.listdir(conf)):
                # Keep accepting router advertisements where they were (forwarding turns it off).
                try:
                    if (conf / entry / "accept_ra").read_text() == "1\n":
                        netlink.set_sysctl(f"net/ipv6/conf/{entry}/accept_ra", "2")
                except OSError:
                    continue
            netlink.set_sysctl("net/ipv6/conf/all/forwarding", "1")

        self._apply_firewall()

    def _family_rules(self, family: int):
        from lxd_daemon.networks.firewall import FamilyRules

        iface = self.subnet(family)
        if iface is None:
            return None
        c = self.config
        return FamilyRules(subnet=str(iface.network), nat=truthy(c.get(f"ipv{family}.nat")),
                           nat_address=c.get(f"ipv{family}.nat.address", ""),
                           nat_order=c.get(f"ipv{family}.nat.order") or "before",
                           firewall=not falsy_or_empty(c.get(f"ipv{family}.firewall", "true")),
                           routing=not falsy_or_empty(c.get(f"ipv{family}.routing", "true")))

    def _apply_firewall(self) -> None:
        fw = self.ctx.firewall
        if fw is None:
            if any(truthy(self.config.get(f"ipv{f}.nat")) for f in (4, 6) if self.subnet(f) is not None):
                raise InvalidConfig(f"Network {self.name!r} needs NAT but nftables is not usable on this host")
            return
        v4, v6 = self._family_rules(4), self._family_rules(6)
        if v4 is None and v6 is None:
            fw.network_drop(self.name)
        else:
            fw.network_apply(self.name, bridge=self.name, v4=v4, v6=v6)

    def dnsmasq_config(self):
        from lxd_daemon.networks.dnsmasq import DnsmasqConfig

        c = self.config
        v4, v6 = self.subnet(4), self.subnet(6)
        raw = []
        if c.get("ipv4.dhcp.gateway"):
            raw.append(f"dhcp-option-force=3,{c['ipv4.dhcp.gateway']}")
        if c.get("dns.search"):
            raw.append(f"dhcp-option-force=119,{c['dns.search'].strip()}")
        if c.get("raw.dnsmasq"):
            raw.append(c["raw.dnsmasq"])
        v4_ranges = subnets.ranges(c["ipv4.dhcp.ranges"], 4) if c.get("ipv4.dhcp.ranges") else (
            [(subnets.nth(v4.network, 2), subnets.nth(v4.network, -2))] if v4 is not None else [])
        v6_ranges = subnets.ranges(c["ipv6.dhcp.ranges"], 6) if c.get("ipv6.dhcp.ranges") else (
            [(subnets.nth(v6.network, 2), subnets.nth(v6.network, -1))] if v6 is not None else [])
        return DnsmasqConfig(
            network=self.name, bridge=self.name, state_dir=self.state_dir,
            ipv4=v4, ipv4_ranges=v4_ranges, ipv4_expiry=c.get("ipv4.dhcp.expiry") or "1h",
            ipv4_dhcp=self.dhcp(4),
            ipv6=v6, ipv6_dhcp=self.dhcp(6), ipv6_stateful=truthy(c.get("ipv6.dhcp.stateful")),
            ipv6_ranges=v6_ranges, ipv6_expiry=c.get("ipv6.dhcp.expiry") or "1h",
            dns_domain=c.get("dns.domain") or "lxd", dns_mode=c.get("dns.mode") or "managed",
            raw="\n".join(raw), mtu=self.mtu())

    def wants_dnsmasq(self) -> bool:
        return self.subnet(4) is not None or self.subnet(6) is not None

    async def _ensure_dnsmasq(self) -> None:
        from lxd_daemon.networks import dnsmasq

        if not self.wants_dnsmasq():
            await self._stop_dnsmasq()
            return
        cfg = self.dnsmasq_config()
        if self._dnsmasq is None:
            d = dnsmasq.Dnsmasq(cfg)
            await d.start()
            self._dnsmasq = d
        elif self._dnsmasq_cfg != cfg:
            await self._dnsmasq.restart(cfg)
        self._dnsmasq_cfg = cfg

    async def _stop_dnsmasq(self) -> None:
        from lxd_daemon.networks import dnsmasq

        if self._dnsmasq is not None:
            d, self._dnsmasq, self._dnsmasq_cfg = self._dnsmasq, None, None
            await d.stop()
        await asyncio.to_thread(dnsmasq.stop_stale, self.state_dir)

    async def start(self, old_config: dict[str, str] | None = None) -> None:
        async with self._lock:
            await asyncio.to_thread(self._ensure_host, old_config)
            await self._ensure_dnsmasq()

    async def update(self, old_config: dict[str, str]) -> None:
        await self.start(old_config)

    async def stop(self) -> None:
        from lxd_daemon.networks import netlink

        async with self._lock:
            await self._stop_dnsmasq()
            if self.ctx.firewall is not None:
                await asyncio.to_thread(self.ctx.firewall.network_drop, self.name)
            for dev in self._external():
                if await asyncio.to_thread(netlink.link_exists, dev):
                    await asyncio.to_thread(netlink.set_link, dev, master="")
            await asyncio.to_thread(netlink.delete_link, self.name)

    async def rename(self, new_name: str) -> None:
        from lxd_daemon.networks import netlink

        if await asyncio.to_thread(netlink.link_exists, new_name):
            raise InvalidConfig(f"Network interface {new_name!r} already exists")
        await self.stop()
        old_dir = self.state_dir
        self.name = new_name
        if old_dir.exists():
            await asyncio.to_thread(os.replace, old_dir, self.state_dir)
        await self.start()

    async def close(self) -> None:
        d, self._dnsmasq = self._dnsmasq, None
        if d is not None:
            d.detach()  # dnsmasq keeps running; the next daemon adopts it

    # -- reads ---------------------------------------------------------------------------------

    async def leases(self) -> list[dict]:
        out = []
        for family in (4, 6):
            iface = self.subnet(family)
            if iface is not None:
                out.append({"hostname": f"{self.name}.gw", "hwaddr": "", "address": str(iface.ip),
                            "type": "gateway", "location": "none"})
        if self._dnsmasq is not None:
            out.extend(await asyncio.to_thread(self._dnsmasq.leases))
        return out

    async def nic_attach(self, key: str, *, hwaddr: str, hostname: str, ipv4: str | None = None,
                         ipv6: str | None = None) -> None:
        if self._dnsmasq is None:
            return
        await asyncio.to_thread(self._dnsmasq.set_host, key, hwaddr, hostname=hostname, ipv4=ipv4, ipv6=ipv6)

    async def nic_detach(self, key: str) -> None:
        if self._dnsmasq is None:
            return
        await asyncio.to_thread(self._dnsmasq.drop_host, key)


def _global_addresses_by_link() -> dict[str, list[str]]:
    """{interface: [global addresses]} of the daemon's namespace."""
    from lxd_daemon.networks import host

    out: dict[str, list[str]] = {}
    for name in host.interface_names():
        out[name] = [a["address"] for a in host.addresses(name) if a["scope"] == "global"]
    return out
