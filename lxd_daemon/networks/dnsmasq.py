"""One dnsmasq per managed bridge: DHCP (v4 and v6), router advertisements and DNS for the
bridge's domain.

Its files live in the network's state directory, as LXD lays them out: dnsmasq.pid,
dnsmasq.leases, dnsmasq.hosts/ (one file per nic: `hwaddr[,ipv4][,[ipv6]][,hostname]`),
dnsmasq.raw (raw.dnsmasq) and dnsmasq.log (what dnsmasq prints). The process runs in the daemon's
network namespace, in a session of its own, so it outlives a daemon restart; the next daemon
adopts it when its command line is the one it would start. It is watched through a pidfd and
restarted with a backoff if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import ipaddress
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lxd_daemon.errors import LXDError
from lxd_daemon.util.atomic import atomic_write

log = logging.getLogger("lxd.networks.dnsmasq")

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
PID_FILE = "dnsmasq.pid"
LEASES_FILE = "dnsmasq.leases"
HOSTS_DIR = "dnsmasq.hosts"
RAW_FILE = "dnsmasq.raw"
LOG_FILE = "dnsmasq.log"
START_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX, STABLE_AFTER = 0.5, 30.0, 60.0


class DnsmasqError(LXDError):
    status = 500


@dataclass
class DnsmasqConfig:
    network: str
    bridge: str
    state_dir: Path
    ipv4: ipaddress.IPv4Interface | None = None
    ipv4_ranges: list[tuple[str, str]] = field(default_factory=list)  # empty: the subnet after the gateway
    ipv4_expiry: str = "1h"
    ipv4_dhcp: bool = True
    ipv6: ipaddress.IPv6Interface | None = None
    ipv6_dhcp: bool = True
    ipv6_stateful: bool = False
    ipv6_ranges: list[tuple[str, str]] = field(default_factory=list)
    ipv6_expiry: str = "1h"
    dns_domain: str = "lxd"
    dns_mode: str = "managed"  # managed | dynamic | none
    raw: str = ""
    mtu: int | None = None


def _default_range(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> tuple[str, str]:
    """The subnet's hosts after the gateway address (IPv6: at most the first 2^32 or so)."""
    net = iface.network
    first = iface.ip + 1
    if net.version == 4:
        last = net.broadcast_address - 1
    else:
        last = net.broadcast_address - 1 if net.prefixlen >= 96 else net.network_address + 0xFFFFFFFF
    return str(first), str(last)


def run_as(state_dir: Path) -> tuple[str, str]:
    """The (user, group) dnsmasq drops to after binding: nobody, as LXD runs it, when nobody can
    reach the state directory (it re-reads the host entries there on SIGHUP: every directory
    from / down must be searchable by others, as /var/lib/lxd is); root otherwise (a private
    LXD_DIR), rather than a dnsmasq that can't read its hosts."""
    p = Path(state_dir).resolve()
    for d in (p, *p.parents):
        try:
            if not d.stat().st_mode & stat.S_IXOTH:
                return "root", "root"
        except OSError:
            return "root", "root"
    try:
        grp.getgrnam("nogroup")
        return "nobody", "nogroup"
    except KeyError:
        return "nobody", "nobody"


