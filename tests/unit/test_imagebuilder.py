"""Unit tests for the image builder's pure parts: metadata, fingerprints, tar layout, naming."""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from lxd_daemon.imagebuilder import debian, pack
from lxd_daemon.imagebuilder.busybox import build_busybox, busybox_applets, make_rootfs
from lxd_daemon.imagebuilder.cli import main as cli_main
from lxd_daemon.imagebuilder.pack import BuildError, TarOptions

HAVE_BUSYBOX = os.path.isfile("/bin/busybox")
needs_busybox = pytest.mark.skipif(not HAVE_BUSYBOX, reason="busybox-static is not installed")

# ---------------------------------------------------------------------------------------------
# architecture, metadata


@pytest.mark.parametrize("machine,lxd", [
    ("x86_64", "x86_64"), ("amd64", "x86_64"), ("i686", "i686"), ("i386", "i686"),
    ("aarch64", "aarch64"), ("armv7l", "armv7l"), ("armv8l", "armv7l"), ("ppc64le", "ppc64le"),
    ("s390x", "s390x"), ("riscv64", "riscv64"),
])
def test_lxd_architecture(machine, lxd):
    assert pack.lxd_architecture(machine) == lxd


def test_lxd_architecture_unknown():
    with pytest.raises(BuildError, match="unsupported architecture 'vax'"):
        pack.lxd_architecture("vax")


def test_debian_architecture():
    assert pack.debian_architecture("x86_64") == "amd64"
    assert pack.debian_architecture("aarch64") == "arm64"
    assert pack.debian_architecture("ppc64le") == "ppc64el"


def test_metadata_shape_and_yaml_roundtrip():
    meta = pack.make_metadata(architecture="x86_64", creation_date=1700000000,
                              properties={"os": "busybox", "release": "1.35.0", "serial": 20231114},
                              expiry_date=1700086400)
    doc = yaml.safe_load(pack.render_metadata(meta))
    assert doc["architecture"] == "x86_64"
    assert doc["creation_date"] == 1700000000
    assert doc["expiry_date"] == 1700086400
    # property values are strings, as LXD's map[string]string expects
    assert doc["properties"] == {"os": "busybox", "release": "1.35.0", "serial": "20231114"}
    assert doc["templates"]["/etc/hostname"] == {
        "when": ["create", "copy"], "create_only": False, "template": "hostname.tpl", "properties": {}}
    assert doc["templates"]["/etc/hosts"]["template"] == "hosts.tpl"
    # the top-level keys come in LXD's order
    assert list(doc) == ["architecture", "creation_date", "expiry_date", "properties", "templates"]


def test_metadata_without_expiry_has_no_expiry_date():
    meta = pack.make_metadata(architecture="x86_64", creation_date=1, properties={})
    assert "expiry_date" not in yaml.safe_load(pack.render_metadata(meta))


def test_templates_are_pongo2_with_container_name():
    assert pack.HOSTNAME_TEMPLATE.content == "{{ container.name }}\n"
    assert "127.0.1.1\t{{ container.name }}" in pack.HOSTS_TEMPLATE.content
    assert "127.0.0.1\tlocalhost" in pack.HOSTS_TEMPLATE.content


@pytest.mark.parametrize("tpl", [
    pack.Template("etc/hostname", "h.tpl", ""),
    pack.Template("/etc/hostname", "../h.tpl", ""),
    pack.Template("/etc/hostname", "a/b.tpl", ""),
])
def test_bad_templates_refused(tpl):
    with pytest.raises(BuildError):
        pack.make_metadata(architecture="x86_64", creation_date=1, properties={}, templates=[tpl])


def test_serial_and_build_time(monkeypatch):
    assert pack.serial(0) == "19700101_0000"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert pack.build_time() == 1700000000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(BuildError, match="SOURCE_DATE_EPOCH"):
        pack.build_time()


# ---------------------------------------------------------------------------------------------
# fingerprints


