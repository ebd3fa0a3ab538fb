"""The daemon's nftables rules, through libnftables (Debian's `nftables` module).

Everything lives in two tables of the daemon's own, `inet <table>` (networks and proxy DNAT) and
`bridge <table>` (nic filtering); nothing outside them is read or changed, and a table goes
away with the last object that has chains in it. Each object (a
network, a nic, a proxy device) owns base chains named `<kind>.<role>.<key>`; applying an object
deletes its old chains and adds the new ones in one libnftables transaction, so a failure leaves
the previous rules in place. Keys are encoded into the chain-name alphabet (see `_enc`).

All methods block (libnftables is synchronous): async callers use asyncio.to_thread. Sysctls
(ip_forward, IPv6 forwarding) are the caller's business (netlink.set_sysctl).
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
from dataclasses import dataclass

from lxd_daemon.errors import LXDError

KINDS = {"network": "net", "nic": "nic", "proxy": "proxy"}
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class FirewallError(LXDError):
    status = 500


@dataclass
class FamilyRules:
    subnet: str  # CIDR
    nat: bool
    nat_address: str = ""
    nat_order: str = "before"  # before | after: our NAT runs before or after other tables' NAT
    firewall: bool = True  # accept DHCP/DNS/ICMP from the bridge into the host, forward to/from it
    routing: bool = True  # forward the subnet's traffic (False: drop what the bridge would route)


def _enc(key: str) -> str:
    """A key in the nft identifier alphabet: characters other than letters, digits, `_ . -`
    become `/xx` (hex), so the chain name decodes back to the key."""
    return "".join(c if c in _SAFE else "".join(f"/{b:02x}" for b in c.encode()) for c in key)


def _dec(name: str) -> str:
    out = bytearray()
    i = 0
    while i < len(name):
        if name[i] == "/" and i + 3 <= len(name):
            out.append(int(name[i + 1:i + 3], 16))
            i += 3
        else:
            out += name[i].encode()
            i += 1
    return out.decode(errors="replace")


def _q(s: str) -> str:
    """A quoted nft string (interface names)."""
    if '"' in s or "\\" in s or "\n" in s:
        raise FirewallError(f"Bad interface name {s!r}")
    return f'"{s}"'


def _net(cidr: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise FirewallError(f"Bad subnet {cidr!r}") from None
    if net.version != version:
        raise FirewallError(f"Subnet {cidr!r} is not IPv{version}")
    return net


def _addr(a: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(str(a).strip("[]"))
    except ValueError:
        raise FirewallError(f"Bad {what} address {a!r}") from None


def _set(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


class Firewall:
    def __init__(self, table: str = "lxd"):
        if not table or not all(c in _SAFE for c in table) or not table[0].isalpha():
            raise FirewallError(f"Bad nftables table name {table!r}")
        self.table = table
        self._lock = threading.Lock()

    # --- libnftables -------------------------------------------------------------------

    def _nft(self, cmd: str, *, json_out: bool = False) -> tuple[int, str, str]:
        import nftables

        nft = nftables.Nftables()
        nft.set_json_output(json_out)
        return nft.cmd(cmd)

    def _run(self, cmd: str, what: str) -> None:
        rc, _, err = self._nft(cmd)
        if rc != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.startswith("Error:")]
            cause = lines[0].removeprefix("Error: ") if lines else err.strip()
            raise FirewallError(f"Failed to {what}: {cause}")

    def _chains(self, family: str) -> list[str]:
        rc, out, _ = self._nft(f"list table {family} {self.table}", json_out=True)
        if rc != 0 or not out:
            return []
        return [x["chain"]["name"] for x in json.loads(out).get("nftables", []) if "chain" in x]

    def available(self) -> tuple[bool, str]:
        try:
            import nftables  # noqa: F401
        except ImportError as e:
            return False, f"the nftables Python module is missing ({e})"
        try:
            rc, _, err = self._nft("list tables")
        except Exception as e:  # libnftables missing or broken
            return False, f"libnftables failed: {e}"
        if rc != 0:
            return False, f"nftables failed: {err.strip()}"
        return True, "nftables"

    def _replace(self, family: str, kind: str, key: str, chains: dict[str, tuple[str, list[str]]],
                 what: str) -> None:
        """In one transaction: drop the object's chains in `family`, add `chains` (role ->
        (base chain spec, rules))."""
        prefix = KINDS[kind]
        ekey = _enc(key)
        with self._lock:
            existing = self._chains(family)
            if not existing and not chains:
                return
            lines = [f"add table {family} {self.table}"]
            others = 0
            for name in existing:
                parts = name.split(".", 2)
                if len(parts) == 3 and parts[0] == prefix and parts[2] == ekey:
                    lines += [f"flush chain {family} {self.table} {name}",
                              f"delete chain {family} {self.table} {name}"]
                else:
                    others += 1
            for role, (spec, rules) in chains.items():
                name = f"{prefix}.{role}.{ekey}"
                lines.append(f"add chain {family} {self.table} {name} {{ {spec}; policy accept; }}")
                lines += [f"add rule {family} {self.table} {name} {r}" for r in rules]
            if not chains and not others:  # the last object gone: so is the table
                lines.append(f"delete table {family} {self.table}")
            self._run("\n".join(lines) + "\n", what)

    def _drop(self, family: str, kind: str, key: str, what: str) -> None:
        self._replace(family, kind, key, {}, what)

    # --- networks ------------------------------------------------------------------------

    def network_apply(self, net: str, *, bridge: str, v4: FamilyRules | None, v6: FamilyRules | None) -> None:
        """The rules of a managed bridge: NAT (masquerade, or SNAT to nat_address) of its
        subnets' traffic leaving by another interface, and (firewall) acceptance of DHCP, DNS and
        ICMP from the bridge and of forwarding to and from it; routing=False drops forwarding."""
        br = _q(bridge)
        chains: dict[str, tuple[str, list[str]]] = {}
        nat: dict[str, list[str]] = {"before": [], "after": []}
        fwd: list[str] = []
        inp: list[str] = []
        out: list[str] = []
        for version, rules in ((4, v4), (6, v6)):
            if rules is None:
                continue
            fam = "ip" if version == 4 else "ip6"
            subnet = _net(rules.subnet, version)
            if rules.nat:
                if rules.nat_order not in nat:
                    raise FirewallError(f"Bad NAT order {rules.nat_order!r}")
                target = "masquerade"
                if rules.nat_address:
                    a = _addr(rules.nat_address, "NAT")
                    if a.version != version:
                        raise FirewallError(f"NAT address {rules.nat_address!r} is not IPv{version}")
                    target = f"snat {fam} to {a}"
                nat[rules.nat_order].append(
                    f"{fam} saddr {subnet} {fam} daddr != {subnet} oifname != {br} {target}")
            if not rules.routing:
                fwd += [f"iifname {br} meta nfproto {'ipv4' if version == 4 else 'ipv6'} drop",
                        f"oifname {br} meta nfproto {'ipv4' if version == 4 else 'ipv6'} drop"]
            elif rules.firewall:
                fwd += [f"iifname {br} {fam} saddr {subnet} accept", f"oifname {br} {fam} daddr {subnet} accept"]
            if rules.firewall:
                if version == 4:
                    inp += [f"iifname {br} udp dport {{ 53, 67 }} accept", f"iifname {br} tcp dport 53 accept",
                            f"iifname {br} icmp type {{ 3, 11, 12 }} accept"]
                    out += [f"oifname {br} udp sport {{ 53, 67 }} accept", f"oifname {br} tcp sport 53 accept",
                            f"oifname {br} icmp type {{ 3, 11, 12 }} accept"]
                else:
                    inp += [f"iifname {br} udp dport {{ 53, 547 }} accept", f"iifname {br} tcp dport 53 accept",
                            f"iifname {br} icmpv6 type {{ 1, 2, 3, 4, 133, 135, 136, 143 }} accept"]
                    out += [f"oifname {br} udp sport {{ 53, 547 }} accept", f"oifname {br} tcp sport 53 accept",
                            f"oifname {br} icmpv6 type {{ 1, 2, 3, 4, 128, 134, 135, 136, 143 }} accept"]
        if nat["before"]:
            chains["pstrt"] = ("type nat hook postrouting priority 99", nat["before"])
        if nat["after"]:
            chains["pstrta"] = ("type nat hook postrouting priority 101", nat["after"])
        if fwd:
            chains["fwd"] = ("type filter hook forward priority 0", fwd)
        if inp:
            chains["in"] = ("type filter hook input priority 0", inp)
        if out:
            chains["out"] = ("type filter hook output priority 0", out)
        self._replace("inet", "network", net, chains, f"apply the firewall rules of network {net!r}")

    def network_drop(self, net: str) -> None:
        self._drop("inet", "network", net, f"remove the firewall rules of network {net!r}")

    # --- nic filtering -------------------------------------------------------------------

    def nic_filter_apply(self, key: str, *, bridge: str, host_ifname: str, hwaddr: str, mac: bool,
                         ipv4: list[str] | None, ipv6: list[str] | None) -> None:
        """Drop frames entering the bridge from `host_ifname` unless their source MAC is `hwaddr`
        (mac) and their source IPv4/IPv6 is one of `ipv4`/`ipv6` (None: that family unfiltered;
        []: none allowed). DHCP discovery (0.0.0.0), ARP probes, IPv6 link-local, DAD and NDP
        stay allowed; ARP and neighbour advertisements may only claim the allowed addresses."""
        dev = _q(host_ifname)
        _q(bridge)
        rules: list[str] = []
        if mac:
            hw = hwaddr.lower()
            if not _MAC.match(hw):
                raise FirewallError(f"Bad MAC address {hwaddr!r}")
            rules += [f"iifname {dev} ether saddr != {hw} drop",
                      f"iifname {dev} ether type arp arp saddr ether != {hw} drop"]
        if ipv4 is not None:
            addrs = [str(_addr(a, "IPv4")) for a in ipv4]
            if any(":" in a for a in addrs):
                raise FirewallError("IPv6 address given as an allowed IPv4 address")
            rules += [f"iifname {dev} ether type arp arp saddr ip 0.0.0.0 accept",
                      f"iifname {dev} ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp dport 67 accept"]
            if addrs:
                rules += [f"iifname {dev} ether type arp arp saddr ip != {_set(addrs)} drop",
                          f"iifname {dev} ether type ip ip saddr != {_set(addrs)} drop"]
            else:
                rules += [f"iifname {dev} ether type arp drop", f"iifname {dev} ether type ip drop"]
        if ipv6 is not None:
            addrs = [str(_addr(a, "IPv6")) for a in ipv6]
            if any(":" not in a for a in addrs):
                raise FirewallError("IPv4 address given as an allowed IPv6 address")
            # neighbour advertisements only for its own addresses (or link-local ones)
            targets = [f"0x{int(ipaddress.IPv6Address(a)):032x}" for a in addrs]
            na = f"iifname {dev} icmpv6 type nd-neighbor-advert @th,64,16 != 0xfe80"
            rules.append(f"{na} @th,64,128 != {_set(targets)} drop" if targets else f"{na} drop")
            rules += [f"iifname {dev} ip6 saddr fe80::/10 accept",
                      f"iifname {dev} ip6 saddr :: icmpv6 type {{ nd-neighbor-solicit, mld2-listener-report }} accept"]
            if addrs:
                rules.append(f"iifname {dev} ether type ip6 ip6 saddr != {_set(addrs)} drop")
            else:
                rules.append(f"iifname {dev} ether type ip6 drop")
        if ipv4 is not None or ipv6 is not None:
            rules.append(f"iifname {dev} ether type {{ 8021q, 8021ad }} drop")  # no tagged bypass
        chains = {"flt": ("type filter hook prerouting priority 0", rules)} if rules else {}
        self._replace("bridge", "nic", key, chains, f"apply the filtering rules of nic {key!r}")

    def nic_filter_drop(self, key: str) -> None:
        self._drop("bridge", "nic", key, f"remove the filtering rules of nic {key!r}")

    # --- proxy DNAT ----------------------------------------------------------------------

    def proxy_dnat_apply(self, key: str, *, family: str, proto: str, listen_addr: str, listen_ports: list[int],
                         connect_addr: str, connect_port: int | list[int]) -> None:
        """Forward `listen_addr:listen_ports` to `connect_addr:connect_port` by DNAT, for traffic
        arriving (prerouting) and from the host itself (output); a wildcard listen address means
        every local address. `connect_port` may be a list as long as `listen_ports`: then each
        listen port goes to the connect port at the same position. The container's connections
        to its own published port are masqueraded (that also needs hairpin mode on its bridge
        port: netlink.set_bridge_port)."""
        if family not in ("ipv4", "ipv6") or proto not in ("tcp", "udp"):
            raise FirewallError(f"Bad proxy NAT family/protocol {family!r}/{proto!r}")
        version = 4 if family == "ipv4" else 6
        fam = "ip" if version == 4 else "ip6"
        la = _addr(listen_addr, "listen")
        ca = _addr(connect_addr, "connect")
        if la.version != version or ca.version != version:
            raise FirewallError(f"Proxy NAT addresses {listen_addr!r} and {connect_addr!r} must both be {family}")
        try:
            ports = [int(p) for p in listen_ports]
            targets = [int(p) for p in connect_port] if isinstance(connect_port, (list, tuple)) \
                else [int(connect_port)]
        except (TypeError, ValueError):
            raise FirewallError("Bad proxy NAT ports") from None
        if len(targets) == 1:
            targets = targets * len(ports)
        if not ports or len(targets) != len(ports) or any(not 0 < p < 65536 for p in ports + targets):
            raise FirewallError("Bad proxy NAT ports: one connect port, or as many as listen ports")
        dst = "fib daddr type local" if la.is_unspecified else f"{fam} daddr {la}"
        by_target: dict[int, list[int]] = {}
        for lp, cp in zip(ports, targets, strict=True):
            by_target.setdefault(cp, []).append(lp)
        dnat, masq = [], []
        for cp, lps in by_target.items():
            to = f"{ca}:{cp}" if version == 4 else f"[{ca}]:{cp}"
            dnat.append(f"meta nfproto {family} {dst} {proto} dport {_set([str(p) for p in sorted(set(lps))])} "
                        f"dnat {fam} to {to}")
            masq.append(f"{fam} saddr {ca} {fam} daddr {ca} {proto} dport {cp} masquerade")
        chains = {
            "prert": ("type nat hook prerouting priority -100", dnat),
            "out": ("type nat hook output priority -100", dnat),
            "pstrt": ("type nat hook postrouting priority 100", masq),
        }
        self._replace("inet", "proxy", key, chains, f"apply the NAT rules of proxy {key!r}")

    def proxy_dnat_drop(self, key: str) -> None:
        self._drop("inet", "proxy", key, f"remove the NAT rules of proxy {key!r}")

    # --- the whole -----------------------------------------------------------------------

    def drop_all(self) -> None:
        """Delete the daemon's tables."""
        with self._lock:
            for family in ("inet", "bridge"):
                rc, _, _ = self._nft(f"list table {family} {self.table}")
                if rc == 0:
                    self._run(f"delete table {family} {self.table}\n", f"delete table {family} {self.table}")

    def keys(self) -> dict[str, set[str]]:
        """The objects that have rules now, per kind (for reconciliation after a restart)."""
        out: dict[str, set[str]] = {k: set() for k in KINDS}
        back = {v: k for k, v in KINDS.items()}
        for family in ("inet", "bridge"):
            for name in self._chains(family):
                parts = name.split(".", 2)
                if len(parts) == 3 and parts[0] in back:
                    out[back[parts[0]]].add(_dec(parts[2]))
        return out
