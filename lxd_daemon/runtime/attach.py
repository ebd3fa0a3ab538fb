"""Exec, pty and console helpers that run inside the liblxc worker (registered with @worker.method).

- `exec_attach` runs a command in a running container with liblxc's attach() and the stdin,
  stdout and stderr fds the daemon passed with SCM_RIGHTS (or, for interactive commands, a pty
  allocated inside the container's own devpts, whose master goes back to the daemon). It returns
  the pid at once; the worker reports the exit status later as an {"ev":"exit"} notification
  from its pidfd loop (never a SIGCHLD reaper).
  Unprivileged containers take a faster path that does what liblxc's attach does without its
  round trips to the container's monitor (one per cgroup hierarchy, among others), see
  `fast_attach`; anything it does not understand falls back to liblxc.
- `console_open` attaches to the container's console (tty 0) through liblxc's console_getfd and
  hands the pty master, plus the command socket that keeps the console reserved, to the daemon.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import stat
import struct
import termios
import warnings  # noqa: F401  os.execvpe imports it, in a child inside the container: loaded here

from lxd_daemon.runtime.worker import Reply, Worker, method
from lxd_daemon.util.cgroups import own_cgroup

TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441

# Exit codes of the attached child when the command itself cannot be started (as a shell).
NOT_FOUND = 127
NOT_EXECUTABLE = 126

def container(name: str, lxcpath: str, config_path: str | None = None):
    """A python-lxc Container with the daemon-written config loaded (about 0.15 ms, so it is made
    per call and dropped right after).

    This is the C type `_lxc.Container`: `lxc.Container` keeps a reference cycle (its network
    list points back at it), so `del` would not free it and its liblxc fds (the log file, a
    pidfd) would stay open until some garbage collection."""
    import _lxc

    c = _lxc.Container(name, lxcpath)
    if config_path and os.path.exists(config_path):
        c.clear_config()
        if not c.load_config(config_path):
            raise RuntimeError(f"Failed to load the LXC configuration {config_path}")
    return c


def _exec(argv: list[str], env: dict[str, str]) -> int:
    """exec argv like a shell would (127 not found, 126 not executable); returns only on failure.

    It runs inside the container's mount namespace, where the host's Python library is out of
    reach: whatever it imports must be loaded before (os.execvpe imports `warnings`)."""
    # Nothing of the worker (its socket to the daemon above all) may reach the command.
    os.closerange(3, 1 << 16)
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        os.write(2, f"{argv[0]}: command not found\n".encode(errors="replace"))
        return NOT_FOUND
    except (PermissionError, IsADirectoryError):
        os.write(2, f"{argv[0]}: permission denied\n".encode(errors="replace"))
        return NOT_EXECUTABLE
    except OSError as e:
        os.write(2, f"{argv[0]}: {e.strerror}\n".encode(errors="replace"))
        return NOT_EXECUTABLE
    return NOT_EXECUTABLE


def _child(payload) -> int:
    """Runs in liblxc's attached child, inside the container."""
    argv, env = payload
    return _exec(argv, env)