def argv(cfg: DnsmasqConfig) -> list[str]:
    """The dnsmasq command line of a network (the same config and state directory give the same
    argv, which is how a running dnsmasq is recognised for adoption)."""
    d = Path(cfg.state_dir)
    user, group = run_as(d)
    args = [DNSMASQ, "--keep-in-foreground", "--strict-order", "--bind-interfaces", "--except-interface=lo",
            f"--pid-file={d / PID_FILE}", "--no-ping", f"--interface={cfg.bridge}", "--dhcp-rapid-commit",
            "--no-negcache", "--no-resolv", "--no-hosts", "--quiet-dhcp", "--quiet-dhcp6", "--quiet-ra",
            f"--user={user}", f"--group={group}",
            "--dhcp-no-override", "--dhcp-authoritative", f"--dhcp-leasefile={d / LEASES_FILE}",
            f"--dhcp-hostsfile={d / HOSTS_DIR}"]
    if cfg.ipv4 is not None:
        args.append(f"--listen-address={cfg.ipv4.ip}")
        if cfg.ipv4_dhcp:
            for start, end in cfg.ipv4_ranges or [_default_range(cfg.ipv4)]:
                args.append(f"--dhcp-range={start},{end},{cfg.ipv4.netmask},{cfg.ipv4_expiry}")
            if cfg.mtu:
                args.append(f"--dhcp-option-force=26,{cfg.mtu}")
    if cfg.ipv6 is not None:
        args += [f"--listen-address={cfg.ipv6.ip}", "--enable-ra"]
        if cfg.ipv6_dhcp and cfg.ipv6_stateful:
            for start, end in cfg.ipv6_ranges or [_default_range(cfg.ipv6)]:
                args.append(f"--dhcp-range={start},{end},{cfg.ipv6.network.prefixlen},{cfg.ipv6_expiry}")
        elif cfg.ipv6_dhcp:
            args.append(f"--dhcp-range=::,constructor:{cfg.bridge},ra-stateless,ra-names")
        else:
            args.append(f"--dhcp-range=::,constructor:{cfg.bridge},ra-only")
        if cfg.mtu:
            args.append(f"--ra-param={cfg.bridge},mtu:{cfg.mtu},600")  # 600 s: the default interval
    if cfg.dns_mode != "none" and cfg.dns_domain:
        args += [f"--domain={cfg.dns_domain}", f"--local=/{cfg.dns_domain}/",
                 f"--interface-name=_gateway.{cfg.dns_domain},{cfg.bridge}"]
    args.append(f"--conf-file={d / RAW_FILE}")
    return args


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _read_pid(state_dir: Path) -> int | None:
    try:
        return int((Path(state_dir) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _ours(pid: int, state_dir: Path) -> bool:
    cmd = _cmdline(pid)
    return bool(cmd) and os.path.basename(cmd[0]) == "dnsmasq" and \
        f"--pid-file={Path(state_dir) / PID_FILE}" in cmd


def _kill_wait(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaps it when it is our child."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not _alive(pid):
                return
            time.sleep(0.02)


def stop_stale(state_dir: Path) -> None:
    """Kill the dnsmasq recorded in the network's pid file, if that process is a dnsmasq of this
    state directory, and forget the pid file. Blocking."""
    state_dir = Path(state_dir)
    pid = _read_pid(state_dir)
    if pid is not None and _alive(pid) and _ours(pid, state_dir):
        _kill_wait(pid)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / PID_FILE).unlink()


def _parse_key(key: str) -> tuple[str, str]:
    """(project, instance) of a host-entry key `project_instance.device` (instance names have
    neither `_` nor `.`)."""
    head = key.split(".", 1)[0]
    project, _, instance = head.rpartition("_")
    return project or "default", instance


class Dnsmasq:
    """The supervised dnsmasq of one network."""

    def __init__(self, cfg: DnsmasqConfig):
        self.cfg = cfg
        self._pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._pidfd: int | None = None
        self._started_at = 0.0
        self._backoff = BACKOFF_MIN
        self._stopping = False
        self._restart_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def state_dir(self) -> Path:
        return Path(self.cfg.state_dir)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt this network's running dnsmasq when its command line matches, else start one and
        wait until it has bound its sockets. Idempotent."""
        async with self._lock:
            self._stopping = False
            if self._pid is not None and _alive(self._pid):
                return
            await asyncio.to_thread(self._prepare)
            want = argv(self.cfg)
            pid = _read_pid(self.state_dir)
            if pid is not None and _alive(pid) and _cmdline(pid) == want:
                self._watch(pid, None)
                log.info("dnsmasq adopted", extra={"network": self.cfg.network, "pid": pid})
                return
            await asyncio.to_thread(stop_stale, self.state_dir)
            await self._spawn(want)

    async def stop(self) -> None:
        """Stop supervising and terminate the process (the state files stay)."""
        async with self._lock:
            self._stopping = True
            if self._restart_task is not None:
                self._restart_task.cancel()
                self._restart_task = None
            pid = self._pid
            self._unwatch()
            if pid is not None:
                await asyncio.to_thread(_kill_wait, pid)
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / PID_FILE).unlink()
            else:
                await asyncio.to_thread(stop_stale, self.state_dir)
            if self._proc is not None:
                with contextlib.suppress(Exception):
                    self._proc.wait(0)
                self._proc = None

    def detach(self) -> None:
        """Stop supervising but leave the process running (daemon shutdown: the next daemon
        adopts it). Call from the event loop's thread."""
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None
        self._unwatch()
        self._proc = None

    async def restart(self, cfg: DnsmasqConfig) -> None:
        """Apply a new configuration (a new process; leases and host files stay)."""
        await self.stop()
        self.cfg = cfg
        await self.start()

    def _prepare(self) -> None:
        d = self.state_dir
        d.mkdir(parents=True, exist_ok=True)
        (d / HOSTS_DIR).mkdir(mode=0o755, exist_ok=True)
        (d / LEASES_FILE).touch(mode=0o644, exist_ok=True)
        raw = self.cfg.raw or ""
        if raw and not raw.endswith("\n"):
            raw += "\n"
        raw_path = d / RAW_FILE
        if not raw_path.exists() or raw_path.read_text() != raw:
            atomic_write(raw_path, raw.encode())

    async def _spawn(self, cmd: list[str]) -> None:
        def run() -> subprocess.Popen:
            with open(self.state_dir / LOG_FILE, "ab") as logf:
                return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                        start_new_session=True, close_fds=True)

        try:
            proc = await asyncio.to_thread(run)
        except OSError as e:
            raise DnsmasqError(f"Failed to start dnsmasq for network {self.cfg.network!r}: {e}") from None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise DnsmasqError(f"Failed to start dnsmasq for network {self.cfg.network!r}: "
                                   f"{self._log_tail() or f'exit status {proc.returncode}'}")
            if _read_pid(self.state_dir) == proc.pid:
                break
            if time.monotonic() > deadline:
                await asyncio.to_thread(_kill_wait, proc.pid)
                raise DnsmasqError(f"Failed to start dnsmasq for network {self.cfg.network!r}: "
                                   "it did not come up in time")
            await asyncio.sleep(0.01)
        self._proc = proc
        self._watch(proc.pid, proc)
        log.info("dnsmasq started", extra={"network": self.cfg.network, "pid": proc.pid})

    def _log_tail(self) -> str:
        try:
            lines = (self.state_dir / LOG_FILE).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].removeprefix("dnsmasq: ") if lines else ""

    # --- supervision -----------------------------------------------------------------------

    def _watch(self, pid: int, proc: subprocess.Popen | None) -> None:
        self._unwatch()
        self._pid = pid
        self._proc = proc
        self._started_at = time.monotonic()
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self._exited()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._exited)

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._pid = None

    def _exited(self) -> None:
        pid, proc = self._pid, self._proc
        self._unwatch()
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(0)
            self._proc = None
        elif pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if self._stopping:
            return
        if time.monotonic() - self._started_at > STABLE_AFTER:
            self._backoff = BACKOFF_MIN
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        log.warning("dnsmasq exited, restarting", extra={"network": self.cfg.network, "pid": pid,
                                                           "delay": delay})
        self._restart_task = asyncio.get_running_loop().create_task(self._restart_later(delay))

    async def _restart_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._restart_task = None
        if self._stopping:
            return
        try:
            await self.start()
        except Exception as e:  # try again later
            log.error("dnsmasq restart failed", extra={"network": self.cfg.network, "error": str(e)})
            if not self._stopping:
                delay = self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                self._restart_task = asyncio.get_running_loop().create_task(self._restart_later(delay))

    # --- host entries and leases -----------------------------------------------------------

    def _hup(self) -> None:
        pid = self._pid
        if pid is None:
            pid = _read_pid(self.state_dir)
            if pid is None or not _ours(pid, self.state_dir):
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)

    def set_host(self, key: str, hwaddr: str, *, hostname: str, ipv4: str | None = None,
                 ipv6: str | None = None) -> None:
        """Write the nic's host entry (static addresses when given; the DNS name in managed DNS
        mode) and make dnsmasq read it. Blocking (a small file write and a signal)."""
        if "/" in key or key.startswith("."):
            raise DnsmasqError(f"Bad host entry key {key!r}")
        fields = [hwaddr.lower()]
        if ipv4:
            fields.append(str(ipv4))
        if ipv6:
            fields.append(f"[{ipv6}]")
        if hostname and self.cfg.dns_mode == "managed":
            fields.append(hostname)
        hosts = self.state_dir / HOSTS_DIR
        text = ",".join(fields) + "\n"
        try:
            if (hosts / key).read_text() == text:
                return  # a restart of the same nic: dnsmasq has it already
        except OSError:
            pass
        hosts.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(hosts / key, text.encode(), durable=False)
        self._hup()

    def drop_host(self, key: str) -> None:
        if "/" in key or key.startswith("."):
            return
        try:
            (self.state_dir / HOSTS_DIR / key).unlink()
        except FileNotFoundError:
            return
        self._hup()

    def _hosts(self) -> list[tuple[str, list[str]]]:
        out = []
        d = self.state_dir / HOSTS_DIR
        try:
            names = sorted(os.listdir(d))
        except OSError:
            return out
        for name in names:
            if name.startswith("."):
                continue
            try:
                line = (d / name).read_text().strip()
            except OSError:
                continue
            if line:
                out.append((name, line.split(",")))
        return out

    def leases(self) -> list[dict]:
        """LXD's NetworkLease list: a static entry for each nic with a static address (or a
        name), then the dynamic leases of the lease file that no static entry covers."""
        out: list[dict] = []
        seen: set[tuple[str, str]] = set()
        by_mac: dict[str, tuple[str, str]] = {}
        for key, fields in self._hosts():
            project, instance = _parse_key(key)
            mac = fields[0]
            by_mac[mac] = (project, instance)
            for f in fields[1:]:
                addr = f.strip("[]")
                try:
                    ipaddress.ip_address(addr)
                except ValueError:
                    continue
                seen.add((mac, addr))
                out.append({"hostname": instance, "hwaddr": mac, "address": addr, "type": "static",
                            "location": "none", "project": project})
        try:
            lines = (self.state_dir / LEASES_FILE).read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            f = line.split()
            if len(f) < 4 or f[0] == "duid":
                continue
            mac, addr, hostname = f[1], f[2], f[3]
            if ":" in addr:  # DHCPv6: `expiry iaid address hostname duid`; the duid ends with the MAC
                duid = f[4] if len(f) > 4 else ""
                mac = duid[-17:] if len(duid) >= 17 and duid.count(":") >= 5 else ""
            mac = mac.lower()
            if (mac, addr) in seen:
                continue
            project, instance = by_mac.get(mac, ("default", ""))
            out.append({"hostname": instance or ("" if hostname == "*" else hostname), "hwaddr": mac,
                        "address": addr, "type": "dynamic", "location": "none", "project": project})
        return out
