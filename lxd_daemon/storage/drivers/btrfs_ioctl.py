"""The two btrfs ioctls on the hot path of snapshots and copies, called directly (no `btrfs`
process: a fork and exec cost more than the snapshot itself).

- BTRFS_IOC_SNAP_CREATE_V2: snapshot a subvolume (optionally read-only) into a directory.
- BTRFS_IOC_GET_SUBVOL_ROOTREF (Linux 4.18+): the subvolumes whose parent is a given subvolume;
  used to tell, cheaply, that a subvolume has none nested in it (the common case).

Layouts from <linux/btrfs.h>. Callers run these in a thread (they block while btrfs commits).
Anything unexpected raises OSError; the driver then falls back to the `btrfs` tool.
"""

from __future__ import annotations

import fcntl
import os
import struct

_MAGIC = 0x94
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_MAGIC << 8) | nr


# struct btrfs_ioctl_vol_args_v2: s64 fd, u64 transid, u64 flags, u64 unused[4], char name[4040]
_VOL_ARGS_V2 = struct.Struct("=qQQ32s4040s")
SNAP_CREATE_V2 = _ioc(_IOC_WRITE, 23, _VOL_ARGS_V2.size)
SUBVOL_RDONLY = 1 << 1
# struct btrfs_ioctl_get_subvol_rootref_args: u64 min_treeid, {u64 treeid, u64 dirid}[255],
# u8 num_items, u8 align[7]
_ROOTREF_ARGS_SIZE = 8 + 255 * 16 + 8
GET_SUBVOL_ROOTREF = _ioc(_IOC_READ | _IOC_WRITE, 61, _ROOTREF_ARGS_SIZE)


def snapshot(src: str, dst: str, *, readonly: bool) -> None:
    """Snapshot subvolume `src` as `dst` (whose parent directory exists and is on the same btrfs)."""
    parent, name = os.path.split(dst.rstrip("/"))
    raw = name.encode()
    if not raw or len(raw) > 4039 or b"/" in raw:
        raise OSError(f"invalid snapshot name {name!r}")
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            args = bytearray(_VOL_ARGS_V2.pack(sfd, 0, SUBVOL_RDONLY if readonly else 0, b"", raw))
            fcntl.ioctl(dfd, SNAP_CREATE_V2, args)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def has_children(path: str) -> bool:
    """Whether subvolume `path` has subvolumes nested in it (at any directory depth)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(_ROOTREF_ARGS_SIZE)
        try:
            fcntl.ioctl(fd, GET_SUBVOL_ROOTREF, buf)
        except OSError as e:
            import errno

            if e.errno == errno.EOVERFLOW:  # more than one buffer of them
                return True
            raise
        return buf[8 + 255 * 16] > 0
    finally:
        os.close(fd)


# struct btrfs_ioctl_vol_args: s64 fd, char name[4088]
_VOL_ARGS = struct.Struct("=q4088s")
SNAP_DESTROY = _ioc(_IOC_WRITE, 15, _VOL_ARGS.size)


def destroy(path: str) -> None:
    """Delete subvolume `path` (read-only or not); ENOTEMPTY when subvolumes are nested in it."""
    parent, name = os.path.split(path.rstrip("/"))
    raw = name.encode()
    if not raw or len(raw) > 4087 or b"/" in raw:
        raise OSError(f"invalid subvolume name {name!r}")
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(dfd, SNAP_DESTROY, bytearray(_VOL_ARGS.pack(0, raw)))
    finally:
        os.close(dfd)