def open_pty(init_pid: int, uid: int, gid: int, width: int, height: int) -> tuple[int, int]:
    """A pty pair in the container's devpts: (master, slave), the slave owned by uid/gid."""
    master = os.open(f"/proc/{init_pid}/root/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        os.close(master)
        raise
    try:
        os.fchown(slave, uid, gid)
        if width > 0 and height > 0:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    except OSError:
        os.close(slave)
        os.close(master)
        raise
    return master, slave


@method()
def exec_attach(worker: Worker, name: str, lxcpath: str, config_path: str | None, argv: list[str],
                env: dict[str, str], uid: int, gid: int, cwd: str, pty: dict | None = None,
                opts: dict | None = None, fds: list[int] | None = None) -> object:
    """Start argv in the container. fds: [stdin, stdout, stderr] unless `pty` is given.

    pty: {"uid","gid" (host ids owning the slave), "width", "height"}; the reply then carries the
    pty master. opts: {"init_pid": the container's init as the daemon tracks it, "privileged"}.
    Returns {"pid": pid, "path": "fast"|"liblxc"}; the exit status follows as an exit event."""
    if not argv:
        raise ValueError("Empty command")
    opts = opts or {}
    init_pid = int(opts.get("init_pid") or (pty or {}).get("init_pid") or -1)
    privileged = bool(opts.get("privileged", True))
    c = None
    if init_pid <= 0:
        c = container(name, lxcpath, config_path)
        init_pid = c.init_pid
        if init_pid <= 0:
            raise RuntimeError("The instance isn't running")
    master = slave = -1
    if pty is not None:
        master, slave = open_pty(init_pid, int(pty["uid"]), int(pty["gid"]), int(pty.get("width") or 0),
                                 int(pty.get("height") or 0))
        stdio = (slave, slave, slave)
    else:
        if not fds or len(fds) != 3:
            raise ValueError("exec_attach needs three fds (stdin, stdout, stderr)")
        stdio = tuple(fds)
    pid = -1
    path = "fast"
    try:
        if not privileged:
            try:
                pid = fast_attach(name, init_pid, list(argv), dict(env), uid, gid, cwd, stdio,
                                  config_path=config_path, tty=pty is not None)
            except FastPathUnavailable:
                pid = -1
        if pid <= 0:
            path = "liblxc"
            pid = _liblxc_attach(c or container(name, lxcpath, config_path), argv, env, uid, gid, cwd, stdio)
    except BaseException:
        if master >= 0:
            os.close(master)
        raise
    finally:
        if slave >= 0:
            os.close(slave)
        del c
    if pid <= 0:
        if master >= 0:
            os.close(master)
        raise RuntimeError("Failed to attach to the instance (is it running?)")
    worker.watch(pid)
    if master >= 0:
        return Reply({"pid": pid, "path": path}, [master])
    return {"pid": pid, "path": path}


def _liblxc_attach(c, argv, env, uid, gid, cwd, stdio) -> int:
    import _lxc

    before = _open_fds()
    try:
        return c.attach(_child, (list(argv), dict(env)), env_policy=_lxc.LXC_ATTACH_CLEAR_ENV,
                        extra_env_vars=[f"{k}={v}" for k, v in env.items()], uid=uid, gid=gid,
                        initial_cwd=cwd or "/", stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
    finally:
        _close_leaked_pidfds(before)


def _open_fds() -> set[int]:
    out = set()
    for x in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(x))  # the listing's own directory fd is gone by now
        except OSError:
            continue
        out.add(int(x))
    return out


def _close_leaked_pidfds(before: set[int]) -> None:
    """liblxc 5.0.2's attach leaves a pidfd of the container's init open on every call: close it."""
    for fd in _open_fds() - before:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                os.close(fd)
        except OSError:
            pass


@method()
def console_open(worker: Worker, name: str, lxcpath: str, config_path: str | None = None,
                 ttynum: int = 0) -> object:
    """The pty master of the container's console, plus the liblxc command socket that keeps it
    reserved: closing that socket (in the daemon) frees the console for the next client.

    python-lxc returns only the master and keeps the socket open in this process, so the new
    fds are found by comparing /proc/self/fd before and after the call and all handed over."""
    c = container(name, lxcpath, config_path)
    if not c.running:
        raise RuntimeError("The instance isn't running")
    before = _open_fds()
    try:
        master = c.console_getfd(ttynum)
    except ValueError:
        leaked = _open_fds() - before
        for fd in leaked:
            os.close(fd)
        raise RuntimeError("The console is busy or unavailable") from None
    new = sorted(fd for fd in _open_fds() - before - {master} if stat.S_ISSOCK(os.fstat(fd).st_mode))
    del c
    return Reply({"fds": 1 + len(new)}, [master, *new])


# -- the fast path ---------------------------------------------------------------------------
#
# liblxc's attach asks the container's monitor process for the init pidfd, then for the cgroup
# of every v1 hierarchy, the seccomp and LSM settings...: a dozen synchronous round trips, each
# of which waits for the monitor to be scheduled (45 ms per exec on a loaded 2-core host, against
# 18 ms for the path below). For an unprivileged container the worker does the same steps itself:
#
#   worker:  setns(init pidfd, CLONE_NEWPID) for its children only, fork, restore its own pid ns
#   child:   join the container's cgroups (host side, before anything else), setns into the
#            user, mount, uts, ipc, net and cgroup namespaces, new session, stdio (and the pty as
#            controlling terminal), the init's capability bounding set and no_new_privs, the
#            container's seccomp profile, groups/gid/uid, cwd, then exec.
#
# The child is the worker's own child (waitpid and pidfd work as for liblxc's attach). Privileged
# containers, seccomp profiles beyond a plain deny list, and any unexpected state use liblxc.

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL = 0x00000000
SCMP_ACT_ERRNO = 0x00050000
SCMP_FLTATR_CTL_NNP = 3

_libc = ctypes.CDLL(None, use_errno=True)
_seccomp_cache: dict[tuple, object] = {}
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine)
SECCOMP_SET_MODE_FILTER = 1


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """A libseccomp context compiled once to BPF, so a child installs it with one syscall
    instead of having libseccomp generate the program again in every exec."""

    def __init__(self, ctx, lib):
        self.ctx = ctx
        self.lib = lib
        self.buf = None
        self.prog = None
        if _SYS_SECCOMP is None:
            return
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            if lib.seccomp_export_bpf(ctx, fd) != 0:
                return
            size = os.lseek(fd, 0, os.SEEK_END)
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        if not data or len(data) % 8:
            return
        self.buf = ctypes.create_string_buffer(data, len(data))
        self.prog = _SockFprog(len(data) // 8, ctypes.addressof(self.buf))

    def load(self) -> int:
        """Install the filter in the calling thread; 0 on success."""
        if self.prog is not None:
            return _libc.syscall(_SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(self.prog))
        return self.lib.seccomp_load(self.ctx)


class FastPathUnavailable(Exception):
    pass


def _libseccomp():
    lib = getattr(_libseccomp, "lib", None)
    if lib is None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError:
            raise FastPathUnavailable("libseccomp is missing") from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        _libseccomp.lib = lib
    return lib


def parse_seccomp_profile(text: str) -> list[tuple[str, int]] | None:
    """liblxc's version-2 deny list ("2", "denylist"/"blacklist", "[all]", "name errno N" or
    "name [kill]") as [(syscall, action)]. None for anything else (the caller uses liblxc)."""
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) < 2 or lines[0] != "2" or lines[1] not in ("denylist", "blacklist"):
        return None
    rules = []
    for ln in lines[2:]:
        if ln.startswith("["):
            if ln.lower() not in ("[all]", "[x86_64]"):
                return None
            continue
        parts = ln.split()
        if parts[0] == "reject_force_umount":  # a mount-argument filter: liblxc's job
            return None
        if len(parts) == 1 or (len(parts) == 2 and parts[1] == "kill"):
            rules.append((parts[0], SCMP_ACT_KILL))
        elif len(parts) == 3 and parts[1] == "errno" and parts[2].isdigit():
            rules.append((parts[0], SCMP_ACT_ERRNO | (int(parts[2]) & 0xFFFF)))
        else:
            return None
    return rules


