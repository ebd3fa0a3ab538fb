"""Build a unified image tarball from an instance's (frozen) root filesystem. Blocking: run in a thread.

The tarball holds `metadata.yaml` (the instance's own, or one generated from the architecture, the
time and the properties), `templates/` when the instance has them, and `rootfs/` with every owner
mapped back from host ids to container ids (host id - shift). Entries whose owner lies outside the
instance's map are left out. GNU tar writes the archive (with --owner-map/--group-map for the
un-shift) and compresses it; Python hashes the output as it is written.
"""

from __future__ import annotations

import hashlib
import os
import platform
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.images.formats import normalise_architecture

COMPRESSORS = {
    "gzip": ["--gzip"], "bzip2": ["--bzip2"], "xz": ["--xz"], "lzma": ["--lzma"], "zstd": ["--zstd"],
    "none": [],
}
CHECKPOINT_RECORDS = 1000  # tar records of 10 KiB: a progress tick every ~10 MB of archive
ID_RANGE = 1 << 32


@dataclass
class Built:
    path: Path
    fingerprint: str
    size: int
    metadata: dict


def _host_arch() -> str:
    try:
        return normalise_architecture(platform.machine())
    except BadRequest:
        return platform.machine()


def make_metadata(metadata_dir: Path | None, properties: dict[str, str] | None) -> dict:
    doc: dict = {}
    src = metadata_dir / "metadata.yaml" if metadata_dir else None
    if src is not None and src.is_file():
        try:
            loaded = yaml.safe_load(src.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise BadRequest(f"The instance's metadata.yaml is invalid: {e}") from None
        if isinstance(loaded, dict):
            doc = loaded
    doc["architecture"] = doc.get("architecture") or _host_arch()
    doc["creation_date"] = int(time.time())
    if properties is not None:
        doc["properties"] = dict(properties)
    doc.setdefault("properties", {})
    return doc


def _scan_ids(rootfs: Path, uid_shift: int, gid_shift: int) -> tuple[set[int], set[int], list[str], int]:
    """Owners present under rootfs, the entries outside the map (relative paths), total bytes."""
    uids: set[int] = set()
    gids: set[int] = set()
    outside: list[str] = []
    total = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(rootfs / rel if rel else rootfs) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                r = f"{rel}/{e.name}" if rel else e.name
                if not (0 <= st.st_uid - uid_shift < ID_RANGE and 0 <= st.st_gid - gid_shift < ID_RANGE):
                    outside.append(r)
                    continue
                uids.add(st.st_uid)
                gids.add(st.st_gid)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(r)
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return uids, gids, outside, total


def build_image(src, workdir: Path, *, compression: str, properties: dict[str, str] | None,
                progress: Callable[[int, int, float], None] | None = None) -> Built:
    if compression not in COMPRESSORS:
        raise BadRequest(f"Unsupported compression algorithm {compression!r} for publishing "
                         f"(use one of {', '.join(sorted(COMPRESSORS))})")
    rootfs = Path(src.rootfs)
    if not rootfs.is_dir():
        raise BadRequest("The instance has no root filesystem to publish")
    metadata_dir = Path(src.metadata_dir) if getattr(src, "metadata_dir", None) else None
    uid_shift, gid_shift = int(getattr(src, "uid_shift", 0)), int(getattr(src, "gid_shift", 0))
    meta = make_metadata(metadata_dir, properties)
    staging = workdir / "staging"
    staging.mkdir()
    (staging / "metadata.yaml").write_text(yaml.safe_dump(meta, default_flow_style=False))
    uids, gids, outside, total = _scan_ids(rootfs, uid_shift, gid_shift)

    cmd = ["tar", "-c", "-f", "-", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse",
           f"--checkpoint={CHECKPOINT_RECORDS}", "--checkpoint-action=echo=%u", *COMPRESSORS[compression]]
    if uid_shift or gid_shift:
        (workdir / "uidmap").write_text("".join(f"+{u} +{u - uid_shift}\n" for u in sorted(uids)))
        (workdir / "gidmap").write_text("".join(f"+{g} +{g - gid_shift}\n" for g in sorted(gids)))
        cmd += [f"--owner-map={workdir / 'uidmap'}", f"--group-map={workdir / 'gidmap'}"]
    cmd += ["-C", str(staging), "metadata.yaml"]
    if metadata_dir is not None and (metadata_dir / "templates").is_dir():
        cmd += ["-C", str(metadata_dir), "templates"]
    if outside:
        (workdir / "exclude").write_text("".join(f"{rootfs.name}/{p}\n" for p in outside))
        cmd += ["--anchored", "--no-wildcards", f"--exclude-from={workdir / 'exclude'}"]
    if rootfs.name != "rootfs":
        cmd.append(f"--transform=s,^{_sed_escape(rootfs.name)}\\(/\\|$\\),rootfs\\1,S")
    cmd += ["-C", str(rootfs.parent), rootfs.name]

    out = workdir / "image"
    hasher = hashlib.sha256()
    size = 0
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            text = line.decode(errors="replace").strip()
            if text.isdigit():
                done = min(int(text) * CHECKPOINT_RECORDS * 10240, total)
                if progress is not None:
                    progress(done, total, done / max(time.monotonic() - start, 1e-6))
            elif text:
                errors.append(text)

    t = threading.Thread(target=read_stderr, daemon=True)
    t.start()
    try:
        with open(out, "wb") as f:
            while True:
                chunk = proc.stdout.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
    finally:
        proc.stdout.close()
        rc = proc.wait()
        t.join(5)
    # tar exits 1 when a file changed while it was read; the instance is frozen, so treat it as fatal too.
    if rc != 0:
        raise LXDError(f"Failed to pack the instance: {errors[-1] if errors else f'tar exited {rc}'}")
    return Built(path=out, fingerprint=hasher.hexdigest(), size=size, metadata={
        "architecture": normalise_architecture(meta["architecture"]),
        "creation_date": meta["creation_date"],
        "expiry_date": int(meta.get("expiry_date") or 0),
        "properties": {str(k): str(v) for k, v in (meta.get("properties") or {}).items()},
    })


def _sed_escape(s: str) -> str:
    return "".join("\\" + c if c in ".[]*^$\\,/" else c for c in s)
