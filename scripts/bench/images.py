"""Test images for the benchmarks.

- busybox: the project's image builder when it is installed (lxd_daemon.imagebuilder.busybox
  .build_busybox), otherwise a minimal unified image built here from Debian's busybox-static:
  /bin/busybox with every applet linked, an /sbin/init that keeps running and exits cleanly on
  SIGPWR (what LXD and liblxc send to stop a container), metadata.yaml (x86_64, creation_date).
- big: a ~200 MB unified image whose rootfs is the busybox one plus incompressible (random) files,
  as an uncompressed tarball by default (gzip -1 on request), to measure throughput, not zlib.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
import time
from pathlib import Path

from common import MiB

REPO = Path(__file__).resolve().parents[2]
VENV_PY = REPO / ".venv" / "bin" / "python"
BUSYBOX = Path("/bin/busybox")

INIT = """#!/bin/sh
# Benchmark image init: stay up; leave cleanly on SIGPWR (stop), SIGTERM or SIGINT.
trap 'exit 0' PWR TERM INT
mkdir -p /run /tmp 2>/dev/null
while :; do sleep 3600 & wait $!; done
"""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _metadata(description: str) -> bytes:
    return (f"architecture: x86_64\ncreation_date: {int(time.time())}\nproperties:\n"
            f"  architecture: x86_64\n  os: busybox\n  release: bench\n  description: {description}\n").encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    import io

    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = mode
    ti.mtime = int(time.time())
    tar.addfile(ti, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = mode
    ti.mtime = int(time.time())
    tar.addfile(ti)


def _busybox_rootfs(tar: tarfile.TarFile) -> None:
    if not BUSYBOX.exists():
        raise RuntimeError("/bin/busybox is missing: apt-get install busybox-static")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for d in ("rootfs", "rootfs/bin", "rootfs/sbin", "rootfs/etc", "rootfs/dev", "rootfs/proc", "rootfs/sys",
              "rootfs/root", "rootfs/run", "rootfs/var", "rootfs/usr", "rootfs/usr/bin", "rootfs/usr/sbin"):
        _add_dir(tar, d, 0o700 if d == "rootfs/root" else 0o755)
    _add_dir(tar, "rootfs/tmp", 0o1777)
    ti = tar.gettarinfo(str(BUSYBOX), "rootfs/bin/busybox")
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    with open(BUSYBOX, "rb") as f:
        tar.addfile(ti, f)
    for a in applets:
        if a in ("busybox", "init"):
            continue
        ti = tarfile.TarInfo(f"rootfs/bin/{a}")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "busybox"
        ti.mode = 0o777
        tar.addfile(ti)
    _add_bytes(tar, "rootfs/sbin/init", INIT.encode(), 0o755)
    _add_bytes(tar, "rootfs/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    _add_bytes(tar, "rootfs/etc/group", b"root:x:0:\n")
    _add_bytes(tar, "rootfs/etc/hostname", b"busybox\n")


def build_busybox_own(out: Path) -> Path:
    """A unified gzip image (~1 MB) built from Debian's busybox-static."""
    with tarfile.open(out, "w:gz", compresslevel=6, format=tarfile.GNU_FORMAT) as tar:
        _add_bytes(tar, "metadata.yaml", _metadata("benchmark busybox"))
        _busybox_rootfs(tar)
    return out


def build_busybox(workdir: Path, notes: list[str]) -> Path:
    """Prefer the project's image builder; fall back to our own image (and say so)."""
    builder = REPO / ".venv" / "bin" / "lxd-imagebuilder"
    if builder.exists():
        outdir = workdir / "builder-out"
        outdir.mkdir(exist_ok=True)
        code = ("import sys\nfrom lxd_daemon.imagebuilder.busybox import build_busybox\n"
                "res = build_busybox(sys.argv[1], fmt='unified', compression='gzip')\n"
                "print([str(p) for p in res.paths][0])\n")
        r = subprocess.run([str(VENV_PY), "-c", code, str(outdir)], capture_output=True, text=True, timeout=300,
                           cwd=str(REPO))
        if r.returncode == 0 and r.stdout.strip() and Path(r.stdout.strip().splitlines()[-1]).is_file():
            path = Path(r.stdout.strip().splitlines()[-1])
            notes.append(f"busybox image from the project's image builder ({path.name})")
            return path
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        notes.append(f"project image builder not usable yet ({why[:120]}); busybox image built by the harness")
    else:
        notes.append("busybox image built by the harness from Debian's busybox-static")
    return build_busybox_own(workdir / "busybox.tar.gz")


def build_big(workdir: Path, size_mb: int = 200, compress: bool = False) -> Path:
    """A unified image of ~size_mb MB: busybox rootfs plus random 4 MiB files."""
    out = workdir / ("big.tar.gz" if compress else "big.tar")
    mode = "w:gz" if compress else "w"
    kw = {"compresslevel": 1} if compress else {}
    chunk = 4 * MiB
    with tarfile.open(out, mode, format=tarfile.GNU_FORMAT, **kw) as tar:
        _add_bytes(tar, "metadata.yaml", _metadata(f"benchmark {size_mb} MB image"))
        _busybox_rootfs(tar)
        _add_dir(tar, "rootfs/data")
        for i in range(max(1, size_mb * 1000 * 1000 // chunk)):
            _add_bytes(tar, f"rootfs/data/blob{i:03d}", os.urandom(chunk))
    return out


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path
