"""`proxy`: forward connections between a host address and an address inside the container.

Addresses are LXD's: `tcp:<addr>:<port>[-<port>][,<port>]`, `udp:...` (IPv6 in brackets) and
`unix:<path>` / `unix:@abstract`; `bind=host` (default) listens on the host and connects inside
the container, `bind=instance` the reverse.

Two modes, as LXD 5.0:
- userspace (default): one forwarder process per device (networks/forwarder.py, a small stdlib
  program, not a copy of the daemon). With bind=host the daemon binds the listening sockets
  itself in start(), before the container starts, so a port in use is a clear 400 and nothing is
  left behind; the forwarder gets them as inherited fds once liblxc started the container (a
  post_start hook: it needs the container's init pid for its namespaces). The forwarder is
  supervised through a pidfd: restarted (with a backoff, a log line each time) when it dies while
  the container runs; after a daemon restart it is adopted (pid file `<devices dir>/proxy.<dev>`
  whose /proc/PID/cmdline matches what this device would run), not started twice. Its log is
  `$LXD_DIR/logs/<instance>/proxy.<dev>.log`. Stop, unplug and delete kill it.
- nat=true: DNAT rules (services.networks.firewall.proxy_dnat_apply/drop) toward one of the
  container's static nic addresses (a bridged/routed nic with ipv4.address/ipv6.address), tcp to
  tcp or udp to udp, bind=host only, no wildcard listen address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxd_daemon.devices.base import Device, DeviceContext, dev_bool, is_octal_mode, is_uint32
from lxd_daemon.devices.runconfig import RunConfig
from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.networks import forwarder as fwd
from lxd_daemon.util import validate as v

log = logging.getLogger("lxd.devices.proxy")

FORWARDER = Path(fwd.__file__).resolve()
BIND_INSTANCE = ("instance", "guest", "container")
START_TIMEOUT = 10.0


def _is_address(value: str) -> None:
    fwd.parse_address(value)


def _is_bind(value: str) -> None:
    if value not in ("host", *BIND_INSTANCE):
        raise ValueError('Invalid binding side given. Must be "host" or "instance"')


OPTIONS = {
    "listen": _is_address,
    "connect": _is_address,
    "bind": _is_bind,
    "mode": is_octal_mode,
    "nat": v.is_bool,
    "uid": is_uint32,
    "gid": is_uint32,
    "security.uid": is_uint32,
    "security.gid": is_uint32,
    "proxy_protocol": v.is_bool,
}


def proxy_key(project: str, instance: str, device: str) -> str:
    """The device's name for the firewall and the forwarder (LXD's `<project>_<instance>.<dev>`)."""
    return f"{project}_{instance}.{device}"


class Proxy(Device):
    type = "proxy"
    options = OPTIONS

    # -- validation -------------------------------------------------------------------------
    def check(self, *, profile: bool, pools: set[str] | None) -> None:
        name, dev = self.name, self.config

        def bad(msg: str) -> BadRequest:
            return BadRequest(f"Invalid device {name!r}: {msg}")

        for key in ("listen", "connect"):
            if not dev.get(key):
                raise bad(f"missing required option {key!r}")
        listen = fwd.parse_address(dev["listen"], listen=True)
        connect = fwd.parse_address(dev["connect"], listen=False)
        n_listen, n_connect = len(listen.endpoints()), len(connect.endpoints())
        if n_connect > 1 and n_connect != n_listen:
            raise bad("Mismatch between listen port(s) and connect port(s) count")
        if listen.kind == "udp" and connect.kind != "udp":
            raise bad("Proxying from udp to non-udp protocol is not supported")
        nat = dev_bool(dev, "nat")
        if dev_bool(dev, "proxy_protocol") and (connect.kind != "tcp" or nat):
            raise bad("The PROXY header can only be sent to tcp servers in non-nat mode")
        if (listen.kind != "unix" or listen.abstract) and any(dev.get(k) for k in ("uid", "gid", "mode")):
            raise bad("Only proxy devices for non-abstract unix sockets can carry uid, gid, or mode properties")
        if nat:
            if dev.get("bind", "host") not in ("", "host"):
                raise bad("Only host-bound proxies can use NAT")
            if "unix" in (listen.kind, connect.kind) or listen.kind != connect.kind:
                raise bad(f"Proxying {listen.kind} <-> {connect.kind} is not supported when using NAT")
            if listen.host in ("0.0.0.0", "::"):
                raise bad(f"Cannot listen on wildcard address {listen.host!r} when in nat mode")
            if (":" in listen.host) != (":" in connect.host):
                raise bad("Cannot mix IP versions between listen and connect in nat mode")

    @property
    def hotpluggable(self) -> bool:
        return True

    @property
    def sort_key(self) -> tuple[int, str]:
        return (1 << 16, self.name)  # after every mount: a proxy needs nothing of the others

    # -- config helpers ---------------------------------------------------------------------
    @property
    def nat(self) -> bool:
        return dev_bool(self.config, "nat")

    @property
    def bind(self) -> str:
        return "instance" if self.config.get("bind") in BIND_INSTANCE else "host"

    def listen_address(self) -> fwd.Address:
        return fwd.parse_address(self.config["listen"], listen=True)

    def connect_address(self) -> fwd.Address:
        return fwd.parse_address(self.config["connect"], listen=False)

    def key(self, ctx: DeviceContext) -> str:
        return proxy_key(ctx.project, ctx.instance_name, self.name)

    def pidfile(self, ctx: DeviceContext) -> Path:
        return ctx.devices_dir / f"proxy.{self.name}"

    def logfile(self, ctx: DeviceContext) -> Path:
        root = getattr(ctx.instances, "logs_root", None)
        base = Path(root) / ctx.instance if root is not None else ctx.devices_dir
        return base / f"proxy.{self.name}.log"

    def _to_host(self, ctx: DeviceContext, ukey: str, gkey: str, uid: int, gid: int) -> tuple[int, int]:
        hu, hg = (uid, gid) if ctx.privileged else ctx.idmap.to_host(uid, gid)
        if hu < 0 or hg < 0:
            raise BadRequest(f"Invalid device {self.name!r}: {ukey}/{gkey} {uid}/{gid} isn't mapped in the "
                             f"container's id map")
        return hu, hg

    def listen_ids(self, ctx: DeviceContext, side: str) -> tuple[int, int]:
        """Owner of a unix listening socket, as host ids: on the host as given (-1: left as made);
        inside the container its ids (default its root) through the container's id map."""
        u, g = self.config.get("uid", ""), self.config.get("gid", "")
        if side == "host":
            return int(u) if u else -1, int(g) if g else -1
        return self._to_host(ctx, "uid", "gid", int(u or 0), int(g or 0))

    def security_ids(self, ctx: DeviceContext, side: str) -> tuple[int, int]:
        """The ids the forwarder drops to on the connecting side ((0, 0): stays root)."""
        u, g = self.config.get("security.uid", ""), self.config.get("security.gid", "")
        if not u and not g:
            return 0, 0
        if side == "host":
            return int(u or 0), int(g or 0)
        return self._to_host(ctx, "security.uid", "security.gid", int(u or 0), int(g or 0))

    def spec(self, ctx: DeviceContext, pid: int) -> dict[str, Any]:
        """What the forwarder is run with (host ids, already mapped)."""
        dev = self.config
        listen_side, connect_side = ("host", "instance") if self.bind == "host" else ("instance", "host")
        luid, lgid = self.listen_ids(ctx, listen_side)
        suid, sgid = self.security_ids(ctx, connect_side)
        return {"listen": dev["listen"], "connect": dev["connect"], "bind": self.bind, "pid": pid,
                "listen_uid": luid, "listen_gid": lgid,
                "listen_mode": int(dev["mode"], 8) if dev.get("mode") else None,
                "security_uid": suid, "security_gid": sgid,
                "proxy_protocol": dev_bool(dev, "proxy_protocol")}

    def argv(self, ctx: DeviceContext, pid: int) -> list[str]:
        spec = json.dumps(self.spec(ctx, pid), sort_keys=True, separators=(",", ":"))
        return [sys.executable, "-I", "-S", str(FORWARDER), "--name", self.key(ctx), spec]

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, ctx: DeviceContext) -> RunConfig:
        if ctx.instances is None:
            raise BadRequest(f"Invalid device {self.name!r}: proxy devices can only be started by the daemon")
        if self.nat:
            await self._nat_apply(ctx)
            return RunConfig()
        self.spec(ctx, 0)  # ids that aren't mapped: a 400 before anything runs
        socks: list = []
        if self.bind == "host":
            listen = self.listen_address()
            uid, gid = self.listen_ids(ctx, "host")
            mode = int(self.config["mode"], 8) if self.config.get("mode") else None
            try:
                socks = await asyncio.to_thread(fwd.listen_sockets, listen, uid=uid, gid=gid, mode=mode)
            except fwd.ListenError as e:
                raise BadRequest(f"Failed to start device {self.name!r}: Error occurred when starting proxy "
                                 f"device: {e}") from None

        async def launch() -> None:
            try:
                pid = ctx.init_pid if ctx.init_pid > 0 else _running_pid(ctx)
                if pid <= 0:
                    return  # the container didn't start: nothing to forward
                # on the start path (ctx.init_pid) a failure doesn't fail the start: retried
                await forwarders(ctx.instances).start(self, ctx, pid, fds=[s.fileno() for s in socks],
                                                      retry=ctx.init_pid > 0)
            finally:
                for s in socks:
                    s.close()

        return RunConfig(post_start=[launch])

    async def stop(self, ctx: DeviceContext) -> RunConfig:
        async def undo() -> None:
            if self.nat:
                await self._nat_drop(ctx)
            else:
                await self._kill(ctx)

        return RunConfig(post_stop=[undo])

    async def remove(self, ctx: DeviceContext) -> None:
        if not self.nat and ctx.instances is not None:
            await self._kill(ctx)

    async def adopt(self, ctx: DeviceContext) -> None:
        """The daemon restarted while the container runs: take the running forwarder back under
        supervision (or start one), re-assert the NAT rules."""
        if ctx.instances is None:
            return
        if self.nat:
            await self._nat_apply(ctx)
            return
        await forwarders(ctx.instances).adopt(self, ctx)

    async def _kill(self, ctx: DeviceContext) -> None:
        await forwarders(ctx.instances).stop(self, ctx)
        listen = self.listen_address()
        if self.bind == "host" and listen.kind == "unix" and not listen.abstract:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_unlink_socket, listen.path)

    # -- nat ----------------------------------------------------------------------------------
    def _nat_target(self, ctx: DeviceContext) -> str:
        """The static nic address the rules forward to (LXD's rules: a bridged or routed nic with
        ipv4.address/ipv6.address; the connect address is that address or the wildcard)."""
        listen, connect = self.listen_address(), self.connect_address()
        family = 6 if ":" in listen.host else 4
        try:
            devices = ctx.instances.expanded(ctx.instance)[1]
        except LXDError:
            devices = {}
        nets = ctx.instances.services.networks
        for dname in sorted(devices):
            nic = devices[dname]
            if nic.get("type") != "nic":
                continue
            kind = nic.get("nictype", "")
            if not kind and nic.get("network") and nets is not None:
                with contextlib.suppress(Exception):
                    kind = "bridged" if nets.get(nic["network"], project=ctx.project).type == "bridge" else ""
            if kind not in ("bridged", "routed"):
                continue
            static = nic.get(f"ipv{family}.address", "")
            if static and connect.host in (static, "0.0.0.0", "::"):
                return static
        if connect.host in ("0.0.0.0", "::"):
            raise BadRequest(f"Failed to start device {self.name!r}: Instance has no static IPv{family} address "
                             f"assigned to be used as the connect IP")
        raise BadRequest(f"Failed to start device {self.name!r}: Connect IP {connect.host!r} must be one of the "
                         f"instance's static IPv{family} addresses")

    def _firewall(self, ctx: DeviceContext):
        nets = ctx.instances.services.networks
        fw = nets.firewall if nets is not None else None
        if fw is None:
            why = (nets.firewall_error if nets is not None else "") or "managed networks aren't set up"
            raise BadRequest(f"Failed to start device {self.name!r}: nat=true needs the daemon's nftables "
                             f"firewall, which isn't available: {why}")
        return fw

    async def _nat_apply(self, ctx: DeviceContext) -> None:
        listen, connect = self.listen_address(), self.connect_address()
        if len(connect.ports) not in (1, len(listen.ports)):
            raise BadRequest(f"Failed to start device {self.name!r}: in nat mode the connect ports must be one "
                             f"port or as many as the listen ports")
        target = self._nat_target(ctx)
        fw = self._firewall(ctx)
        family = "ipv6" if ":" in listen.host else "ipv4"
        key = self.key(ctx)
        try:
            # one connect port for all, or each listen port to the connect port at its position
            port = connect.ports[0] if len(connect.ports) == 1 else list(connect.ports)
            await asyncio.to_thread(fw.proxy_dnat_apply, key, family=family, proto=listen.kind,
                                    listen_addr=listen.host, listen_ports=list(listen.ports),
                                    connect_addr=target, connect_port=port)
        except LXDError:
            raise
        except Exception as e:
            raise BadRequest(f"Failed to start device {self.name!r}: failed to add the NAT rules: {e}") from None

    async def _nat_drop(self, ctx: DeviceContext) -> None:
        nets = ctx.instances.services.networks if ctx.instances is not None else None
        fw = nets.firewall if nets is not None else None
        if fw is not None:
            await asyncio.to_thread(fw.proxy_dnat_drop, self.key(ctx))


