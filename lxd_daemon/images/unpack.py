"""Unpack a stored image into an instance directory: dest/rootfs, dest/metadata.yaml, dest/templates.

Blocking; run in a thread. Images were checked on import (formats.py), and GNU tar refuses `..`
and absolute member names on its own as a second line of defence. tar (C) extracts much faster than
Python's tarfile (see tests/unit/test_images_unpack.py for the measurement), so extraction is a tar
or unsquashfs subprocess followed, for an id shift, by one lchown pass that restores the set-id
bits and file capabilities the kernel drops on chown. Device nodes are removed from rootfs/dev:
unprivileged containers get /dev from liblxc and must not keep host device nodes.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.images.formats import parse_metadata
from lxd_daemon.util import gz

TAR_FLAGS = ["--numeric-owner", "--same-owner", "--preserve-permissions", "--xattrs",
             "--xattrs-include=*", "--no-overwrite-dir", "--delay-directory-restore"]


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip().splitlines()
        raise LXDError(f"Failed to unpack the image ({cmd[0]}): {msg[-1] if msg else r.returncode}")


def _untar(archive: Path, dest: Path) -> None:
    if gz.available() and gz.is_gzip(archive):
        # Inflated here with ISA-L while tar writes the files: about half the time of tar -z.
        argv = ["tar", "-x", "-f", "-", "-C", str(dest), *TAR_FLAGS]
        try:
            rc, err = gz.inflate_into(archive, argv)
        except gz.CorruptGzip as e:
            raise LXDError(f"Failed to unpack the image (gzip): {e}") from None
        if rc != 0:
            msg = err.decode(errors="replace").strip().splitlines()
            raise LXDError(f"Failed to unpack the image (tar): {msg[-1] if msg else rc}")
        return
    _run(["tar", "-x", "-f", str(archive), "-C", str(dest), *TAR_FLAGS])


def remove_devices(rootfs: Path) -> None:
    dev = rootfs / "dev"
    if not dev.is_dir() or dev.is_symlink():
        return
    for dirpath, _dirs, files in os.walk(dev):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                os.unlink(p)


def shift_ids(root: Path, uid_shift: int, gid_shift: int) -> int:
    """Add the shifts to the owner of every entry under root (not following symlinks)."""
    if not uid_shift and not gid_shift:
        return 0
    count = 0
    stack = [str(root)]
    lchown, chmod, getxattr, setxattr = os.lchown, os.chmod, os.getxattr, os.setxattr
    while stack:
        top = stack.pop()
        st = os.lstat(top)
        entries = [(top, st)]
        with os.scandir(top) as it:
            for e in it:
                est = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(est.st_mode):
                    stack.append(e.path)
                else:
                    entries.append((e.path, est))
        for path, est in entries:
            mode = est.st_mode
            caps = None
            if stat.S_ISREG(mode) and mode & 0o111:
                try:
                    caps = getxattr(path, "security.capability", follow_symlinks=False)
                except OSError:
                    caps = None
            lchown(path, est.st_uid + uid_shift, est.st_gid + gid_shift)
            if not stat.S_ISLNK(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                chmod(path, stat.S_IMODE(mode))
            if caps is not None:
                try:
                    setxattr(path, "security.capability", caps, follow_symlinks=False)
                except OSError:
                    pass
            count += 1
    return count


def unpack(image: Path, rootfs_file: Path | None, rootfs_format: str, dest: Path, *,
           uid_shift: int = 0, gid_shift: int = 0) -> dict:
    """Unpack into dest (created; must not hold a rootfs yet). Returns the parsed metadata.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    rootfs = dest / "rootfs"
    if rootfs.exists() and any(rootfs.iterdir()):
        raise BadRequest(f"Can't unpack the image: {rootfs} is not empty")
    rootfs.mkdir(exist_ok=True)
    try:
        if rootfs_file is None:
            _untar(image, dest)
        else:
            _untar(image, dest)
            if rootfs_format == "squashfs":
                _run(["unsquashfs", "-f", "-n", "-d", str(rootfs), str(rootfs_file)])
            else:
                _untar(rootfs_file, rootfs)
        os.chmod(rootfs, 0o755)
        remove_devices(rootfs)
        shift_ids(rootfs, uid_shift, gid_shift)
        meta_path = dest / "metadata.yaml"
        if not meta_path.is_file() or meta_path.is_symlink():
            raise BadRequest("Invalid image: the tarball is missing metadata.yaml")
        return parse_metadata(meta_path.read_bytes())
    except BaseException:
        shutil.rmtree(rootfs, ignore_errors=True)
        raise
