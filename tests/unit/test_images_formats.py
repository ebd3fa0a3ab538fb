"""Image formats: compression by magic, metadata.yaml, and the safety scan of tarballs."""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.images import formats, tarscan

META = b"architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  os: busybox\n  release: '1'\n"


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", *, type=tarfile.REGTYPE, linkname: str = "",
        mode: int = 0o644, uid: int = 0, gid: int = 0, devmajor: int = 0, devminor: int = 0) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.linkname = linkname
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = int(time.time())
    ti.devmajor, ti.devminor = devmajor, devminor
    if type == tarfile.REGTYPE:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)


def make_image(path: Path, *, compression: str = "gz", meta: bytes | None = META, extra=(),
               rootfs: bool = True) -> Path:
    """A tiny unified image: metadata.yaml, rootfs/ with a couple of files, plus `extra` entries."""
    mode = {"gz": "w:gz", "xz": "w:xz", "bz2": "w:bz2", "none": "w"}[compression]
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        if meta is not None:
            add(tf, "metadata.yaml", meta)
        if rootfs:
            add(tf, "rootfs", type=tarfile.DIRTYPE, mode=0o755)
            add(tf, "rootfs/bin", type=tarfile.DIRTYPE, mode=0o755)
            add(tf, "rootfs/bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755)
            add(tf, "rootfs/bin/sh", type=tarfile.SYMTYPE, linkname="/bin/hello")
            add(tf, "rootfs/etc", type=tarfile.DIRTYPE, mode=0o755)
            add(tf, "rootfs/etc/hostname", b"test\n", uid=1000, gid=1000)
            add(tf, "templates", type=tarfile.DIRTYPE, mode=0o755)
            add(tf, "templates/hostname.tpl", b"{{ container.name }}\n")
        for kw in extra:
            add(tf, **kw)
    return path


def scan(path: Path, kind: str = "unified") -> tarscan.ScanResult:
    return tarscan.scan_tarball(path, formats.detect_file(path), kind)


@pytest.mark.parametrize("comp,name", [("gz", "gzip"), ("xz", "xz"), ("bz2", "bzip2"), ("none", "none")])
def test_detects_compression_by_magic_not_name(tmp_path, comp, name):
    p = make_image(tmp_path / "image.bin", compression=comp)
    assert formats.detect_file(p) == name
    result = scan(p)
    assert result.metadata["architecture"] == "x86_64"
    assert result.metadata["properties"] == {"os": "busybox", "release": "1"}
    assert result.has_rootfs
    assert "hostname.tpl" in result.templates


def test_zstd_image_scans(tmp_path):
    plain = make_image(tmp_path / "image.tar", compression="none")
    subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "image.zst")], check=True)
    p = tmp_path / "image.zst"
    assert formats.detect_file(p) == "zstd"
    assert scan(p).metadata["creation_date"] == 1700000000


def test_unknown_compression_is_refused(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 600)
    with pytest.raises(BadRequest, match="Unsupported image format"):
        formats.detect_file(p)


def test_truncated_tarball_is_refused(tmp_path):
    p = make_image(tmp_path / "image.tar.xz", compression="xz", extra=[
        {"name": "rootfs/big", "data": bytes(range(256)) * 4096}])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadRequest, match="truncated or corrupt"):
        scan(p)


def test_missing_metadata_is_refused(tmp_path):
    p = make_image(tmp_path / "image.tar.gz", meta=None)
    with pytest.raises(BadRequest, match="missing metadata.yaml"):
        scan(p)


@pytest.mark.parametrize("meta,msg", [
    (b"creation_date: 1\n", "missing architecture"),
    (b"architecture: x86_64\n", "missing creation date"),
    (b"architecture: vax\ncreation_date: 1\n", "unknown architecture"),
    (b"architecture: [\n", "not valid YAML"),
    (b"- a\n", "must be a mapping"),
])
def test_bad_metadata_is_refused(tmp_path, meta, msg):
    p = make_image(tmp_path / "image.tar.gz", meta=meta)
    with pytest.raises(BadRequest, match=msg):
        scan(p)


def test_metadata_architecture_aliases_normalise():
    assert formats.parse_metadata(b"architecture: amd64\ncreation_date: 5\n")["architecture"] == "x86_64"
    assert formats.parse_metadata(b"architecture: arm64\ncreation_date: 5\n")["architecture"] == "aarch64"