async def reconcile_nat(instances) -> None:
    """Start-up (after the devices' adoption): drop the NAT rules of proxies that no running
    container has any more (a container stopped or changed while the daemon was down)."""
    nets = instances.services.networks
    fw = nets.firewall if nets is not None else None
    if fw is None:
        return
    wanted = set()
    for name in list(instances.records):
        if instances.status_of(name)[0] == "Stopped":
            continue
        try:
            devices = instances.expanded(name)[1]
        except LXDError:
            continue
        rec = instances.records.get(name)
        if rec is None:
            continue
        wanted |= {proxy_key(rec.project, rec.name, d) for d, c in devices.items()
                   if c.get("type") == "proxy" and dev_bool(c, "nat")}
    try:
        have = (await asyncio.to_thread(fw.keys)).get("proxy", set())
        for key in sorted(set(have) - wanted):
            log.info("dropping the NAT rules of a proxy that is gone", extra={"device": key})
            await asyncio.to_thread(fw.proxy_dnat_drop, key)
    except Exception as e:
        log.warning("couldn't reconcile the proxies' NAT rules", extra={"err": str(e)})


def _running_pid(ctx: DeviceContext) -> int:
    try:
        status, pid = ctx.instances.status_of(ctx.instance)
    except Exception:
        return -1
    return pid if status != "Stopped" else -1