def test_fingerprint_unified_is_sha256_of_file(tmp_path):
    f = tmp_path / "img.tar.gz"
    f.write_bytes(os.urandom(3 << 20))
    assert pack.fingerprint([f]) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_fingerprint_split_is_sha256_of_metadata_then_rootfs(tmp_path):
    m, r = tmp_path / "meta.tar.xz", tmp_path / "rootfs.squashfs"
    m.write_bytes(b"metadata" * 1000)
    r.write_bytes(os.urandom(2 << 20) + b"tail")
    want = hashlib.sha256(m.read_bytes() + r.read_bytes()).hexdigest()
    assert pack.fingerprint([m, r]) == want
    assert pack.fingerprint([r, m]) != want  # order matters
    with pytest.raises(ValueError):
        pack.fingerprint([m, r, m])


# ---------------------------------------------------------------------------------------------
# tar layout


def _tree(root: Path) -> None:
    for d in ("b", "a", "a/z", "a/y", "A", "a-"):
        (root / d).mkdir(parents=True)
    (root / "a/z/file").write_text("z")
    (root / "a/y/file").write_text("y")
    (root / "b/f").write_text("hello")
    os.link(root / "b/f", root / "b/hard")
    os.symlink("../b/f", root / "a/link")
    os.mkfifo(root / "b/fifo")
    os.chmod(root / "A", 0o1777)


def test_walk_tree_is_depth_first_sorted_dirs_first(tmp_path):
    _tree(tmp_path)
    names = [r for r, _ in pack.walk_tree(tmp_path)]
    assert names == ["A", "a", "a/link", "a/y", "a/y/file", "a/z", "a/z/file", "a-",
                     "b", "b/f", "b/fifo", "b/hard"]


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as t:
        return t.getmembers()