@pytest.mark.parametrize("entry,msg", [
    ({"name": "../evil", "data": b"x"}, "outside the target"),
    ({"name": "rootfs/../../evil", "data": b"x"}, "outside the target"),
    ({"name": "/../etc/evil", "data": b"x"}, "outside the target"),  # a leading / is stripped, .. still refused
    ({"name": "rootfs/up", "type": tarfile.SYMTYPE, "linkname": "../../../etc"}, "points outside"),
    ({"name": "rootfs/etc/up", "type": tarfile.SYMTYPE, "linkname": "../../x"}, "points outside"),
    ({"name": "templates/t", "type": tarfile.SYMTYPE, "linkname": "/etc/shadow"}, "points outside"),
    ({"name": "rootfs/hl", "type": tarfile.LNKTYPE, "linkname": "../etc/passwd"}, "outside"),
    ({"name": "rootfs/hl", "type": tarfile.LNKTYPE, "linkname": "/etc/passwd"}, "outside the image"),
    ({"name": "rootfs/hl", "type": tarfile.LNKTYPE, "linkname": "metadata.yaml"}, "outside the image"),
    ({"name": "rootfs/hl", "type": tarfile.LNKTYPE, "linkname": "rootfs/not-yet"}, "outside the image"),
    ({"name": "rootfs/sda", "type": tarfile.BLKTYPE, "devmajor": 8}, "device node"),
    ({"name": "rootfs/etc/mem", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 1}, "device node"),
])
def test_unsafe_members_are_refused(tmp_path, entry, msg):
    p = make_image(tmp_path / "image.tar.gz", extra=[entry])
    with pytest.raises(BadRequest, match=msg):
        scan(p)


def test_writing_through_a_symlink_is_refused(tmp_path):
    # An absolute symlink is fine inside the container, but nothing may be written through it.
    p = make_image(tmp_path / "image.tar.gz", extra=[
        {"name": "rootfs/hostetc", "type": tarfile.SYMTYPE, "linkname": "/etc"},
        {"name": "rootfs/hostetc/passwd", "data": b"root::0:0::/:/bin/sh\n"},
    ])
    with pytest.raises(BadRequest, match="lies under a symlink"):
        scan(p)


def test_safe_links_and_dev_nodes_are_accepted(tmp_path):
    p = make_image(tmp_path / "image.tar.gz", extra=[
        {"name": "rootfs/dev", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "rootfs/dev/null", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3},
        {"name": "rootfs/dev/fifo", "type": tarfile.FIFOTYPE},
        {"name": "rootfs/bin/rel", "type": tarfile.SYMTYPE, "linkname": "../etc/hostname"},
        {"name": "rootfs/bin/abs", "type": tarfile.SYMTYPE, "linkname": "/proc/self/fd"},
        {"name": "rootfs/bin/hard", "type": tarfile.LNKTYPE, "linkname": "rootfs/bin/hello"},
        {"name": "./rootfs/./bin//dotted", "data": b"ok"},
    ])
    assert scan(p).members > 10


def test_split_rootfs_tarball_rules(tmp_path):
    p = tmp_path / "rootfs.tar"
    with tarfile.open(p, "w") as tf:
        add(tf, "bin", type=tarfile.DIRTYPE)
        add(tf, "bin/x", b"x")
        add(tf, "dev", type=tarfile.DIRTYPE)
        add(tf, "dev/zero", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        add(tf, "bin/up", type=tarfile.SYMTYPE, linkname="../../x")
    with pytest.raises(BadRequest, match="points outside"):
        scan(p, "rootfs")


def test_squashfs_scan(tmp_path):
    src = tmp_path / "src"
    (src / "dev").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "bin" / "x").write_text("x")
    subprocess.run(["mknod", str(src / "dev" / "null"), "c", "1", "3"], check=True)
    sq = tmp_path / "ok.squashfs"
    subprocess.run(["mksquashfs", str(src), str(sq), "-quiet", "-noappend", "-no-progress"], check=True,
                   capture_output=True)
    assert formats.detect_file(sq) == "squashfs"
    assert tarscan.scan_squashfs(sq).members >= 4
    subprocess.run(["mknod", str(src / "bin" / "mem"), "c", "1", "1"], check=True)
    bad = tmp_path / "bad.squashfs"
    subprocess.run(["mksquashfs", str(src), str(bad), "-quiet", "-noappend", "-no-progress"], check=True,
                   capture_output=True)
    with pytest.raises(BadRequest, match="device node '/bin/mem'"):
        tarscan.scan_squashfs(bad)
    junk = tmp_path / "junk.squashfs"
    junk.write_bytes(b"hsqs" + b"\0" * 100)
    with pytest.raises(BadRequest, match="unreadable squashfs"):
        tarscan.scan_squashfs(junk)