def seccomp_filter(profile: str | None):
    """A libseccomp context for the profile (cached by file identity), or None without one."""
    if not profile:
        return None
    try:
        st = os.stat(profile)
    except FileNotFoundError:
        raise FastPathUnavailable(f"seccomp profile {profile} is missing") from None
    key = (profile, st.st_ino, st.st_mtime_ns, st.st_size)
    program = _seccomp_cache.get(key)
    if program is not None:
        return program
    with open(profile) as f:
        rules = parse_seccomp_profile(f.read())
    if rules is None:
        raise FastPathUnavailable("seccomp profile not understood")
    lib = _libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise FastPathUnavailable("seccomp_init failed")
    # libseccomp sets no_new_privs when loading unless told not to (liblxc turns it off too).
    lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0)
    for arch in (b"x86", b"x32"):  # [all]: the compat ABIs too, as liblxc does
        token = lib.seccomp_arch_resolve_name(arch)
        if token:
            lib.seccomp_arch_add(ctx, token)
    for name, action in rules:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # unknown on this architecture
        if lib.seccomp_rule_add(ctx, action, nr, 0) < 0:
            raise FastPathUnavailable(f"seccomp rule for {name} failed")
    _seccomp_cache.clear()  # one profile per config version is enough to keep
    program = SeccompProgram(ctx, lib)
    _seccomp_cache[key] = program
    return program