def test_unified_tar_layout_ownership_and_order(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    if os.geteuid() == 0:
        os.lchown(root / "b/f", 1234, 5678)
    meta = pack.make_metadata(architecture="x86_64", creation_date=1700000000, properties={"os": "t"})
    out = tmp_path / "img.tar.gz"
    pack.write_unified_tar(out, meta, root, pack.DEFAULT_TEMPLATES, "gzip", TarOptions(owner="root"))
    ms = _members(out)
    names = [m.name for m in ms]
    assert names[0] == "metadata.yaml"
    assert names[1] == "rootfs"
    assert names[-3:] == ["templates", "templates/hostname.tpl", "templates/hosts.tpl"]
    assert "rootfs/b/fifo" not in names  # no fifos or devices in an image
    assert all(m.uid == 0 and m.gid == 0 for m in ms)
    by = {m.name: m for m in ms}
    assert by["rootfs/A"].mode & 0o7777 == 0o1777
    assert by["rootfs/a/link"].issym() and by["rootfs/a/link"].linkname == "../b/f"
    assert by["rootfs/b/hard"].islnk() and by["rootfs/b/hard"].linkname == "rootfs/b/f"
    with tarfile.open(out) as t:
        doc = yaml.safe_load(t.extractfile("metadata.yaml"))
        assert t.extractfile("templates/hostname.tpl").read() == b"{{ container.name }}\n"
    assert doc["properties"] == {"os": "t"}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_tar_preserve_ownership(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("x")
    os.lchown(root / "f", 1234, 5678)
    out = tmp_path / "r.tar"
    pack.write_rootfs_tar(out, root, "none", TarOptions(owner="preserve"))
    (m,) = _members(out)
    assert (m.name, m.uid, m.gid, m.uname, m.gname) == ("f", 1234, 5678, "", "")


def test_mtime_clamp(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "old").write_text("x")
    (root / "new").write_text("x")
    os.utime(root / "old", (1000, 1000))
    out = tmp_path / "r.tar"
    pack.write_rootfs_tar(out, root, "none", TarOptions(mtime_clamp=5000))
    assert {m.name: m.mtime for m in _members(out)} == {"new": 5000, "old": 1000}


def test_unknown_compression_refused(tmp_path):
    with pytest.raises(BuildError, match="unknown compression 'lzma9'"):
        with pack.compressed_writer(tmp_path / "x", "lzma9"):
            pass


@pytest.mark.parametrize("comp", ["gzip", "xz", "zstd", "bzip2", "none"])
def test_compressions_roundtrip(tmp_path, comp):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"data" * 1000)
    meta = pack.make_metadata(architecture="x86_64", creation_date=1, properties={})
    out = tmp_path / ("img" + pack.TAR_EXTENSIONS[comp])
    pack.write_unified_tar(out, meta, root, pack.DEFAULT_TEMPLATES, comp, TarOptions())
    magic = out.read_bytes()[:6]
    expect = {"gzip": b"\x1f\x8b", "xz": b"\xfd7zXZ", "zstd": b"\x28\xb5\x2f\xfd", "bzip2": b"BZh"}
    if comp in expect:
        assert magic.startswith(expect[comp])
    if comp == "zstd":
        return  # Python's tarfile cannot read zstd; the magic is enough here
    names = [m.name for m in _members(out)]
    assert names[:3] == ["metadata.yaml", "rootfs", "rootfs/f"]


# ---------------------------------------------------------------------------------------------
# output naming and atomicity


def test_output_paths_directory(tmp_path):
    assert pack.output_paths(tmp_path, "bb", "unified", "gzip") == [tmp_path / "bb.tar.gz"]
    assert pack.output_paths(tmp_path, "bb", "unified", "none") == [tmp_path / "bb.tar"]
    assert pack.output_paths(tmp_path, "bb", "split", "xz") == [tmp_path / "bb.meta.tar.xz",
                                                                tmp_path / "bb.squashfs"]
    assert pack.output_paths(tmp_path, "bb", "split", "zstd", "tar") == [
        tmp_path / "bb.meta.tar.zst", tmp_path / "bb.rootfs.tar.zst"]
    new = tmp_path / "new"
    assert pack.output_paths(str(new) + "/", "bb", "unified", "xz") == [new / "bb.tar.xz"]


def test_output_paths_file(tmp_path):
    f = tmp_path / "lxd.tar.xz"
    assert pack.output_paths(f, "x", "unified", "xz") == [f]
    assert pack.output_paths(f, "x", "split", "xz") == [f, tmp_path / "lxd.squashfs"]
    assert pack.output_paths(f, "x", "split", "xz", "tar") == [f, tmp_path / "lxd.rootfs.tar.xz"]


@pytest.mark.parametrize("args,msg", [
    (("unified", "rar"), "unknown compression"),
    (("tarball", "gzip"), "unknown format"),
])
def test_output_paths_refuses_bad_options(tmp_path, args, msg):
    with pytest.raises(BuildError, match=msg):
        pack.output_paths(tmp_path, "x", *args)


def test_atomic_outputs_leave_nothing_on_failure(tmp_path):
    finals = [tmp_path / "m.tar.gz", tmp_path / "r.squashfs"]
    with pytest.raises(RuntimeError):
        with pack.AtomicOutputs(finals) as temps:
            for t in temps:
                t.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_outputs_commit(tmp_path):
    finals = [tmp_path / "m.tar.gz"]
    (tmp_path / "m.tar.gz").write_bytes(b"old")
    outs = pack.AtomicOutputs(finals)
    with outs as temps:
        temps[0].write_bytes(b"new")
        outs.commit()
    assert (tmp_path / "m.tar.gz").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tar.gz"]
    assert stat.S_IMODE((tmp_path / "m.tar.gz").stat().st_mode) == 0o644


def test_failed_compressor_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(pack._COMPRESSORS, "gzip", ["sh", "-c", "cat >/dev/null; echo nope >&2; exit 3"])
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    meta = pack.make_metadata(architecture="x86_64", creation_date=1, properties={})
    with pytest.raises(BuildError, match="exit 3.*nope"):
        pack.pack_image(root, [out / "i.tar.gz"], meta, [], fmt="unified", compression="gzip")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the busybox image


@needs_busybox
def test_busybox_rootfs(tmp_path):
    root = tmp_path / "rootfs"
    applets = make_rootfs(root)
    for tool in ("bin/sh", "bin/ps", "sbin/ip", "bin/mount", "bin/hostname", "bin/sleep", "bin/true",
                 "bin/false", "usr/bin/env", "bin/cat", "usr/bin/id", "bin/stat", "usr/bin/sha256sum"):
        p = root / tool
        assert p.is_symlink(), tool
        # relative links that resolve to /bin/busybox inside the rootfs
        assert not os.readlink(p).startswith("/")
        assert p.resolve() == (root / "bin/busybox").resolve(), tool
    assert len(applets) > 200
    assert not (root / "linuxrc").exists()
    init = root / "sbin/init"
    assert init.is_file() and not init.is_symlink() and os.access(init, os.X_OK)
    assert "trap halt_now PWR TERM" in init.read_text()
    assert "trap reboot_now INT" in init.read_text()
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "root").stat().st_mode) == 0o700
    assert (root / "etc/passwd").read_text().startswith("root:x:0:0:root:/root:/bin/sh\n")
    assert "root:x:0:" in (root / "etc/group").read_text()
    assert stat.S_IMODE((root / "etc/shadow").stat().st_mode) == 0o600
    assert (root / "etc/hostname").read_text() == "busybox\n"
    assert "localhost" in (root / "etc/hosts").read_text()
    assert os.readlink(root / "var/run") == "../run"


