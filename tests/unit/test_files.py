"""The file API's path resolution and writes, on plain directories (no container needed)."""

from __future__ import annotations

import os
import stat

import pytest

from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.instances import files
from lxd_daemon.instances.idmap import IdmapEntry, IdmapSet


@pytest.fixture
def tree(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host secret")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hostname").write_text("c1\n")
    (rootfs / "etc" / "secret").write_text("container secret")
    (rootfs / "root").mkdir()
    os.symlink("/etc/hostname", rootfs / "abs-link")
    os.symlink("../../../../../../host/secret", rootfs / "rel-escape")
    os.symlink(str(host / "secret"), rootfs / "abs-escape")
    os.symlink(str(host), rootfs / "dir-escape")
    os.symlink("/nonexistent/file", rootfs / "dangling-escape")
    os.symlink("/root/new-target", rootfs / "dangling-inside")
    return rootfs, host


def read(root, path):
    e = files.stat_entry(root, path, open_file=True)
    if e.fd is None:
        return e
    try:
        return os.read(e.fd, 1 << 20)
    finally:
        os.close(e.fd)


def test_paths_resolve_from_the_container_root(tree):
    rootfs, _ = tree
    with files.Root(rootfs) as root:
        assert read(root, "/etc/hostname") == b"c1\n"
        assert read(root, "etc/hostname") == b"c1\n"  # no leading slash (lxc file pull)
        assert read(root, "/../../etc/hostname") == b"c1\n"
        listing = files.stat_entry(root, "/", open_file=False)
        assert listing.type == "directory" and "etc" in listing.names


def test_symlinks_are_returned_as_their_target(tree):
    rootfs, _ = tree
    with files.Root(rootfs) as root:
        e = files.stat_entry(root, "/abs-link", open_file=True)
        assert e.type == "symlink" and e.target == b"/etc/hostname"
        assert e.headers()["X-LXD-type"] == "symlink"


@pytest.mark.parametrize("path", ["/rel-escape", "/abs-escape", "/dir-escape/secret", "/../host/secret",
                                  "/etc/../../host/secret"])
def test_escapes_never_reach_the_host(tree, path):
    rootfs, host = tree
    with files.Root(rootfs) as root:
        try:
            got = read(root, path)
        except (NotFound, BadRequest):
            return
        # A symlink is returned as its target text, never the host file's content.
        assert not (isinstance(got, bytes) and b"host secret" in got)
        assert getattr(got, "type", None) == "symlink"


def test_writes_through_escaping_links_stay_inside(tree):
    rootfs, host = tree
    with files.Root(rootfs) as root:
        spec = files.WriteSpec()
        # Absolute symlink to a host path: followed inside the root, where it doesn't exist.
        with pytest.raises(NotFound):
            files.open_for_write(root, "/dir-escape/secret", spec)
        with pytest.raises(NotFound):
            files.open_for_write(root, "/dangling-escape", spec)
        with pytest.raises(NotFound):
            files.open_for_write(root, "/abs-escape", spec)
        with pytest.raises(NotFound):
            files.open_for_write(root, "/rel-escape", spec)
        with pytest.raises(NotFound):
            files.mkdir(root, "/dir-escape/newdir", spec)
        with pytest.raises(NotFound):
            files.symlink(root, "/dir-escape/newlink", b"/x", spec)
        with pytest.raises(NotFound):
            files.delete(root, "/dir-escape/secret")
        files.delete(root, "/abs-escape")  # removes the link itself, not its target
    assert (host / "secret").read_text() == "host secret"
    assert sorted(os.listdir(host)) == ["secret"]
    assert not (rootfs / "abs-escape").is_symlink()


def test_dangling_link_inside_creates_its_target(tree):
    rootfs, _ = tree
    with files.Root(rootfs) as root:
        fd, created = files.open_for_write(root, "/dangling-inside", files.WriteSpec(mode=0o600))
        os.write(fd, b"x")
        os.close(fd)
        assert created
    assert (rootfs / "root" / "new-target").read_bytes() == b"x"


