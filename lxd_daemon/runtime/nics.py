"""Network interfaces of a running container, done inside the liblxc worker (registered with
@worker.method): a nic hot-plugged by instances/live.py is moved from the daemon's network
namespace into the container's, renamed there, configured and brought up; an unplugged one is
deleted inside the container (a veth takes its host end with it) or given back to the host
under its own name (a physical nic).

Each call forks a child that keeps a handle on the daemon's namespace, makes the move over
rtnetlink (pyroute2), then enters the container's network namespace (setns, only the network
namespace: the paths and ids of the container don't matter here) for the rest. When a step
inside fails, the interface goes back to the host under the name it came with, so a failed plug
leaves the container as it was.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from lxd_daemon.runtime.hotplug import _in_child, setns
from lxd_daemon.runtime.worker import Worker, method

CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02


def _ipr():
    from pyroute2 import IPRoute

    return IPRoute()


def _index(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _configure(name: str, options: dict) -> None:
    """Inside the container's namespace: MAC, MTU, up, addresses, gateways of `name`."""
    with _ipr() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            raise OSError(f"interface {name!r} vanished inside the container")
        if options.get("hwaddr"):
            ipr.link("set", index=idx, address=options["hwaddr"])
        if options.get("mtu"):
            ipr.link("set", index=idx, mtu=int(options["mtu"]))
        ipr.link("set", index=idx, state="up")
        for cidr in options.get("addresses") or []:
            iface = ipaddress.ip_interface(cidr)
            family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
            kw = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                     family=family, **kw)
        for gw in options.get("gateways") or []:
            ip = ipaddress.ip_address(gw)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            if ip.version == 4:  # the gateway is on the link even outside the addresses' prefix
                ipr.route("replace", dst=str(ip), dst_len=32, oif=idx, scope=253, family=family)
            ipr.route("replace", dst="0.0.0.0" if ip.version == 4 else "::", dst_len=0, gateway=str(ip),
                      oif=idx, family=family)


def attach(pid: int, link: str, name: str, options: dict) -> None:
    """Move host interface `link` into the network namespace of process `pid` as `name`."""
    _ipr().close()  # pyroute2 imported before the fork

    def child() -> None:
        host_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        with _ipr() as ipr:
            idx = _index(ipr, link)
            if idx is None:
                raise OSError(f"host interface {link!r} doesn't exist")
            ipr.link("set", index=idx, state="down")
            try:
                ipr.link("set", index=idx, net_ns_fd=target, ifname=name)
            except Exception as e:
                code = getattr(e, "code", 0)
                if code == 17:  # EEXIST
                    raise OSError(f"an interface named {name!r} already exists in the container") from None
                raise OSError(f"moving {link!r} into the container failed: "
                              f"{os.strerror(code) if code else e}") from None
        setns(target, CLONE_NEWNET)
        try:
            _configure(name, options)
        except Exception as e:
            with _ipr() as ipr:  # give it back as it came
                idx = _index(ipr, name)
                if idx is not None:
                    ipr.link("set", index=idx, state="down")
                    ipr.link("set", index=idx, net_ns_fd=host_ns, ifname=link)
            code = getattr(e, "code", 0)
            raise OSError(f"configuring {name!r} in the container failed: "
                          f"{os.strerror(code) if code else e}") from None

    _in_child(child)


def detach(pid: int, name: str, give_back: str = "") -> None:
    """Take interface `name` out of the container: moved back to the host as `give_back`, or
    deleted (a veth pair goes as a whole). A missing interface is fine."""
    _ipr().close()

    def child() -> None:
        host_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        setns(target, CLONE_NEWNET)
        with _ipr() as ipr:
            idx = _index(ipr, name)
            if idx is None:
                return
            ipr.link("set", index=idx, state="down")
            if give_back:
                ipr.link("set", index=idx, net_ns_fd=host_ns, ifname=give_back)
            else:
                ipr.link("del", index=idx)

    _in_child(child)


@method()
def nic_attach(worker: Worker, pid: int, link: str, name: str, options: dict) -> None:
    attach(pid, link, name, options)


@method()
def nic_detach(worker: Worker, pid: int, name: str, give_back: str = "") -> None:
    detach(pid, name, give_back)
