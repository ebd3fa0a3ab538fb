"""`nic`: a network interface of the container, one module per nictype (bridged, macvlan,
ipvlan, p2p, routed, physical). `network=NAME` names a managed network instead of a nictype: the
type follows from the network's (bridge -> bridged, macvlan, physical), and its parent, MTU and
subnets come from the network service (services.networks, interfaces.md Part B).

How a nic reaches the container (as LXD does it):
- bridged, p2p, routed: the daemon makes a veth pair (host end `host_name` or vethXXXXXXXX, up;
  in the bridge for bridged; with 169.254.0.1 / fe80::1 and a host route per address for routed)
  and hands the peer to the container: at start as an lxc.net "phys" item (liblxc moves it in,
  renames it, sets its MAC and brings it up), when hot-plugged through a runtime worker
  (runtime/nics.py). Removing the host end removes the pair.
- macvlan: liblxc makes it at start (lxc.net type macvlan); hot-plugged, the daemon makes it on
  the host and a worker moves it in.
- ipvlan: liblxc makes it at start (l3s mode, the addresses and a device default route); as in
  LXD it can't be hot-plugged.
- physical: the host interface `parent` itself moves in (liblxc gives it back when the container
  stops; an unplug gives it back under its own name).

Volatile keys (hwaddr, name, host_name) are described in common.py. limits.* go through
networks.netlink.set_limits on the host end, security.*_filtering through the network service's
firewall (nic_filter_apply / nic_filter_drop), static addresses of nics on a managed bridge
through services.networks.nic_attach (a DHCP host entry).
"""

from __future__ import annotations

from lxd_daemon.devices.base import Device, DeviceContext
from lxd_daemon.devices.nic import bridged, ipvlan, macvlan, p2p, physical, routed
from lxd_daemon.devices.nic.common import (
    COMMON,
    UNSUPPORTED,
    NicPrepared,
    needs_hwaddr,
    next_eth_name,
    random_mac,
    unsupported_check,
    volatile_defaults,
)
from lxd_daemon.devices.runconfig import RunConfig
from lxd_daemon.errors import BadRequest, LXDError

KINDS = {m.NICTYPE: m for m in (bridged, macvlan, ipvlan, p2p, routed, physical)}
NETWORK_KINDS = {"bridge": "bridged", "macvlan": "macvlan", "physical": "physical"}

__all__ = ["KINDS", "Nic", "NicPrepared", "volatile_defaults"]