def test_create_overwrite_append_and_modes(tree):
    rootfs, _ = tree
    with files.Root(rootfs) as root:
        fd, created = files.open_for_write(root, "/root/a.txt", files.WriteSpec(mode=0o640))
        os.write(fd, b"one\n")
        os.close(fd)
        assert created
        assert stat.S_IMODE(os.stat(rootfs / "root/a.txt").st_mode) == 0o640
        # Mode is applied only on create (LXD 5.0.2).
        fd, created = files.open_for_write(root, "/root/a.txt", files.WriteSpec(mode=0o600, append=True))
        os.write(fd, b"two\n")
        os.close(fd)
        assert not created
        assert (rootfs / "root/a.txt").read_bytes() == b"one\ntwo\n"
        assert stat.S_IMODE(os.stat(rootfs / "root/a.txt").st_mode) == 0o640
        # An overwrite is done in place; end_write() cuts the old tail.
        fd, _ = files.open_for_write(root, "/root/a.txt", files.WriteSpec())
        os.write(fd, b"3")
        files.end_write(fd, files.WriteSpec())
        os.close(fd)
        assert (rootfs / "root/a.txt").read_bytes() == b"3"
        fd, _ = files.open_for_write(root, "/root/a.txt", files.WriteSpec(append=True))
        os.write(fd, b"4")
        files.end_write(fd, files.WriteSpec(append=True))
        os.close(fd)
        assert (rootfs / "root/a.txt").read_bytes() == b"34"
        fd, _ = files.open_for_write(root, "/root/default", files.WriteSpec())
        os.close(fd)
        assert stat.S_IMODE(os.stat(rootfs / "root/default").st_mode) == 0o644
        with pytest.raises(NotFound):
            files.open_for_write(root, "/missing/parent/x", files.WriteSpec())
        with pytest.raises(BadRequest):
            files.open_for_write(root, "/root", files.WriteSpec())
        with pytest.raises(BadRequest):
            files.open_for_write(root, "/", files.WriteSpec())


def test_directories_symlinks_and_delete(tree):
    rootfs, _ = tree
    with files.Root(rootfs) as root:
        assert files.mkdir(root, "/root/d", files.WriteSpec())
        assert stat.S_IMODE(os.stat(rootfs / "root/d").st_mode) == 0o750
        assert not files.mkdir(root, "/root/d", files.WriteSpec(mode=0o700))  # exists: left alone
        with pytest.raises(Conflict):
            files.mkdir(root, "/etc/hostname", files.WriteSpec())
        files.symlink(root, "/root/l", b"/etc/hostname", files.WriteSpec())
        assert os.readlink(rootfs / "root/l") == "/etc/hostname"
        files.symlink(root, "/root/l", b"d", files.WriteSpec())  # replaced
        assert os.readlink(rootfs / "root/l") == "d"
        files.delete(root, "/root/l")
        assert (rootfs / "root/d").is_dir()
        fd, _ = files.open_for_write(root, "/root/d/f", files.WriteSpec())
        os.close(fd)
        with pytest.raises(BadRequest):
            files.delete(root, "/root/d")  # not empty
        files.delete(root, "/root/d/f")
        files.delete(root, "/root/d")
        assert not (rootfs / "root/d").exists()
        with pytest.raises(NotFound):
            files.delete(root, "/root/d")
        with pytest.raises(BadRequest):
            files.delete(root, "/")


def test_devices_and_fifos_are_never_opened(tree):
    rootfs, _ = tree
    os.mkfifo(rootfs / "fifo")
    with files.Root(rootfs) as root:
        with pytest.raises(BadRequest):
            files.stat_entry(root, "/fifo", open_file=True)
        with pytest.raises(BadRequest):
            files.open_for_write(root, "/fifo", files.WriteSpec())


def test_ids_are_shifted_through_the_disk_idmap(tree):
    rootfs, _ = tree
    idmap = IdmapSet((IdmapEntry(True, True, 1_000_000, 0, 65536),))
    with files.Root(rootfs, idmap) as root:
        fd, _ = files.open_for_write(root, "/root/owned", files.WriteSpec(uid=1000, gid=1001, mode=0o600))
        os.close(fd)
        st = os.stat(rootfs / "root/owned")
        assert (st.st_uid, st.st_gid) == (1_001_000, 1_001_001)
        e = files.stat_entry(root, "/root/owned", open_file=False)
        assert (e.uid, e.gid, e.mode) == (1000, 1001, 0o600)
        # Unmapped host owner (host root) shows as nobody.
        e = files.stat_entry(root, "/etc/hostname", open_file=False)
        assert (e.uid, e.gid) == (65534, 65534)
        with pytest.raises(BadRequest):
            files.open_for_write(root, "/root/x", files.WriteSpec(uid=70000))


def test_header_parsing():
    class H(dict):
        def get(self, k, d=None):
            return super().get(k, d)

    spec = files.parse_headers(H({"X-LXD-uid": "0", "X-LXD-gid": "5", "X-LXD-mode": "0755",
                                  "X-LXD-type": "directory", "X-LXD-write": "append"}))
    assert (spec.uid, spec.gid, spec.mode, spec.type, spec.append) == (0, 5, 0o755, "directory", True)
    assert files.parse_headers(H({"X-LXD-mode": "420"})).mode == 420
    assert files.parse_headers(H({})).type == "file"
    for bad in ({"X-LXD-type": "fifo"}, {"X-LXD-write": "prepend"}, {"X-LXD-mode": "99x"}, {"X-LXD-uid": "a"}):
        with pytest.raises(BadRequest):
            files.parse_headers(H(bad))