@needs_busybox
def test_busybox_applets_are_relative_paths():
    apps = busybox_applets()
    assert "usr/bin/sha256sum" in apps and "sbin/ip" in apps
    assert all(not a.startswith("/") and "/" in a for a in apps)


def _assert_confined(ms: list[tarfile.TarInfo]) -> None:
    """No entry (name, symlink or hardlink target) can land outside rootfs/."""
    top = {"metadata.yaml", "rootfs", "templates"}
    for m in ms:
        assert not m.name.startswith("/") and ".." not in m.name.split("/"), m.name
        assert m.name.split("/")[0] in top, m.name
        assert not (m.ischr() or m.isblk() or m.isfifo()), m.name
        if m.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname))
            assert not m.linkname.startswith("/"), m.name
            assert target == "rootfs" or target.startswith("rootfs/"), (m.name, m.linkname)
        if m.islnk():
            assert m.linkname.startswith("rootfs/") and ".." not in m.linkname.split("/"), m.name


@needs_busybox
def test_busybox_unified_image(tmp_path):
    res = build_busybox(tmp_path)
    (img,) = res.paths
    assert img == tmp_path / "busybox.tar.gz"
    assert res.fingerprint == hashlib.sha256(img.read_bytes()).hexdigest()
    ms = _members(img)
    _assert_confined(ms)
    assert all(m.uid == 0 and m.gid == 0 for m in ms)
    names = [m.name for m in ms]
    assert names[0] == "metadata.yaml"
    assert "rootfs/sbin/init" in names and "rootfs/bin/busybox" in names
    rootfs_names = [n for n in names if n.startswith("rootfs/")]
    assert rootfs_names == sorted(rootfs_names, key=lambda n: [p.encode() for p in n.split("/")])
    with tarfile.open(img) as t:
        doc = yaml.safe_load(t.extractfile("metadata.yaml"))
    props = doc["properties"]
    assert props["os"] == "busybox" and props["variant"] == "default"
    assert props["release"].count(".") == 2
    assert props["architecture"] == doc["architecture"] == pack.lxd_architecture()
    assert set(doc["templates"]) == {"/etc/hostname", "/etc/hosts"}
    assert res.size < 3 << 20
    assert list(tmp_path.iterdir()) == [img]  # no temporary files left


@needs_busybox
def test_busybox_reproducible_with_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ra = build_busybox(a)
    rb = build_busybox(b)
    assert ra.fingerprint == rb.fingerprint
    assert ra.metadata["creation_date"] == 1700000000


