"""Who is calling /dev/lxd: the connection's peer (SO_PEERCRED, filled in by the kernel at
connect time) -> `/proc/PID/cgroup` -> the `lxc.payload.<name>[-N]` cgroup liblxc put the
container in -> its record key. Nothing the guest sends takes part.

The outermost payload component of the path decides: a container can create cgroups below its
own (a nested `lxc.payload.other` included) but never above it. A suffixed component
(`lxc.payload.c1-1`: liblxc's choice when `lxc.payload.c1` belonged to a container of another
lxcpath) is only ours when our container's init is in that very cgroup.
"""

from __future__ import annotations

import socket
import struct

PREFIX = "lxc.payload."
_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_credentials(sock) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix socket's peer, or None."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None


def payload_component(cgroup_text: str) -> str | None:
    """The `lxc.payload.*` cgroup (without the prefix) a /proc/PID/cgroup text places its
    process in: the outermost one of each hierarchy's path. None when no hierarchy has one,
    or when hierarchies disagree (nothing is trusted then)."""
    found: set[str] = set()
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for comp in parts[2].split("/"):
            if comp.startswith(PREFIX) and len(comp) > len(PREFIX):
                found.add(comp[len(PREFIX):])
                break
    if len(found) != 1:
        return None
    return found.pop()


def read_cgroup(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read(65536)
    except OSError:
        return None


def candidate_keys(component: str) -> list[str]:
    """Record keys a payload component may stand for: itself, and without a `-N` suffix."""
    keys = [component]
    base, sep, n = component.rpartition("-")
    if sep and base and n.isdigit():
        keys.append(base)
    return keys


def instance_for_pid(pid: int, records, init_pid) -> str | None:
    """The record key of the running container `pid` is in, or None.
    records: the keys known (a mapping or set); init_pid(key): the container's init pid or 0."""
    if pid <= 0:
        return None
    text = read_cgroup(pid)
    comp = payload_component(text) if text is not None else None
    if comp is None:
        return None
    for key in candidate_keys(comp):
        if key not in records:
            continue
        ipid = init_pid(key)
        if ipid <= 0:
            continue
        if ipid == pid:
            return key
        init_text = read_cgroup(ipid)
        if init_text is not None and payload_component(init_text) == comp:
            return key
    return None


def host_root_uid(pid: int) -> int | None:
    """The host uid of root in process `pid`'s user namespace (0 outside any), or None."""
    try:
        with open(f"/proc/{pid}/uid_map") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "0":
                    return int(parts[1])
    except (OSError, ValueError):
        return None
    return None
