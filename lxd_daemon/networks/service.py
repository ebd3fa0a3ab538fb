"""The network service: managed networks (bridge, macvlan, physical; records in the database, a
driver each) and the host's other interfaces, listed read-only as LXD's unmanaged networks.

Nic and proxy devices use the device-facing part (`get`, `nic_parent`, `mtu`, `subnet`,
`nic_attach`, `nic_detach`, `firewall`). Host reads and changes block: they run in threads.
Instances and profiles whose `nic` devices name a network (`network=` or `parent=`) are listed
in its `used_by`, as LXD does; a network in use can be neither renamed nor deleted.

Projects: every method takes the caller's project. A project without `features.networks` sees
and uses default's networks (and the host's interfaces); one with it would hold its own, but
LXD only allows OVN networks there, which this server doesn't have, so creating one is refused.
A restricted project sees only the networks `restricted.networks.access` allows (LXD's 404).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

from sqlalchemy import text

from lxd_daemon import names
from lxd_daemon.errors import BadRequest, Conflict, Forbidden, LXDError, NotFound, NotImplementedYet
from lxd_daemon.networks import host, subnets
from lxd_daemon.networks.drivers import DRIVERS, DriverContext, InvalidConfig, NetworkDriver
from lxd_daemon.projects import policy as project_policy
from lxd_daemon.projects.naming import DEFAULT, query
from lxd_daemon.util.revert import Revert

log = logging.getLogger("lxd.networks")

NOT_FOUND = "Network not found"
RETRY_INTERVAL = 60  # seconds between attempts to start networks that failed to


@dataclass
class Network:
    id: int
    name: str
    type: str
    description: str
    config: dict[str, str]
    driver: NetworkDriver = field(repr=False)
    project: str = "default"
    status: str = "Created"
    # Why the network could not be brought up at the last start (None: it is up).
    error: str | None = None


def _key(name: str, project: str) -> tuple[str, str]:
    return (project, name)


@dataclass
class NicUse:
    """A nic of an instance or profile: what `used_by` and the leases are made of."""
    kind: str  # "instances" or "profiles"
    name: str  # the API name
    url: str  # with ?project=
    project: str  # the networks project its `network=` names a network of
    nics: dict[str, dict]  # device name -> config
    config: dict  # the instance's expanded config ({} for a profile)


class NetworkService:
    def __init__(self, services):
        self.services = services
        self.db = services.db
        self.networks: dict[tuple[str, str], Network] = {}
        self.lock = asyncio.Lock()
        self.firewall = None  # networks.firewall.Firewall, when nftables is usable
        self.firewall_error = ""
        self._retry_task: asyncio.Task | None = None
        self.ctx = DriverContext(lxd_dir=services.lxd_dir, seed=getattr(services.server, "fingerprint", ""),
                                 host_prefixes=self._host_prefixes)

    # -- start-up and exit -----------------------------------------------------------------------

    def _make_firewall(self) -> None:
        try:
            from lxd_daemon.networks.firewall import Firewall
        except ImportError as e:  # Part A not there (or Debian's nftables module missing)
            self.firewall_error = str(e)
            return
        fw = Firewall(table="lxd")
        ok, why = fw.available()
        if ok:
            self.firewall = fw
        else:
            self.firewall_error = why
        self.ctx.firewall = self.firewall

    async def load(self) -> None:
        """Read the records (no host work)."""
        def q(session):
            return session.execute(text("SELECT id, project, name, type, description, config, status "
                                        "FROM networks ORDER BY id")).all()

        await asyncio.to_thread(self._make_firewall)
        for r in await self.db.run(q):
            config = json.loads(r.config)
            cls = DRIVERS.get(r.type)
            if cls is None:
                log.error("network of an unknown type", extra={"network": r.name, "type": r.type})
                continue
            drv = cls(r.name, config, self.ctx, id=r.id, project=r.project)
            self.networks[_key(r.name, r.project)] = Network(r.id, r.name, r.type, r.description, config, drv,
                                                             r.project, r.status)

    async def start_all(self) -> None:
        """Bring every managed network up (idempotent: what runs already is adopted as it is).
        Networks with a parent come after the others; one that fails is logged and left down.
        Then what networks deleted while the daemon was down left behind goes (their nftables
        chains, dnsmasq and state directory)."""
        await self._sweep()
        await self._start(sorted(self.networks.values(), key=lambda n: (bool(n.config.get("parent")), n.id)))
        if any(n.error for n in self.networks.values()):
            self._retry_task = asyncio.get_running_loop().create_task(self._retry())

    async def _start(self, nets: list[Network]) -> None:
        for n in nets:
            try:
                await n.driver.start()
                n.error = None
                log.info("network started", extra={"network": n.name})
            except Exception as e:
                n.error = getattr(e, "message", None) or str(e)
                log.error("failed starting network", extra={"network": n.name, "err": n.error})

    async def _retry(self) -> None:
        """As LXD: networks that could not start (a parent interface not there yet) are tried
        again every minute until they are up."""
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            async with self.lock:
                failed = [n for n in self.networks.values() if n.error]
                if not failed:
                    return
                await self._start(failed)

    async def _sweep(self) -> None:
        from lxd_daemon.networks import dnsmasq

        known = {n.name for n in self.networks.values()}

        def sweep() -> None:
            if self.firewall is not None:
                for name in self.firewall.keys().get("network", set()) - known:
                    self.firewall.network_drop(name)
            root = self.ctx.networks_dir
            for entry in sorted(os.listdir(root)) if root.is_dir() else []:
                if entry not in known and (root / entry).is_dir():
                    dnsmasq.stop_stale(root / entry)
                    shutil.rmtree(root / entry, ignore_errors=True)
                    log.info("removed what a deleted network left", extra={"network": entry})

        try:
            await asyncio.to_thread(sweep)
        except Exception:
            log.exception("sweeping deleted networks failed")

    async def close(self) -> None:
        """Daemon exit: bridges, nftables rules and dnsmasq stay (containers keep networking)."""
        if self._retry_task is not None:
            self._retry_task.cancel()
        for n in list(self.networks.values()):
            try:
                await n.driver.close()
            except Exception:
                log.exception("closing network failed", extra={"network": n.name})

    # -- the interface of nic and proxy devices ------------------------------------------------

    def effective(self, project: str) -> str:
        """The project whose networks `project` uses (404 "Project not found" for no project)."""
        projects = self.services.projects
        return projects.effective(project, "networks") if projects is not None else DEFAULT

    def _config(self, project: str) -> dict[str, str]:
        projects = self.services.projects
        return projects.config(project) if projects is not None else {}

    def _allowed(self, project: str, name: str, managed: bool) -> bool:
        """restricted.networks.access (and restricted.devices.nic) of the caller's project."""
        return project_policy.network_allowed(self._config(project), name, managed)

    def _check_writable(self, project: str) -> None:
        """A restricted project may use default's networks but not change them (their config
        reaches the host: addresses, NAT, raw.dnsmasq), as a project that holds its own could."""
        eff = self.effective(project)
        if eff != project and project_policy.is_true(self._config(project).get("restricted")):
            raise Forbidden(f"Project {project!r} is restricted: it can't change the networks of project {eff!r}")

    def get(self, name: str, project: str) -> Network:
        """The managed network `name` that an object of `project` (the caller's) uses: the one of
        `effective(project)`. NotFound when there is none."""
        n = self.networks.get(_key(name, self.effective(project)))
        if n is None:
            raise NotFound(NOT_FOUND)
        return n

    def url(self, name: str, project: str) -> str:
        """The API URL of the network `name` as `project` sees it."""
        return f"/1.0/networks/{name}{query(self.effective(project))}"

    def _net(self, network: Network | str, project: str | None) -> Network:
        if isinstance(network, Network):
            return network
        if project is None:
            raise TypeError("a network given by name needs the caller's project")
        return self.get(network, project)

    def nic_parent(self, network: Network | str, project: str | None = None) -> str:
        return self._net(network, project).driver.nic_parent()

    def mtu(self, network: Network | str, project: str | None = None) -> int | None:
        return self._net(network, project).driver.mtu()

    def subnet(self, network: Network | str, family: int, project: str | None = None):
        return self._net(network, project).driver.subnet(family)

    async def nic_attach(self, network: Network | str, key: str, *, hwaddr: str, hostname: str,
                         ipv4: str | None = None, ipv6: str | None = None, project: str | None = None) -> None:
        await self._net(network, project).driver.nic_attach(key, hwaddr=hwaddr, hostname=hostname, ipv4=ipv4,
                                                            ipv6=ipv6)

    async def nic_detach(self, network: Network | str, key: str, project: str | None = None) -> None:
        await self._net(network, project).driver.nic_detach(key)

    # -- reads -----------------------------------------------------------------------------------

    def managed_names(self, project: str) -> list[str]:
        """The project's own managed networks (none for a project using default's)."""
        return [n.name for n in sorted(self.networks.values(), key=lambda n: n.name) if n.project == project]

    async def names(self, project: str) -> list[str]:
        """Managed networks first, then the host's other interfaces (as LXD lists them): those
        the caller's `project` sees."""
        eff = self.effective(project)
        out = [n for n in self.managed_names(eff) if self._allowed(project, n, True)]
        if eff == DEFAULT:
            out += [n for n in await asyncio.to_thread(host.interface_names)
                    if n not in out and self._allowed(project, n, False)]
        return out

    def _nics(self) -> list[NicUse]:
        """The nics of every profile and instance, of every project."""
        out = []
        profiles = self.services.profiles
        for pproject, by_name in sorted((profiles.by_project if profiles else {}).items()):
            try:
                eff = self.effective(pproject)
            except LXDError:  # (a project going away)
                continue
            for _, p in sorted(by_name.items()):
                out.append(NicUse("profiles", p.name, p.url, eff,
                                  {k: d for k, d in p.devices.items() if d.get("type") == "nic"}, {}))
        instances = self.services.instances
        recs = sorted(instances.records.values(), key=lambda r: (r.project, r.name)) if instances else ()
        for rec in recs:
            try:
                config, devices = instances.expanded(rec.key)
                eff = self.effective(rec.project)
            except LXDError:
                continue
            out.append(NicUse("instances", rec.name, instances.url(rec.key), eff,
                              {k: d for k, d in devices.items() if d.get("type") == "nic"}, config))
        return out

    def _uses(self, u: NicUse, d: dict, name: str, project: str | None) -> bool:
        """Whether nic `d` of `u` uses the managed network `name` of `project` (or, project None,
        the host interface `name`)."""
        if project is None:
            return not d.get("network") and d.get("parent") == name
        if d.get("network"):
            return d["network"] == name and u.project == project
        n = self.networks.get(_key(name, project))
        return d.get("parent") == name and n is not None and n.type == "bridge"

    def used_by(self, name: str, project: str | None) -> list[str]:
        """The instances and profiles (of every project) whose nics use the managed network `name`
        of `project` (stored there), or with project None the host interface `name`."""
        return [u.url for u in self._nics() if any(self._uses(u, d, name, project) for d in u.nics.values())]

    def _render_managed(self, n: Network) -> dict:
        return {"config": dict(n.config), "description": n.description, "name": n.name, "type": n.type,
                "used_by": self.used_by(n.name, n.project), "managed": True,
                # LXD's local status: "Unavailable" while the network failed to start.
                "status": "Unavailable" if n.error else n.status,
                "locations": ["none"]}

    async def render(self, name: str, project: str) -> dict:
        """api.Network (404 when neither a managed network nor a host interface has the name, or
        when the caller's project may not see it)."""
        eff = self.effective(project)
        n = self.networks.get(_key(name, eff))
        if n is not None:
            if not self._allowed(project, name, True):
                raise NotFound(NOT_FOUND)
            return self._render_managed(n)
        if eff != DEFAULT or name.startswith("veth") or not self._allowed(project, name, False) or \
                not await asyncio.to_thread(host.exists, name):
            raise NotFound(NOT_FOUND)
        kind = await asyncio.to_thread(host.kind, name)
        return {"config": {}, "description": "", "name": name, "type": kind,
                "used_by": [] if kind == "loopback" else self.used_by(name, None),
                "managed": False, "status": "", "locations": None}

    async def render_all(self, project: str) -> list[dict]:
        out = []
        for name in await self.names(project):
            try:
                out.append(await self.render(name, project))
            except NotFound:  # went away meanwhile
                continue
        return out

    def _managed(self, name: str, project: str) -> Network:
        """A managed network the caller's `project` sees, for the calls only those take (LXD's
        "Failed loading network")."""
        n = self.networks.get(_key(name, self.effective(project)))
        if n is None:
            raise NotFound(f"Failed loading network: {NOT_FOUND}")
        if not self._allowed(project, name, True):
            raise NotFound(NOT_FOUND)
        return n

    async def state(self, name: str, project: str) -> dict:
        eff = self.effective(project)
        n = self.networks.get(_key(name, eff))
        if n is not None:
            if not self._allowed(project, name, True):
                raise NotFound(NOT_FOUND)
            return await n.driver.state()
        if eff != DEFAULT or not self._allowed(project, name, False) or \
                not await asyncio.to_thread(host.exists, name):
            raise NotFound(NOT_FOUND)
        return await asyncio.to_thread(host.state, name)

    async def leases(self, name: str, project: str) -> list[dict]:
        """api.NetworkLease list: the bridge's gateway addresses, the static addresses of nics on
        it, then dnsmasq's leases of those nics not listed already."""
        n = self._managed(name, project)
        if n.type != "bridge":
            raise NotImplementedYet("Not implemented")
        gateway, rest = [], []
        for lease in await n.driver.leases():
            (gateway if lease.get("type") == "gateway" else rest).append(lease)
        static = []
        macs: dict[str, str] = {}  # hwaddr -> instance
        for u in self._nics():
            if u.kind != "instances":
                continue
            iname, config = u.name, u.config
            for dev, d in u.nics.items():
                if not self._uses(u, d, name, n.project):
                    continue
                hwaddr = (d.get("hwaddr") or config.get(f"volatile.{dev}.hwaddr", "")).lower()
                if hwaddr:
                    macs[hwaddr] = iname
                for fam in ("ipv4", "ipv6"):
                    if d.get(f"{fam}.address"):
                        static.append({"hostname": iname, "hwaddr": hwaddr, "address": d[f"{fam}.address"],
                                       "type": "static", "location": "none"})
                v6 = n.driver.subnet(6)
                if v6 is not None and hwaddr and n.config.get("ipv6.dhcp.stateful", "").lower() not in (
                        "true", "1", "yes", "on"):
                    slaac = _eui64(v6.network, hwaddr)
                    if slaac:
                        static.append({"hostname": iname, "hwaddr": hwaddr, "address": slaac,
                                       "type": "dynamic", "location": "none"})
        out = gateway + static
        seen = {(x["hwaddr"], x["address"]) for x in out}
        for lease in rest:
            hostname = lease.get("hostname", "")
            if hostname in ("", "*"):  # the client sent none: the instance that owns the address
                hostname = macs.get((lease.get("hwaddr") or "").lower(), "")
            item = {"hostname": hostname, "hwaddr": lease.get("hwaddr", ""),
                    "address": lease.get("address", ""), "type": lease.get("type", "dynamic"),
                    "location": lease.get("location") or "none"}
            if lease.get("project"):
                item["project"] = lease["project"]
            if (item["hwaddr"], item["address"]) in seen:
                continue
            seen.add((item["hwaddr"], item["address"]))
            out.append(item)
        return out

    # -- checks ----------------------------------------------------------------------------------

    def _host_prefixes(self) -> list:
        """Prefixes on the host (routes and addresses), read through netlink: no probing."""
        from lxd_daemon.networks import netlink

        return subnets.host_prefixes(netlink.routes(), netlink.addresses())

    async def _check_overlaps(self, drv: NetworkDriver, config_owner: Network | None) -> None:
        """A bridge's subnets overlap neither another managed network's nor a prefix the host
        uses elsewhere (its own current subnets left out)."""
        own = config_owner.driver.subnets_used() if config_owner is not None else []
        host_used = _without(await asyncio.to_thread(self._host_prefixes), own)
        for family in (4, 6):
            iface = drv.subnet(family)
            if iface is None:
                continue
            net = iface.network
            for other in self.networks.values():
                if other is config_owner:
                    continue
                hit = subnets.overlapping(net, other.driver.subnets_used())
                if hit is not None:
                    raise BadRequest(f"IPv{family} subnet {net} overlaps with the subnet {hit} of network "
                                     f"{other.name!r}")
            hit = subnets.overlapping(net, host_used)
            if hit is not None:
                raise BadRequest(f"IPv{family} subnet {net} overlaps with {hit}, which is in use on the host")

    def _used_subnets(self, exclude: Network | None = None) -> list:
        own = exclude.driver.subnets_used() if exclude is not None else []
        used = _without(self._host_prefixes(), own)
        for other in self.networks.values():
            if other is not exclude:
                used.extend(other.driver.subnets_used())
        return used

    async def _prepare_config(self, drv: NetworkDriver, config: dict[str, str], owner: Network | None) -> dict:
        """Validate, replace `auto` addresses, check overlaps; returns the config to store."""
        try:
            drv.validate(config)
        except InvalidConfig as e:
            raise BadRequest(str(e)) from None
        if "auto" in (config.get("ipv4.address"), config.get("ipv6.address")):
            used = await asyncio.to_thread(self._used_subnets, owner)
            try:
                config = drv.populate_auto(config, used)
            except ValueError as e:
                raise BadRequest(f"Failed generating auto config: {e}") from None
        drv.config = config
        await self._check_overlaps(drv, owner)
        if drv.type == "physical":
            # A physical interface goes whole to one network (as LXD's checkParentUse).
            parent = config.get("parent")
            if any(o is not owner and o.config.get("parent") == parent for o in self.networks.values()):
                raise BadRequest(f"Parent interface {parent!r} in use by another network")
            if owner is not None and owner.config.get("parent") != parent and \
                    self.used_by(owner.name, owner.project):
                raise BadRequest("Cannot update network parent interface when in use")
        return config

    # -- changes ---------------------------------------------------------------------------------

    async def create(self, name: str, type_: str, description: str, config: dict[str, str],
                     project: str) -> Network:
        """A managed network, made through the caller's `project` (in its effective project)."""
        if not name:
            raise BadRequest("No name provided")
        if not self._allowed(project, name, True):
            raise Forbidden("Network not allowed in project")
        self._check_writable(project)
        caller, project = project, self.effective(project)
        if project != DEFAULT:
            # LXD 5.0.2: a project with features.networks holds OVN networks only (its default
            # type); this server has no OVN.
            if (type_ or "ovn") == "ovn":
                raise BadRequest(f"Networks of type 'ovn' are not available on this server (no OVN), and project "
                                 f"{caller!r} (features.networks=true) can hold OVN networks only")
            raise BadRequest("Network type does not support non-default projects")
        type_ = type_ or "bridge"
        cls = DRIVERS.get(type_)
        if cls is None:
            if type_ in ("sriov", "ovn"):
                raise NotImplementedYet(f"Networks of type {type_!r} are not implemented yet")
            raise BadRequest(f"Unknown network type {type_!r} (supported: {', '.join(sorted(DRIVERS))})")
        try:
            names.network(name)
            cls.validate_name(name)
        except (ValueError, names.InvalidName) as e:
            raise BadRequest(getattr(e, "message", None) or str(e)) from None
        config = {k: v for k, v in config.items() if v != ""}
        async with self.lock:
            if _key(name, project) in self.networks:
                raise BadRequest("The network already exists")
            instances = getattr(self.services, "instances", None)
            if instances is not None:  # the project's limits.networks (checked under the lock)
                project_policy.check_network_count(project, self.services.projects.config(project),
                                                   self.managed_names(project), name)
            drv = cls(name, {}, self.ctx, project=project)
            try:
                await drv.create()
            except InvalidConfig as e:
                raise BadRequest(str(e)) from None
            config = drv.fill_config(config)
            config = await self._prepare_config(drv, config, None)

            def ins(session):
                return session.execute(
                    text("INSERT INTO networks (project, name, type, description, config, status) "
                         "VALUES (:p, :n, :t, :d, :c, 'Created') RETURNING id"),
                    {"p": project, "n": name, "t": type_, "d": description, "c": json.dumps(config)}).scalar_one()

            async with Revert() as revert:
                net_id = await self.db.run(ins)
                revert.add(self._delete_row, net_id)
                drv.id = net_id
                drv.config = config
                revert.add(drv.delete)
                try:
                    await drv.start()
                except InvalidConfig as e:
                    raise BadRequest(str(e)) from None
                n = Network(net_id, name, type_, description, config, drv, project)
                self.networks[_key(name, project)] = n
                revert.success()
            return n

    async def _delete_row(self, net_id: int) -> None:
        await self.db.run(lambda s: s.execute(text("DELETE FROM networks WHERE id=:i"), {"i": net_id}))

    async def _write(self, n: Network, description: str, config: dict[str, str], name: str | None = None) -> None:
        def upd(session):
            session.execute(text("UPDATE networks SET name=:n, description=:d, config=:c WHERE id=:i"),
                            {"n": name or n.name, "d": description, "c": json.dumps(config), "i": n.id})

        await self.db.run(upd)

    async def update(self, name: str, description: str, config: dict[str, str], project: str) -> None:
        n = self._managed(name, project)
        self._check_writable(project)
        config = {k: v for k, v in config.items() if v != ""}
        async with self.lock:
            old_config, old_description = dict(n.config), n.description
            drv = n.driver
            probe = type(drv)(n.name, dict(old_config), self.ctx, id=n.id, project=n.project)
            new_config = await self._prepare_config(probe, config, n)
            if new_config == old_config:
                if description != old_description:
                    await self._write(n, description, old_config)
                    n.description = description
                return
            async with Revert() as revert:
                await self._write(n, description, new_config)
                revert.add(self._write, n, old_description, old_config)
                drv.config = new_config

                async def back() -> None:
                    drv.config = old_config
                    await drv.update(new_config)

                revert.add(back)
                try:
                    await drv.update(old_config)
                except InvalidConfig as e:
                    raise BadRequest(str(e)) from None
                revert.success()
            n.config, n.description = new_config, description
            n.error = None

    async def rename(self, name: str, new_name: str, project: str) -> None:
        n = self._managed(name, project)
        self._check_writable(project)
        project = n.project
        if not new_name:
            raise BadRequest("New network name not provided")
        try:
            names.network(new_name)
            type(n.driver).validate_name(new_name)
        except (ValueError, names.InvalidName) as e:
            raise BadRequest(getattr(e, "message", None) or str(e)) from None
        async with self.lock:
            if self.used_by(name, project):
                raise BadRequest("Network is currently in use")
            if _key(new_name, project) in self.networks:
                raise Conflict(f"Network {new_name!r} already exists")
            try:
                await n.driver.rename(new_name)
            except InvalidConfig as e:
                raise BadRequest(str(e)) from None
            try:
                await self._write(n, n.description, n.config, new_name)
            except Exception:
                await n.driver.rename(name)
                raise
            del self.networks[_key(name, project)]
            n.name = new_name
            self.networks[_key(new_name, project)] = n

    async def delete(self, name: str, project: str) -> None:
        n = self._managed(name, project)
        self._check_writable(project)
        project = n.project
        async with self.lock:
            if self.used_by(name, project):
                raise BadRequest("The network is currently in use")
            await n.driver.delete()
            await self._delete_row(n.id)
            del self.networks[_key(name, project)]


def _without(prefixes: list, own: list) -> list:
    """Host prefixes other than those inside the network's own subnets (its address, its subnet
    route, its broadcast and local routes)."""
    return [p for p in prefixes if subnets.overlapping(p, own) is None]


def _eui64(subnet, hwaddr: str) -> str | None:
    """The SLAAC address a nic with `hwaddr` takes in a /64 (EUI-64)."""
    try:
        b = bytes(int(x, 16) for x in hwaddr.split(":"))
    except ValueError:
        return None
    if len(b) != 6 or subnet.prefixlen != 64:
        return None
    iid = bytes([b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return str(ipaddress.IPv6Address(int(subnet.network_address) | int.from_bytes(iid, "big")))