class Nic(Device):
    type = "nic"

    def __init__(self, name: str, config: dict[str, str]):
        super().__init__(name, config)
        self.nictype = config.get("nictype", "") or ("bridged" if config.get("network") else "")
        kind = KINDS.get(self.nictype)
        opts = dict(COMMON)
        opts.update({k: unsupported_check(k) for k in UNSUPPORTED})
        if kind is not None:
            opts.update(kind.OPTIONS)
        if config.get("network"):
            # the network decides the parent (and for a bridge with managed options, the MTU)
            opts.pop("parent", None)
            opts["network"] = lambda value: None
        self.options = opts
        self.kind = kind

    # -- validation ------------------------------------------------------------------------------
    def validate(self, *, profile: bool = False, pools: set[str] | None = None) -> None:
        if self.nictype and self.kind is None:
            raise BadRequest(f"Invalid device {self.name!r}: unsupported nictype {self.nictype!r} (supported: "
                             f"{', '.join(sorted(KINDS))})")
        super().validate(profile=profile, pools=pools)

    def check(self, *, profile: bool, pools: set[str] | None) -> None:
        name, dev = self.name, self.config
        if dev.get("network") and dev.get("nictype") and dev["nictype"] not in ("bridged", "macvlan", "physical"):
            raise BadRequest(f"Invalid device {name!r}: nictype {dev['nictype']!r} can't be used with network")
        if not self.nictype:
            raise BadRequest(f"Invalid device {name!r}: nic devices need a nictype or a network")
        if self.kind is None:
            raise BadRequest(f"Invalid device {name!r}: unsupported nictype {self.nictype!r} (supported: "
                             f"{', '.join(sorted(KINDS))})")
        if "parent" in self.kind.OPTIONS and self.kind.PARENT_REQUIRED and not dev.get("parent") \
                and not dev.get("network"):
            raise BadRequest(f"Invalid device {name!r}: {self.nictype} nics need a parent")
        try:
            self.kind.check(dev)
        except ValueError as e:
            raise BadRequest(f"Invalid device {name!r}: {e}") from None

    @property
    def hotpluggable(self) -> bool:
        return self.kind is not None and self.kind.HOTPLUGGABLE

    @property
    def sort_key(self) -> tuple[int, str]:
        return (0, self.name)

    # -- the instance's record ------------------------------------------------------------------
    def volatile(self, ctx: DeviceContext, key: str) -> str:
        svc = ctx.instances
        rec = svc.records.get(ctx.instance) if svc is not None else None
        return (rec.config.get(f"volatile.{self.name}.{key}", "") if rec is not None else "")

    async def set_volatile(self, ctx: DeviceContext, values: dict[str, str | None], *,
                           background: bool = False) -> None:
        """Write volatile.<dev>.* keys; `background`: in memory now, the store in the background."""
        svc = ctx.instances
        if svc is None or ctx.instance not in svc.records:
            return
        keys = {f"volatile.{self.name}.{k}": v for k, v in values.items()}
        if background:
            svc.set_volatile_soon(ctx.instance, keys)
        else:
            await svc._set_volatile(ctx.instance, keys)

    async def hwaddr(self, ctx: DeviceContext) -> str:
        """The MAC address: the config's, else the kept volatile one (made and kept now if none)."""
        if self.config.get("hwaddr"):
            return self.config["hwaddr"]
        if not needs_hwaddr(self.config):
            return ""
        mac = self.volatile(ctx, "hwaddr")
        if not mac:
            mac = random_mac()
            await self.set_volatile(ctx, {"hwaddr": mac})
        return mac

    async def ifname(self, ctx: DeviceContext) -> str:
        """The interface name inside the container: `name`, else volatile.<dev>.name (the first
        ethN no other nic of the instance uses, kept)."""
        if self.config.get("name"):
            return self.config["name"]
        name = self.volatile(ctx, "name")
        if name:
            return name
        taken: set[str] = set()
        svc = ctx.instances
        if svc is not None and ctx.instance in svc.records:
            rec = svc.records[ctx.instance]
            try:
                devices = svc.expanded(ctx.instance)[1]
            except LXDError:
                devices = {}
            for n, d in devices.items():
                if d.get("type") == "nic" and n != self.name:
                    taken.add(d.get("name") or rec.config.get(f"volatile.{n}.name", ""))
        name = next_eth_name(taken)
        await self.set_volatile(ctx, {"name": name})
        return name

    def pure_name(self, ctx: DeviceContext) -> str:
        return self.config.get("name") or self.volatile(ctx, "name") or "eth0"

    # -- lifecycle ------------------------------------------------------------------------------
    def run_config(self, ctx: DeviceContext) -> RunConfig:
        if self.kind is None:
            return RunConfig()
        return self.kind.run_config(self, ctx, ctx.prepared.get(self.name))

    async def _resolve(self, ctx: DeviceContext) -> None:
        """A nic on a managed network takes its type from the network's."""
        if self.config.get("network") and not self.config.get("nictype"):
            from lxd_daemon.devices.nic.bridged import get_network

            net = get_network(ctx, self.config["network"])
            self.nictype = NETWORK_KINDS.get(net.type, "bridged")
            self.kind = KINDS[self.nictype]

    async def start(self, ctx: DeviceContext) -> RunConfig:
        if self.kind is None:
            return RunConfig()
        ctx.prepared.pop(self.name, None)
        await self._resolve(ctx)
        return await self.kind.start(self, ctx)

    async def stop(self, ctx: DeviceContext) -> RunConfig:
        if self.kind is None:
            return RunConfig()
        try:
            await self._resolve(ctx)
        except LXDError:  # the network went: take back what a bridged nic would have
            pass
        return await self.kind.stop(self, ctx)

    # -- a change to a running nic -----------------------------------------------------------
    LIVE_KEYS = ("limits.ingress", "limits.egress", "limits.max", "limits.priority", "security.mac_filtering",
                 "security.ipv4_filtering", "security.ipv6_filtering")

    def updates_live(self, old: dict[str, str]) -> bool:
        """Whether a change from config `old` applies to the running nic as it is (its limits and
        filters on the host end) rather than by unplugging and plugging it again."""
        if self.nictype not in ("bridged", "p2p", "routed") or old.get("nictype", "") != self.config.get("nictype", ""):
            return False
        keys = set(old) | set(self.config)
        return all(old.get(k, "") == self.config.get(k, "") for k in keys if k not in self.LIVE_KEYS)

    async def update_live(self, old: dict[str, str], ctx: DeviceContext) -> None:
        """Apply this config's limits and filters to the running nic (its host end)."""
        from lxd_daemon.devices.nic import veth

        host_name = self.volatile(ctx, "host_name")
        if not host_name:
            return
        ingress, egress = veth.limits_of(self.config)
        await veth.host(veth.netlink().set_limits, host_name, ingress=ingress, egress=egress)
        if veth.filtering(self.config):
            bridge = self.config.get("parent", "")
            network = None
            if self.config.get("network"):
                from lxd_daemon.devices.nic.bridged import get_network

                network = get_network(ctx, self.config["network"])
                bridge = veth.networks(ctx).nic_parent(network)
            await veth.apply_filter(self, ctx, host_name, await self.hwaddr(ctx), bridge, network)
        elif veth.filtering(old):
            await veth.drop_filter(self, ctx)

    async def adopt(self, ctx: DeviceContext) -> None:
        """The daemon restarted while the container runs: the interfaces are the container's and
        stay as they are; the host end's limits and filters are asserted again (what a host
        change lost meanwhile comes back)."""
        if self.kind is None:
            return
        from lxd_daemon.devices.nic import veth

        await self._resolve(ctx)
        if self.nictype in ("bridged", "p2p", "routed") and (
                veth.filtering(self.config) or any(v is not None for v in veth.limits_of(self.config))):
            await self.update_live(self.config, ctx)

    async def remove(self, ctx: DeviceContext) -> None:
        if self.kind is not None and hasattr(self.kind, "remove"):  # only the veth-based types keep host state
            await self.kind.remove(self, ctx)


