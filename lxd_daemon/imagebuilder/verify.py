"""Boot an image's root filesystem as a throwaway unprivileged liblxc container.

``lxd-imagebuilder verify IMAGE [ROOTFS]`` unpacks the image into a scratch directory, shifts
its ownership into root's subordinate id range (/etc/subuid, /etc/subgid), starts it with
``lxc-start``, waits for the init to be up, runs ``sh -c 'ps; hostname'`` in it with
``lxc-attach``, stops it cleanly with ``lxc-stop`` (SIGPWR, no kill) and removes everything.
The tests drive the same class. It uses liblxc's own command line tools, not the daemon.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lxd_daemon.imagebuilder.pack import BuildError

MAP_SIZE = 65536


def subid_base(user: str = "root", files: tuple[str, str] = ("/etc/subuid", "/etc/subgid")) -> tuple[int, int]:
    """The first subordinate uid and gid range of ``user`` with at least 65536 ids."""
    bases = []
    for f in files:
        base = None
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f).read_text().splitlines():
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] == user and int(parts[2]) >= MAP_SIZE:
                    base = int(parts[1])
                    break
        if base is None:
            raise BuildError(f"no range of {MAP_SIZE} ids for {user} in {f} "
                             f"(add e.g. '{user}:1000000:1000000000')")
        bases.append(base)
    return bases[0], bases[1]


def shift_tree(root: Path, uid_base: int, gid_base: int) -> None:
    """Add the bases to the owner of every entry under (and including) root, once each
    (hard links share an inode: it is shifted once)."""
    seen: set[tuple[int, int]] = set()

    def shift(p: str) -> None:
        st = os.lstat(p)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
        if st.st_uid >= MAP_SIZE or st.st_gid >= MAP_SIZE:
            raise BuildError(f"{p} is owned by {st.st_uid}:{st.st_gid}, outside the {MAP_SIZE}-id map")
        mode = st.st_mode
        os.lchown(p, st.st_uid + uid_base, st.st_gid + gid_base)
        if not os.path.islink(p) and mode & 0o6000:
            os.chmod(p, mode & 0o7777)  # chown clears set-id bits; put them back

    shift(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            shift(os.path.join(dirpath, n))


def unpack_image(paths: list[Path], rootfs: Path) -> None:
    """Unpack a unified image, or a split one's rootfs, into ``rootfs`` (created)."""
    rootfs.mkdir(parents=True)
    if len(paths) == 1:
        tmp = rootfs.parent / "unpack"
        tmp.mkdir()
        _tar_extract(paths[0], tmp, members="rootfs")
        src = tmp / "rootfs"
        if not src.is_dir():
            raise BuildError(f"{paths[0]} has no rootfs/")
        os.rmdir(rootfs)
        os.rename(src, rootfs)
        shutil.rmtree(tmp)
        return
    rfs = paths[1]
    with open(rfs, "rb") as f:
        magic = f.read(4)
    if magic == b"hsqs":
        os.rmdir(rootfs)
        r = subprocess.run(["unsquashfs", "-n", "-d", str(rootfs), str(rfs)], capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"unsquashfs failed: {r.stderr.strip()}")
    else:
        _tar_extract(rfs, rootfs)


_NAME_RE = re.compile(r"\{\{\s*(?:container|instance)\.name\s*\}\}")


def apply_templates(meta_tarball: Path, rootfs: Path, name: str, trigger: str = "create") -> list[str]:
    """Render the image's templates for ``trigger`` into rootfs, as the daemon does at create.

    Only the instance name is substituted (``{{ container.name }}`` / ``{{ instance.name }}``),
    which is all the builder's templates use. Returns the paths written.
    """
    written = []
    with tarfile.open(meta_tarball) as t:
        meta = yaml.safe_load(t.extractfile("metadata.yaml")) or {}
        for target, tpl in sorted((meta.get("templates") or {}).items()):
            if trigger not in (tpl.get("when") or []):
                continue
            src = t.extractfile(f"templates/{tpl['template']}")
            if src is None:
                raise BuildError(f"template {tpl['template']} is missing from {meta_tarball}")
            text = _NAME_RE.sub(name, src.read().decode())
            dest = rootfs / target.lstrip("/")
            if dest.is_symlink() or not dest.resolve().is_relative_to(rootfs.resolve()):
                raise BuildError(f"template target {target} is a symlink or escapes the rootfs")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            written.append(target)
    return written


def _tar_extract(path: Path, dest: Path, members: str | None = None) -> None:
    if not tarfile.is_tarfile(path) and not shutil.which("tar"):
        raise BuildError(f"{path} is not a tarball")
    cmd = ["tar", "-C", str(dest), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xf", str(path)]
    if members:
        cmd.append(members)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"tar failed on {path}: {r.stderr.strip()}")