def test_split_squashfs_reproducible_with_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("x\n")
    meta = pack.make_metadata(architecture="x86_64", creation_date=1700000000, properties={})
    fps = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        res = pack.pack_image(root, pack.output_paths(tmp_path / d, "i", "split", "gzip"), meta,
                              pack.DEFAULT_TEMPLATES, fmt="split", compression="gzip",
                              opts=TarOptions(mtime_clamp=1700000000))
        assert res.paths[1].read_bytes()[:4] == b"hsqs"
        fps.append(res.fingerprint)
        os.utime(root / "etc/hostname")  # a later mtime must not change the image
    assert fps[0] == fps[1]


@needs_busybox
def test_cli_busybox(tmp_path, capsys):
    assert cli_main(["busybox", "-o", str(tmp_path / "bb.tar.xz"), "--compression", "xz",
                     "--format", "split", "--squashfs-compression", "gzip"]) == 0
    out = capsys.readouterr().out
    meta, rootfs = tmp_path / "bb.tar.xz", tmp_path / "bb.squashfs"
    assert f"metadata: {meta}\n" in out and f"rootfs: {rootfs}\n" in out
    fp = hashlib.sha256(meta.read_bytes() + rootfs.read_bytes()).hexdigest()
    assert f"fingerprint: {fp}\n" in out
    assert rootfs.read_bytes()[:4] == b"hsqs"