async def check_nics(services, devices: dict[str, dict], *, instance: str,
                     expanded: dict[str, dict] | None = None) -> None:
    """When nics are added or changed (instance create/update of the instance with key
    `instance`; networks are those its project sees): a `network` exists, and a
    static address lies in its subnet and isn't another nic's on it; no two nics of the
    instance (`expanded`) have the same interface name. BadRequest naming the device otherwise."""
    from pathlib import Path

    from lxd_daemon.devices.nic.bridged import check_static, get_network
    from lxd_daemon.instances.idmap import IdmapSet

    seen: dict[str, str] = {}
    # the devices already there first: the error names the one being added or changed
    for dname, dev in sorted((expanded or {}).items(), key=lambda it: (it[0] in devices, it[0])):
        if dev.get("type") == "nic" and dev.get("name"):
            if dev["name"] in seen:
                raise BadRequest(f"Invalid device {dname!r}: interface name {dev['name']!r} is already used by "
                                 f"device {seen[dev['name']]!r}")
            seen[dev["name"]] = dname
    todo = {n: d for n, d in devices.items() if d.get("type") == "nic" and d.get("network")}
    if not todo:
        return
    ctx = DeviceContext(instance=instance, idmap=IdmapSet(()), privileged=False, devices_dir=Path("/"),
                        instances=services.instances)
    for dname, dev in sorted(todo.items()):
        try:
            net = get_network(ctx, dev["network"])
        except LXDError as e:
            raise BadRequest(f"Invalid device {dname!r}: network {dev['network']!r}: {e.message}") from None
        nic = Nic(dname, dev)
        if NETWORK_KINDS.get(net.type, "bridged") == "bridged":
            check_static(nic, ctx, net)
        elif dev.get("ipv4.address") or dev.get("ipv6.address"):
            raise BadRequest(f"Invalid device {dname!r}: static addresses need a bridge network "
                             f"({dev['network']!r} is a {net.type} network)")


async def forget_hosts(services, instance: str, devices: dict[str, dict]) -> None:
    """The DHCP host entries of the nics on managed networks of the instance that had key
    `instance` go (it was renamed: its next start makes them under the new name)."""
    from lxd_daemon.projects.naming import split

    project, name = split(instance)
    svc = services.networks
    if svc is None:
        return
    for dname, dev in devices.items():
        if dev.get("type") != "nic" or not dev.get("network"):
            continue
        try:
            await svc.nic_detach(dev["network"], f"{project}_{name}.{dname}", project=project)
        except LXDError:
            continue