def _unlink_socket(path: str) -> None:
    import stat

    if stat.S_ISSOCK(os.lstat(path).st_mode):
        os.unlink(path)


# -- supervision ----------------------------------------------------------------------------------


def forwarders(instances) -> Forwarders:
    """The daemon's supervisor of forwarder processes (one per instance service)."""
    sup = instances.device_state.get("proxy")
    if sup is None:
        sup = instances.device_state["proxy"] = Forwarders()
    return sup


@dataclass(eq=False)
class _Proc:
    key: str
    device: Proxy
    ctx: DeviceContext
    pid: int
    pidfd: int
    popen: subprocess.Popen | None
    started: float = field(default_factory=time.monotonic)
    failures: int = 0
    stopping: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _is_forwarder_of(cmd: list[str] | None, key: str) -> bool:
    return bool(cmd) and str(FORWARDER) in cmd and "--name" in cmd and key in cmd


class Forwarders:
    """Forwarder processes by device key: started, watched through a pidfd, restarted when one
    dies while its container runs, adopted after a daemon restart, stopped."""

    def __init__(self) -> None:
        self.procs: dict[str, _Proc] = {}

    # -- start --------------------------------------------------------------------------------
    async def start(self, device: Proxy, ctx: DeviceContext, pid: int, *, fds: list[int] = (),
                    retry: bool = False) -> None:
        """Run the device's forwarder; BadRequest when it can't set up. retry=True (the
        container is starting, which a failure here doesn't undo): it is also retried under
        supervision, as if it had died."""
        key = device.key(ctx)
        old = self.procs.pop(key, None)
        if old is not None:
            await self._terminate(old)
        try:
            proc = await self._spawn(device, ctx, pid, fds)
        except LXDError:
            if retry:
                failed = _Proc(key, device, ctx, -1, -1, None)
                failed.exited.set()
                self.procs[key] = failed
                asyncio.get_running_loop().create_task(self._respawn(failed))
            raise
        self.procs[key] = proc

    async def _spawn(self, device: Proxy, ctx: DeviceContext, pid: int, fds) -> _Proc:
        argv = device.argv(ctx, pid)
        logfile = device.logfile(ctx)
        pidfile = device.pidfile(ctx)
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "LXD_FORWARDER_STATUS": str(wfd), "LXD_FORWARDER_FDS": ",".join(map(str, fds))}

        def run() -> subprocess.Popen:
            logfile.parent.mkdir(parents=True, exist_ok=True)
            with open(logfile, "ab") as logf:
                return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                                        pass_fds=(*fds, wfd), start_new_session=True, close_fds=True)

        try:
            popen = await asyncio.to_thread(run)
        except OSError as e:
            os.close(rfd)
            raise BadRequest(f"Failed to start device {device.name!r}: Failed running the forwarder: {e}") from None
        finally:
            os.close(wfd)
        try:
            status = await _read_status(rfd, START_TIMEOUT)
        finally:
            os.close(rfd)
        if status != "ok":
            with contextlib.suppress(OSError):
                popen.kill()
            await asyncio.to_thread(popen.wait)
            msg = status[len("error: "):] if status.startswith("error: ") else (
                status or f"the forwarder exited; see {logfile}")
            raise BadRequest(f"Failed to start device {device.name!r}: Error occurred when starting proxy "
                             f"device: {msg}")
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:  # it died right after reporting
            await asyncio.to_thread(popen.wait)
            raise BadRequest(f"Failed to start device {device.name!r}: the forwarder exited; see {logfile}") from None

        def save() -> None:
            pidfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = pidfile.with_name(pidfile.name + ".tmp")
            tmp.write_text(f"{popen.pid}\n")
            os.replace(tmp, pidfile)

        await asyncio.to_thread(save)
        proc = _Proc(device.key(ctx), device, ctx, popen.pid, pidfd, popen)
        self._watch(proc)
        log.info("proxy forwarder started", extra={"device": proc.key, "pid": popen.pid})
        return proc

    def _watch(self, proc: _Proc) -> None:
        asyncio.get_running_loop().add_reader(proc.pidfd, self._exited, proc)

    def _exited(self, proc: _Proc) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(proc.pidfd)
        os.close(proc.pidfd)
        proc.pidfd = -1
        if proc.popen is not None:
            with contextlib.suppress(Exception):
                proc.popen.poll()  # reap our child
        proc.exited.set()
        if self.procs.get(proc.key) is proc and not proc.stopping:
            loop.create_task(self._respawn(proc))

    async def _respawn(self, old: _Proc) -> None:
        lived = time.monotonic() - old.started
        failures = 0 if lived > 30 else old.failures + 1
        while True:
            delay = min(0.2 * (2 ** max(failures - 1, 0)), 10.0) if failures else 0.1
            log.warning("proxy forwarder exited; restarting it",
                        extra={"device": old.key, "pid": old.pid, "delay_s": delay})
            await asyncio.sleep(delay)
            if self.procs.get(old.key) is not old or old.stopping:
                return
            pid = await self._running_again(old)
            if pid <= 0:
                if self.procs.get(old.key) is old:
                    self.procs.pop(old.key)  # the container stopped
                return
            try:
                new = await self._spawn(old.device, old.ctx, pid, [])
            except Exception as e:
                failures += 1
                log.warning("couldn't restart a proxy forwarder", extra={"device": old.key, "err": str(e)})
                continue
            new.failures = failures
            if self.procs.get(old.key) is not old or old.stopping:  # stopped meanwhile
                await self._terminate(new)
                return
            self.procs[old.key] = new
            return

    async def _running_again(self, old: _Proc, wait: float = 15.0) -> int:
        """The container's init pid for a new forwarder: a forwarder also exits when init does,
        which is a reboot (init comes back with a new pid) or a stop (whose device stop takes
        the entry away); -1 when the container isn't running again within `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            pid = _running_pid(old.ctx)
            if pid > 0 or time.monotonic() > deadline or self.procs.get(old.key) is not old or old.stopping:
                return pid if self.procs.get(old.key) is old and not old.stopping else -1
            await asyncio.sleep(0.25)

    # -- adopt (daemon restart) ---------------------------------------------------------------
    async def adopt(self, device: Proxy, ctx: DeviceContext) -> None:
        key = device.key(ctx)
        if key in self.procs:
            return
        pid = ctx.init_pid if ctx.init_pid > 0 else _running_pid(ctx)
        if pid <= 0:
            return
        pidfile = device.pidfile(ctx)
        fpid = await asyncio.to_thread(_read_pid, pidfile)
        cmd = await asyncio.to_thread(_cmdline, fpid) if fpid > 0 else None
        if cmd is not None and cmd == device.argv(ctx, pid):
            try:
                pidfd = os.pidfd_open(fpid)
            except OSError:
                pidfd = -1
            if pidfd >= 0:
                proc = _Proc(key, device, ctx, fpid, pidfd, None)
                self.procs[key] = proc
                self._watch(proc)
                log.info("adopted a running proxy forwarder", extra={"device": key, "pid": fpid})
                return
        if _is_forwarder_of(cmd, key):  # an older config's, or another init's: replaced
            await _kill_pid(fpid)
        try:
            self.procs[key] = await self._spawn(device, ctx, pid, [])
        except LXDError as e:
            log.warning("couldn't start a proxy forwarder", extra={"device": key, "err": e.message})

    # -- stop ---------------------------------------------------------------------------------
    async def stop(self, device: Proxy, ctx: DeviceContext) -> None:
        key = device.key(ctx)
        proc = self.procs.pop(key, None)
        if proc is not None:
            await self._terminate(proc)
        else:  # not supervised by this daemon (adoption failed): the pid file says which
            pidfile = device.pidfile(ctx)
            fpid = await asyncio.to_thread(_read_pid, pidfile)
            if fpid > 0 and _is_forwarder_of(await asyncio.to_thread(_cmdline, fpid), key):
                await _kill_pid(fpid)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(device.pidfile(ctx).unlink)

    async def _terminate(self, proc: _Proc) -> None:
        proc.stopping = True
        if proc.exited.is_set():
            return
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(proc.pidfd, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.exited.wait(), 3)
        except TimeoutError:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.exited.wait(), 3)


async def _read_status(fd: int, timeout: float) -> str:
    """The forwarder's one status line ("" when it exited without one)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    done = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf.extend(chunk)
        if not chunk or b"\n" in buf:
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        loop.remove_reader(fd)
        return f"error: the forwarder didn't report within {timeout:g}s"
    return buf.decode(errors="replace").strip()


async def _kill_pid(pid: int) -> None:
    """Stop a forwarder that isn't this daemon's child (TERM, then KILL)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        for i in range(60):
            if await asyncio.to_thread(_pidfd_exited, pidfd, 0.05):
                return
            if i == 40:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _pidfd_exited(pidfd: int, timeout: float) -> bool:
    import select

    return bool(select.select([pidfd], [], [], timeout)[0])