def _config_values(config_path: str | None, key: str) -> list[str]:
    out = []
    if not config_path:
        return out
    with open(config_path) as f:
        for line in f:
            k, sep, v = line.partition("=")
            if sep and k.strip() == key:
                out.append(v.strip())
    return out


def _cgroup_procs(init_pid: int, name: str) -> list[str]:
    """The cgroup.procs file of each hierarchy the container's init is in (host paths). Every
    path must be the container's own (lxc.payload.<name>): a stale pid never gets us anywhere."""
    out = []
    with open(f"/proc/{init_pid}/cgroup") as f:
        for line in f:
            _, ctrl, path = line.rstrip("\n").split(":", 2)
            if own_cgroup(path, name) is None:
                raise FastPathUnavailable(f"pid {init_pid} isn't the init of {name}")
            if ctrl == "":
                bases = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            elif ctrl.startswith("name="):
                bases = ["/sys/fs/cgroup/" + ctrl[5:]]
            else:
                bases = ["/sys/fs/cgroup/" + ctrl, "/sys/fs/cgroup/" + ctrl.split(",")[0]]
            for base in bases:
                procs = f"{base}{path.rstrip('/')}/cgroup.procs"
                if os.path.exists(procs):
                    out.append(procs)
                    break
            else:
                raise FastPathUnavailable(f"cgroup of {ctrl or 'unified'} not found")
    return out


