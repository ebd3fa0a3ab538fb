"""Image tarballs as other tools write them: member names with a leading "/" ("/rootfs/etc/inittab",
"/metadata.yaml") are imported with the "/" stripped, as LXD does, by the streaming scanner, the
file scanner and the unpacker; anything that would still land outside the image is refused."""

from __future__ import annotations

import os
import tarfile

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.images import formats, tarscan
from lxd_daemon.images.unpack import unpack
from tests.unit.test_images_formats import META, add

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")


def absolute_image(path, *, extra=(), split_rootfs=False, mode="w:gz"):
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        add(tf, "/metadata.yaml", META)
        prefix = "/" if split_rootfs else "/rootfs/"
        if not split_rootfs:
            add(tf, "/rootfs", type=tarfile.DIRTYPE, mode=0o755)
        add(tf, prefix + "etc", type=tarfile.DIRTYPE, mode=0o755)
        add(tf, prefix + "etc/inittab", b"::sysinit:/bin/true\n")
        add(tf, prefix + "bin", type=tarfile.DIRTYPE, mode=0o755)
        add(tf, prefix + "bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755)
        add(tf, prefix + "bin/hello2", type=tarfile.LNKTYPE, linkname=prefix + "bin/hello")
        add(tf, prefix + "bin/sh", type=tarfile.SYMTYPE, linkname="/bin/hello")
        add(tf, "//templates", type=tarfile.DIRTYPE, mode=0o755)
        add(tf, "/templates/hostname.tpl", b"{{ container.name }}\n")
        for kw in extra:
            add(tf, **kw)
    return path


def stream_scan(path, compression, kind="unified"):
    scan = tarscan.StreamScan(compression, kind)
    data = path.read_bytes()
    for i in range(0, len(data), 1000):
        scan.feed(data[i:i + 1000])
    return scan.finish()


def test_leading_slash_members_are_accepted_by_both_scanners(tmp_path):
    p = absolute_image(tmp_path / "image.tar.gz")
    for result in (tarscan.scan_tarball(p, formats.detect_file(p), "unified"), stream_scan(p, "gzip")):
        assert result.metadata["architecture"] == "x86_64"
        assert result.has_rootfs
        assert result.templates == {"hostname.tpl"}


@pytest.mark.parametrize("entry,msg", [
    ({"name": "/../evil", "data": b"x"}, "outside the target"),
    ({"name": "/rootfs/../../evil", "data": b"x"}, "outside the target"),
    ({"name": "/rootfs/hl", "type": tarfile.LNKTYPE, "linkname": "/etc/passwd"}, "outside the image"),
    ({"name": "/rootfs/hl", "type": tarfile.LNKTYPE, "linkname": "/../rootfs/bin/hello"}, "outside"),
    ({"name": "/rootfs/up", "type": tarfile.SYMTYPE, "linkname": "../../../etc"}, "points outside"),
    ({"name": "/templates/t", "type": tarfile.SYMTYPE, "linkname": "/etc/shadow"}, "points outside"),
    ({"name": "/rootfs/etc/mem", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 1}, "device node"),
])
def test_escapes_are_still_refused_with_a_leading_slash(tmp_path, entry, msg):
    p = absolute_image(tmp_path / "image.tar.gz", extra=[entry])
    with pytest.raises(BadRequest, match=msg):
        tarscan.scan_tarball(p, formats.detect_file(p), "unified")
    with pytest.raises(BadRequest, match=msg):
        stream_scan(p, "gzip")


def test_writing_through_a_symlink_is_refused_with_a_leading_slash(tmp_path):
    p = absolute_image(tmp_path / "image.tar.gz", extra=[
        {"name": "/rootfs/hostetc", "type": tarfile.SYMTYPE, "linkname": "/etc"},
        {"name": "/rootfs/hostetc/passwd", "data": b"x"},
    ])
    with pytest.raises(BadRequest, match="lies under a symlink"):
        stream_scan(p, "gzip")


def test_split_rootfs_with_leading_slash(tmp_path):
    p = absolute_image(tmp_path / "rootfs.tar", split_rootfs=True, mode="w")
    result = stream_scan(p, "none", "rootfs")
    assert result.has_rootfs


@root_only
def test_unpack_strips_the_leading_slash(tmp_path):
    p = absolute_image(tmp_path / "image.tar.gz")
    outside = tmp_path / "etc"  # where "/etc/..." would land if the slash were kept relative to dest's parent
    dest = tmp_path / "c1"
    meta = unpack(p, None, "", dest, uid_shift=100000, gid_shift=100000)
    assert meta["architecture"] == "x86_64"
    assert (dest / "rootfs/etc/inittab").read_bytes() == b"::sysinit:/bin/true\n"
    assert os.stat(dest / "rootfs/bin/hello2").st_ino == os.stat(dest / "rootfs/bin/hello").st_ino
    assert os.readlink(dest / "rootfs/bin/sh") == "/bin/hello"
    assert (dest / "templates/hostname.tpl").is_file()
    assert os.lstat(dest / "rootfs/etc/inittab").st_uid == 100000
    assert not outside.exists()