def test_cli_refuses_missing_output_dir(tmp_path, capsys):
    assert cli_main(["busybox", "-o", str(tmp_path / "nope" / "x.tar.gz")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_refuses_bad_compression(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["busybox", "--compression", "rar"])
    assert e.value.code == 2
    assert "invalid choice: 'rar'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Debian: apt sources and the container inittab


def test_find_mirror_deb822_and_one_line(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://old.example/debian bullseye main\n")
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://mirror.test/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n"
        "Components: main\n")
    (tmp_path / "sources.list.d/other.list.disabled-by-farm").write_text(
        "deb http://elsewhere.test/debian bookworm main\n")
    assert debian.find_mirror("bookworm", tmp_path) == "http://mirror.test/debian"
    assert debian.find_mirror("bullseye", tmp_path) == "http://old.example/debian"
    assert debian.find_security_mirror("bookworm", tmp_path) == "http://mirror.test/debian-security"
    # another release falls back to a plain Debian mirror of the machine
    assert debian.find_mirror("trixie", tmp_path) in ("http://old.example/debian", "http://mirror.test/debian")


def test_find_mirror_none(tmp_path):
    (tmp_path / "sources.list").write_text("deb-src http://x.test/debian bookworm main\n")
    with pytest.raises(BuildError, match="--mirror"):
        debian.find_mirror("bookworm", tmp_path)


def test_find_mirror_skips_disabled_deb822(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/a.sources").write_text(
        "Enabled: no\nTypes: deb\nURIs: http://a.test/debian\nSuites: bookworm\n")
    (tmp_path / "sources.list.d/b.sources").write_text(
        "Types: deb\nURIs: http://b.test/debian\nSuites: bookworm\n")
    assert debian.find_mirror("bookworm", tmp_path) == "http://b.test/debian"


def test_image_sources():
    text = debian.image_sources("bookworm", "http://m/debian", "http://m/debian-security")
    assert "URIs: http://m/debian\nSuites: bookworm bookworm-updates\n" in text
    assert "URIs: http://m/debian-security\nSuites: bookworm-security\n" in text
    assert "security" not in debian.image_sources("bookworm", "http://m/debian", None)


def test_container_inittab():
    src = (
        "id:2:initdefault:\nsi::sysinit:/etc/init.d/rcS\n"
        "ca:12345:ctrlaltdel:/sbin/shutdown -t1 -a -r now\n"
        "pf::powerwait:/etc/init.d/powerfail start\n"
        "1:2345:respawn:/sbin/getty --noclear 38400 tty1\n2:23:respawn:/sbin/getty 38400 tty2\n"
    )
    out = debian.container_inittab(src)
    live = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    assert "id:2:initdefault:" in live
    assert not any("getty 38400 tty" in ln for ln in live)
    assert "pf::powerwait:/sbin/init 0" in live
    assert "ca:12345:ctrlaltdel:/sbin/shutdown -t1 -r now" in live
    assert sum(ln.startswith("ca:") for ln in live) == 1
    assert not any("/etc/init.d/powerfail" in ln for ln in live)


# ---------------------------------------------------------------------------------------------
# verify helpers: subordinate ids, id shifting, templates


def test_subid_base(tmp_path):
    from lxd_daemon.imagebuilder.verify import subid_base

    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text("alice:100000:65536\nroot:100:10\nroot:1000000:1000000000\n")
    g.write_text("root:2000000:65536\n")
    assert subid_base("root", (str(u), str(g))) == (1000000, 2000000)
    with pytest.raises(BuildError, match="no range of 65536 ids for bob"):
        subid_base("bob", (str(u), str(g)))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_shift_tree_shifts_each_inode_once_and_keeps_setuid(tmp_path):
    from lxd_daemon.imagebuilder.verify import shift_tree

    root = tmp_path / "r"
    (root / "d").mkdir(parents=True)
    (root / "d/f").write_text("x")
    os.link(root / "d/f", root / "hard")
    os.symlink("d/f", root / "link")
    os.lchown(root / "d/f", 0, 42)
    os.chmod(root / "d/f", 0o4755)  # (after the chown, which clears set-id bits)
    shift_tree(root, 1000000, 2000000)
    st = os.lstat(root / "hard")
    assert (st.st_uid, st.st_gid) == (1000000, 2000042)
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert os.lstat(root / "link").st_uid == 1000000
    assert os.lstat(root).st_gid == 2000000
    os.lchown(root / "d", 70000, 0)
    with pytest.raises(BuildError, match="outside the 65536-id map"):
        shift_tree(root, 0, 0)


def test_apply_templates(tmp_path):
    from lxd_daemon.imagebuilder.verify import apply_templates

    meta = pack.make_metadata(architecture="x86_64", creation_date=1, properties={},
                              templates=[*pack.DEFAULT_TEMPLATES,
                                         pack.Template("/etc/motd", "motd.tpl", "hi {{ instance.name }}\n",
                                                       when=("start",))])
    tpl = [*pack.DEFAULT_TEMPLATES, pack.Template("/etc/motd", "motd.tpl", "hi {{ instance.name }}\n")]
    m = tmp_path / "meta.tar.gz"
    pack.write_metadata_tar(m, meta, tpl, "gzip")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    assert apply_templates(m, root, "c1", "create") == ["/etc/hostname", "/etc/hosts"]
    assert (root / "etc/hostname").read_text() == "c1\n"
    assert "127.0.1.1\tc1\n" in (root / "etc/hosts").read_text()
    assert not (root / "etc/motd").exists()
    assert apply_templates(m, root, "c2", "start") == ["/etc/motd"]
    assert (root / "etc/motd").read_text() == "hi c2\n"
    os.symlink("/etc/passwd", root / "etc/evil")
    meta["templates"] = {"/etc/evil": {"when": ["create"], "template": "motd.tpl"}}
    pack.write_metadata_tar(m, meta, tpl, "gzip")
    with pytest.raises(BuildError, match="symlink"):
        apply_templates(m, root, "c3", "create")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_debian_work_dir_mounts_are_unmounted(tmp_path):
    """An interrupted debootstrap leaves proc mounted in the target: it goes before the removal."""
    target = tmp_path / "work" / "rootfs" / "proc"
    target.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        assert debian.mounts_under(tmp_path / "work") == [str(target)]
        with pytest.raises(KeyboardInterrupt), debian._unmount_on_exit(tmp_path / "work"):
            raise KeyboardInterrupt
        assert debian.mounts_under(tmp_path / "work") == []
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