def _lxc(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise BuildError(f"{' '.join(args)} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r


@dataclass
class ScratchContainer:
    """An unprivileged liblxc container in a private lxcpath, removed by cleanup()."""

    name: str = field(default_factory=lambda: "ib" + uuid.uuid4().hex[:10])
    base: Path | None = None

    def __post_init__(self) -> None:
        # The mapped root (an unprivileged uid on the host) must be able to reach the rootfs,
        # so the scratch directory is searchable by all (0711), not 0700 like most temp dirs.
        self.base = Path(tempfile.mkdtemp(prefix=f"lxd-imagebuilder-{self.name}-", dir=self.base))
        os.chmod(self.base, 0o711)
        self.lxcpath = self.base / "lxc"
        self.dir = self.lxcpath / self.name
        self.dir.mkdir(parents=True)
        os.chmod(self.lxcpath, 0o711)
        os.chmod(self.dir, 0o711)
        self.rootfs = self.dir / "rootfs"
        self.config = self.dir / "config"
        self.log = self.dir / "lxc.log"

    # -- setup ----------------------------------------------------------------------------

    def populate_from_image(self, paths: list[Path]) -> None:
        paths = [Path(p) for p in paths]
        unpack_image(paths, self.rootfs)
        apply_templates(paths[0], self.rootfs, self.name, trigger="create")

    def prepare(self, *, hostname: str | None = None, extra_config: list[str] = ()) -> None:
        """Shift ownership into the subordinate range and write the liblxc config."""
        ub, gb = subid_base()
        shift_tree(self.rootfs, ub, gb)
        self.config.write_text("\n".join([
            f"lxc.uts.name = {hostname or self.name}",
            f"lxc.rootfs.path = dir:{self.rootfs}",
            f"lxc.idmap = u 0 {ub} {MAP_SIZE}",
            f"lxc.idmap = g 0 {gb} {MAP_SIZE}",
            "lxc.mount.auto = proc:mixed sys:mixed cgroup:mixed",
            "lxc.autodev = 1",
            "lxc.net.0.type = empty",
            "lxc.tty.max = 0",
            "lxc.pty.max = 16",
            f"lxc.log.file = {self.log}",
            "lxc.log.level = info",
            f"lxc.console.logfile = {self.dir / 'console.log'}",
            *extra_config,
            "",
        ]))

    # -- lifecycle ------------------------------------------------------------------------

    def _args(self) -> list[str]:
        return ["-n", self.name, "-P", str(self.lxcpath)]

    def start(self) -> None:
        r = _lxc("lxc-start", *self._args(), "-f", str(self.config), check=False)
        if r.returncode != 0:
            raise BuildError(f"lxc-start failed: {(r.stderr or r.stdout).strip()}\n{self.log_tail()}")

    def state(self) -> str:
        r = _lxc("lxc-info", *self._args(), "-s", "-H", check=False)
        return r.stdout.strip() or "UNKNOWN"

    def init_pid(self) -> int:
        r = _lxc("lxc-info", *self._args(), "-p", "-H", check=False)
        return int(r.stdout.strip()) if r.stdout.strip().isdigit() else 0

    def wait_state(self, state: str, timeout: float) -> bool:
        r = _lxc("lxc-wait", *self._args(), "-s", state, "-t", str(int(max(1, timeout))), check=False,
                 timeout=timeout + 10)
        return r.returncode == 0

    def attach(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return _lxc("lxc-attach", *self._args(), "--clear-env",
                    "--set-var", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "--", *cmd,
                    timeout=timeout, check=False)

    def stop(self, timeout: int = 10, *, kill: bool = False) -> float:
        """Stop cleanly (SIGPWR, no SIGKILL fallback) and return the seconds it took."""
        t0 = time.monotonic()
        if kill:
            _lxc("lxc-stop", *self._args(), "-k", check=False)
        else:
            r = _lxc("lxc-stop", *self._args(), "--nokill", "-t", str(timeout), check=False,
                     timeout=timeout + 10)
            if r.returncode != 0:
                raise BuildError(f"lxc-stop did not stop {self.name} cleanly within {timeout}s: "
                                 f"{(r.stderr or r.stdout).strip()}")
        return time.monotonic() - t0

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.state() not in ("STOPPED", "UNKNOWN"):
                _lxc("lxc-stop", *self._args(), "-k", check=False)
                self.wait_state("STOPPED", 10)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ScratchContainer:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


@dataclass
class VerifyReport:
    start_seconds: float
    ready_seconds: float
    stop_seconds: float
    ps: str
    hostname: str


def verify_image(paths: list[Path], *, ready_timeout: float = 60, stop_timeout: int = 30,
                 log=None) -> VerifyReport:
    """Boot the image, check ``ps`` and ``hostname`` inside, stop it cleanly (see module doc)."""
    with ScratchContainer() as c:
        tu = time.monotonic()
        c.populate_from_image(paths)
        c.prepare()
        t0 = time.monotonic()
        if log:
            log.write(f"unpacked and id-shifted in {t0 - tu:.2f}s\n")
        c.start()
        if not c.wait_state("RUNNING", 10):
            raise BuildError(f"container did not reach RUNNING:\n{c.log_tail()}")
        t_start = time.monotonic() - t0
        # Ready: attach works and, for sysvinit, the default runlevel is reached.
        deadline = time.monotonic() + ready_timeout
        while True:
            r = c.attach("sh", "-c", "if command -v runlevel >/dev/null; then runlevel; else echo N 2; fi")
            if r.returncode == 0 and r.stdout.split()[-1:] not in (["unknown"], ["S"]):
                break
            if time.monotonic() > deadline:
                raise BuildError(f"init did not come up in {ready_timeout}s: {r.stdout}{r.stderr}")
            time.sleep(0.2)
        t_ready = time.monotonic() - t0
        r = c.attach("sh", "-c", "ps; hostname")
        if r.returncode != 0:
            raise BuildError(f"lxc-attach sh -c 'ps; hostname' failed: {r.stderr.strip()}")
        lines = r.stdout.strip().splitlines()
        host = lines[-1] if lines else ""
        if host != c.name:
            raise BuildError(f"hostname in the container is {host!r}, expected {c.name!r}")
        if log:
            log.write(r.stdout)
        t_stop = c.stop(stop_timeout)
        return VerifyReport(t_start, t_ready, t_stop, "\n".join(lines[:-1]), host)
