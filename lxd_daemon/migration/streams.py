"""Driver-native migration streams over a Channel, framed as LXD frames them (API.md §15).

- A tool's stdout into the channel (`btrfs send`, `zfs send`) as binary frames, ended by the
  barrier; a tool's stdin fed from the channel up to the barrier (`btrfs receive`, `zfs receive`).
  Both run through the storage tools runner (storage/drivers/tools.py), so tests can record them.
- btrfs (`fs: BTRFS`): with the `migration_header` feature the source first sends the header
  `{"subvolumes": [{"path", "snapshot", "readonly", "uuid"}...]}` (JSON then a barrier), then one
  `btrfs send [-p PARENT] SUBVOL` stream per subvolume: every snapshot oldest first, then the
  volume, each followed by its nested subvolumes when `header_subvolumes` was agreed (without it
  a volume with nested subvolumes can't go this way). Without the header the receiver expects
  one stream per snapshot, then the volume.
- zfs (`fs: ZFS`): the command lines (`zfs send [-c -L] [-i PARENT] DATASET@SNAP`,
  `zfs receive [-x mountpoint] -F -u DATASET`), one stream per snapshot then the volume.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lxd_daemon.migration.wire import Channel, MigrationError

Progress = Callable[[int, float], None]  # (bytes so far, bytes per second)

# LXD's btrfs/zfs feature names (btrfsFeatures / zfsFeatures in the header).
BTRFS_MIGRATION_HEADER = "migration_header"
BTRFS_SUBVOLUMES = "header_subvolumes"
BTRFS_SUBVOLUME_UUIDS = "header_subvolume_uuids"
ZFS_COMPRESS = "compress"
ZFS_MIGRATION_HEADER = "migration_header"
ZFS_HEADER_ZVOLS = "header_zvols"


# -- a tool's streams over the channel ---------------------------------------------------------

class _Meter:
    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.total = progress, 0
        self.start = self.last = asyncio.get_running_loop().time()

    def add(self, n: int, final: bool = False) -> None:
        self.total += n
        now = asyncio.get_running_loop().time()
        if self.progress is not None and (final or now - self.last >= 1.0):
            self.last = now
            try:
                self.progress(self.total, self.total / max(now - self.start, 1e-3))
            except Exception:
                pass


async def send_command(argv: list[str], channel: Channel, *, progress: Progress | None = None) -> None:
    """Run `argv`; its stdout goes over the channel, then the barrier. MigrationError when the
    tool fails (its stderr in the message) or the channel breaks."""
    from lxd_daemon.storage.drivers import tools

    meter = _Meter(progress)

    async def sink(chunk: bytes) -> None:
        await channel.send(chunk)
        meter.add(len(chunk))

    try:
        await tools.run_stream(*argv, sink=sink)
    except tools.ToolError as e:
        raise MigrationError(f"Failed sending {_what(argv)}: {e.message}") from None
    meter.add(0, final=True)
    await channel.send_barrier()


async def channel_chunks(channel: Channel, meter: _Meter | None = None, *,
                         what: str = "stream") -> AsyncIterator[bytes]:
    """The binary frames of the channel up to the barrier; MigrationError when it closes first."""
    while True:
        data = await channel.recv()
        if data is None:
            if channel.closed:
                raise MigrationError(f"The connection closed in the middle of the {what}")
            return
        if meter is not None:
            meter.add(len(data))
        yield data


async def receive_command(argv: list[str], channel: Channel, *, progress: Progress | None = None) -> None:
    """Run `argv` with stdin fed from the channel up to the barrier."""
    from lxd_daemon.storage.drivers import tools

    meter = _Meter(progress)
    failed: list[MigrationError] = []

    async def source() -> AsyncIterator[bytes]:
        try:
            async for chunk in channel_chunks(channel, meter, what=_what(argv)):
                yield chunk
        except MigrationError as e:
            failed.append(e)  # the tool sees its stdin end early; this error is the one to report

    try:
        await tools.run_stream(*argv, source=source())
    except tools.ToolError as e:
        if failed:
            raise failed[0] from None
        raise MigrationError(f"Failed receiving {_what(argv)}: {e.message}") from None
    if failed:
        raise failed[0]
    meter.add(0, final=True)


def _what(argv: list[str]) -> str:
    return " ".join(argv[:2]) + " stream"


# -- btrfs ---------------------------------------------------------------------------------

def btrfs_send_args(subvolume: Path, parent: Path | None = None) -> list[str]:
    return ["btrfs", "send", "-q", *(["-p", str(parent)] if parent is not None else []), str(subvolume)]


def btrfs_receive_args(directory: Path) -> list[str]:
    return ["btrfs", "receive", "-e", str(directory)]


async def btrfs_send(subvolume: Path, channel: Channel, *, parent: Path | None = None,
                     progress: Progress | None = None) -> None:
    """One read-only subvolume (incremental against read-only `parent`), then the barrier."""
    await send_command(btrfs_send_args(subvolume, parent), channel, progress=progress)


async def btrfs_receive(directory: Path, channel: Channel, *, progress: Progress | None = None) -> Path:
    """Receive one subvolume into `directory` (which must hold nothing else); its path."""
    before = set(await asyncio.to_thread(_listdir, directory))
    await receive_command(btrfs_receive_args(directory), channel, progress=progress)
    new = sorted(set(await asyncio.to_thread(_listdir, directory)) - before)
    if len(new) != 1:
        raise MigrationError(f"The btrfs stream did not hold one subvolume (got {len(new)})")
    return directory / new[0]


def _listdir(p: Path) -> list[str]:
    return sorted(e.name for e in p.iterdir())


@dataclass
class BtrfsSubvolume:
    """One entry of LXD's btrfs migration header: `path` inside the volume ("/" is the volume),
    the snapshot it belongs to ("" for the volume itself), whether it is read-only, its UUID."""

    path: str = "/"
    snapshot: str = ""
    readonly: bool = False
    uuid: str = ""


def btrfs_header(subvolumes: list[BtrfsSubvolume]) -> dict:
    return {"subvolumes": [asdict(s) for s in subvolumes]}


def parse_btrfs_header(obj: object) -> list[BtrfsSubvolume]:
    try:
        items = obj["subvolumes"] or []  # type: ignore[index]
        out = []
        for it in items:
            sv = BtrfsSubvolume(path=str(it.get("path") or "/"), snapshot=str(it.get("snapshot") or ""),
                                readonly=bool(it.get("readonly")), uuid=str(it.get("uuid") or ""))
            if not sv.path.startswith("/") or ".." in sv.path.split("/") or "/" in sv.snapshot:
                raise ValueError(f"bad subvolume entry {it!r}")
            out.append(sv)
        return out
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise MigrationError(f"Invalid btrfs migration header: {e}") from None


def default_btrfs_subvolumes(snapshots: list[str]) -> list[BtrfsSubvolume]:
    """What a source without the migration header sends: each snapshot, then the volume."""
    return [BtrfsSubvolume("/", s, True) for s in snapshots] + [BtrfsSubvolume("/", "", False)]


async def send_btrfs_volume(driver, vol, snapshots: list[str], channel: Channel, features: list[str], *,
                            progress: Callable[[str], Progress | None] | None = None) -> None:
    """Send `vol` of a BtrfsDriver with `snapshots` (oldest first) as LXD's btrfs migration does.
    `features` are the agreed btrfsFeatures names; `progress(name)` gives a callback per stream."""
    frozen = await driver._frozen(vol)
    try:
        header, sends = await driver._plan(vol, snapshots, frozen)
        subvols = [BtrfsSubvolume(path=s["path"], snapshot=s["snapshot"], readonly=bool(s["readonly"]))
                   for s in header["subvolumes"]]
        nested = [s for s in subvols if s.path != "/"]
        with_header = BTRFS_MIGRATION_HEADER in features
        if nested and not (with_header and BTRFS_SUBVOLUMES in features):
            raise MigrationError("Subvolumes detected in source but target does not support receiving subvolumes")
        if with_header:
            await channel.send_json(btrfs_header(subvols))
        for sv, (_, argv) in zip(subvols, sends, strict=True):
            label = f"{vol.name}/{sv.snapshot}" if sv.snapshot else vol.name
            await send_command(argv, channel, progress=progress(label) if progress else None)
    finally:
        await driver._drop_frozen(frozen)


async def receive_btrfs_volume(driver, vol, snapshots: list[str], channel: Channel, features: list[str], *,
                               progress: Callable[[str], Progress | None] | None = None) -> None:
    """Create `vol` (and `snapshots`, oldest first) on a BtrfsDriver from what send_btrfs_volume
    (or LXD) sends. Nothing is left behind on failure."""
    from lxd_daemon.errors import LXDError

    if BTRFS_MIGRATION_HEADER in features:
        subvols = parse_btrfs_header(await channel.recv_json())
    else:
        subvols = default_btrfs_subvolumes(snapshots)
    names = {s.snapshot for s in subvols if s.snapshot}
    if names - set(snapshots) or set(snapshots) - names:
        raise MigrationError(f"The btrfs migration header names snapshots {sorted(names)}, "
                             f"expected {sorted(snapshots)}")
    # LXD orders the header as it sends: snapshots oldest first, then the volume; within each,
    # "/" before its nested subvolumes.
    items = [(s.snapshot, s.path, s.readonly, f"{s.snapshot or vol.name}:{s.path}") for s in subvols]

    async def receive(idx: int, label: str, into: Path) -> None:
        name = subvols[idx].snapshot
        cb = progress(f"{vol.name}/{name}" if name else vol.name) if progress else None
        await receive_command(btrfs_receive_args(into), channel, progress=cb)

    try:
        await driver._receive_all(vol, snapshots, items, receive)
    except LXDError as e:
        raise MigrationError(e.message) from None


# -- zfs -----------------------------------------------------------------------------------

def zfs_send_args(snapshot: str, parent: str | None = None, *, compress: bool = False) -> list[str]:
    """`zfs send [-c -L] [-i PARENT] DATASET@SNAP` (`compress`: the agreed zfs `compress` feature)."""
    return ["zfs", "send", *(["-c", "-L"] if compress else []), *(["-i", parent] if parent else []), snapshot]


def zfs_receive_args(dataset: str, *, block: bool = False) -> list[str]:
    """`zfs receive -x mountpoint -F -u DATASET` (a block volume keeps every property)."""
    return ["zfs", "receive", *([] if block else ["-x", "mountpoint"]), "-F", "-u", dataset]


async def zfs_send(snapshot: str, channel: Channel, *, parent: str | None = None, compress: bool = False,
                   progress: Progress | None = None) -> None:
    await send_command(zfs_send_args(snapshot, parent, compress=compress), channel, progress=progress)


async def zfs_receive(dataset: str, channel: Channel, *, block: bool = False, progress: Progress | None = None) -> None:
    await receive_command(zfs_receive_args(dataset, block=block), channel, progress=progress)


def features_of(msg) -> list[str]:
    """The set feature names of a btrfsFeatures/zfsFeatures/rsyncFeatures message."""
    if msg is None:
        return []
    return [f.name for f, v in msg.ListFields() if v is True]