def _status_fields(init_pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{init_pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


_CAP_LAST: list[int] = []
_lsm_cache: dict[str, tuple[tuple, list[str], list[str]]] = {}
# name -> (init pid, its start time, cgroup.procs fds, CapBnd, NoNewPrivs) of the running container.
_join_cache: dict[str, tuple[int, str, list[int], int, bool]] = {}
_JOIN_CACHE_MAX = 512


_PIDNS: list[int] = []

# fork(2) called with the GIL held and without Python's at-fork hooks (threading, logging, random
# re-initialisation: about 0.8 ms here, half the cost of an exec). Only safe while this process
# has a single thread, which the worker checks before each use; the child runs nothing but
# _fast_child and execve.
_raw_fork = ctypes.PyDLL(None, use_errno=True).fork
_raw_fork.restype = ctypes.c_int
_raw_fork.argtypes = []


def _fork() -> int:
    if len(os.listdir("/proc/self/task")) != 1:
        return os.fork()
    pid = _raw_fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid


def _own_pidns() -> int:
    """The worker's own pid namespace (kept open), to return to after forking into a container's."""
    if not _PIDNS:
        _PIDNS.append(os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
    return _PIDNS[0]


def _cap_last() -> int:
    if not _CAP_LAST:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            _CAP_LAST.append(int(f.read()))
    return _CAP_LAST[0]


def _lsm_config(config_path: str | None) -> tuple[list[str], list[str]]:
    """(seccomp profiles, apparmor profiles) of the config file, re-read when the file changes."""
    if not config_path:
        return [], []
    st = os.stat(config_path)
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _lsm_cache.get(config_path)
    if hit is None or hit[0] != key:
        hit = (key, _config_values(config_path, "lxc.seccomp.profile"),
               _config_values(config_path, "lxc.apparmor.profile"))
        _lsm_cache[config_path] = hit
    return hit[1], hit[2]


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def _drop_join(name: str) -> None:
    old = _join_cache.pop(name, None)
    if old is not None:
        for fd in old[2]:
            os.close(fd)


def _drop_dead_joins() -> None:
    """Forget the containers whose init is gone (stopped or deleted since their last exec): an
    open cgroup.procs keeps its removed cgroup, with its memory accounting, alive in the kernel."""
    for name, (pid, started, *_) in list(_join_cache.items()):
        try:
            alive = _start_time(pid) == started
        except OSError:
            alive = False
        if not alive:
            _drop_join(name)


def _join_data(name: str, init_pid: int) -> tuple[list[int], int, bool]:
    """What a child needs to join the container: open cgroup.procs fds (one per hierarchy), the
    init's capability bounding set and no_new_privs. Kept per container while its init lives."""
    started = _start_time(init_pid)
    hit = _join_cache.get(name)
    if hit is not None and hit[0] == init_pid and hit[1] == started:
        return hit[2], hit[3], hit[4]
    _drop_join(name)
    _drop_dead_joins()
    if len(_join_cache) >= _JOIN_CACHE_MAX:
        _drop_join(next(iter(_join_cache)))
    status = _status_fields(init_pid)
    procs = _cgroup_procs(init_pid, name)
    fds: list[int] = []
    try:
        for path in procs:
            fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    entry = (init_pid, started, fds, int(status.get("CapBnd", "0"), 16), status.get("NoNewPrivs", "0") == "1")
    _join_cache[name] = entry
    return entry[2], entry[3], entry[4]


def fast_attach(name: str, init_pid: int, argv: list[str], env: dict[str, str], uid: int, gid: int, cwd: str,
                stdio: tuple[int, int, int], *, config_path: str | None, tty: bool) -> int:
    """Start argv in the (unprivileged) container whose init is init_pid; returns the pid."""
    profiles, apparmor = _lsm_config(config_path)
    if len(profiles) > 1 or apparmor not in ([], ["unconfined"]):
        raise FastPathUnavailable("LSM or several seccomp profiles configured")
    ctx = seccomp_filter(profiles[0] if profiles else None)
    cap_last = _cap_last()
    lib = None

    pidfd = os.pidfd_open(init_pid)
    try:
        try:
            procs, cap_bnd, no_new_privs = _join_data(name, init_pid)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise FastPathUnavailable(f"the container's init is gone: {e}") from None
        if select.select([pidfd], [], [], 0)[0]:  # exited: /proc may have shown another process
            _drop_join(name)
            raise FastPathUnavailable("the container's init exited")
    except BaseException:
        os.close(pidfd)
        raise
    own_pidns = _own_pidns()
    try:
        if _libc.setns(pidfd, CLONE_NEWPID) != 0:
            err = ctypes.get_errno()
            raise FastPathUnavailable(f"setns(pid): {os.strerror(err)}")
        try:
            pid = _fork()
            if pid == 0:  # the child: never returns
                code = 255
                try:
                    code = _fast_child(pidfd, procs, argv, env, uid, gid, cwd, stdio, tty, cap_bnd, cap_last,
                                       no_new_privs, lib, ctx)
                except BaseException as e:  # report, never unwind into the worker's code
                    try:
                        os.write(stdio[2], f"Failed to attach to the instance: {e}\n".encode(errors="replace"))
                    except BaseException:
                        pass
                finally:
                    os._exit(code)
        finally:
            if _libc.setns(own_pidns, CLONE_NEWPID) != 0:
                # The worker can't go on starting children in the container's pid namespace.
                os.write(2, b"liblxc worker: failed to restore its pid namespace\n")
                os._exit(1)
    finally:
        os.close(pidfd)
    return pid


def _fast_child(pidfd, procs, argv, env, uid, gid, cwd, stdio, tty, cap_bnd, cap_last, no_new_privs, lib,
                ctx) -> int:
    for fd in procs:
        os.write(fd, b"0")
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWCGROUP
    if _libc.setns(pidfd, flags) != 0:
        raise OSError(ctypes.get_errno(), "setns into the container's namespaces failed")
    os.setsid()
    for target, fd in enumerate(stdio):
        if fd != target:
            os.dup2(fd, target)
    if tty:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    for cap in range(cap_last + 1):
        if not cap_bnd & (1 << cap):
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"dropping capability {cap} failed")
    if no_new_privs:
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if ctx is not None and ctx.load() != 0:
        raise OSError(ctypes.get_errno(), "loading the seccomp profile failed")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.chdir(cwd or "/")
    except OSError:
        os.chdir("/")
    return _exec(argv, env)
