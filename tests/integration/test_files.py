"""The file API through the stock client, curl and pylxd; escape attempts never leave the root."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time

import pytest

from tests.helpers import LXC, ensure_containers_ready, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ct(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-files"
    daemon.lxc("launch", alias, name)
    try:
        yield name
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def sh(daemon, ct, script: str) -> str:
    return daemon.lxc("exec", ct, "--", "sh", "-c", script).stdout


def test_push_pull_modes_and_owners(daemon, ct, tmp_path):
    src = tmp_path / "hello.txt"
    src.write_text("hello\n")
    os.chmod(src, 0o640)
    daemon.lxc("file", "push", str(src), f"{ct}/root/hello.txt")
    assert sh(daemon, ct, "stat -c '%a %u %g' /root/hello.txt").split() == ["640", "0", "0"]
    daemon.lxc("file", "push", str(src), f"{ct}/tmp/owned.txt", "--uid", "1000", "--gid", "1001", "--mode", "0600")
    assert sh(daemon, ct, "stat -c '%a %u %g' /tmp/owned.txt").split() == ["600", "1000", "1001"]
    # On disk the ids are shifted (unprivileged container).
    assert daemon.lxc("file", "pull", f"{ct}/root/hello.txt", "-").stdout == "hello\n"
    dst = tmp_path / "pulled.txt"
    daemon.lxc("file", "pull", f"{ct}/tmp/owned.txt", str(dst))
    assert dst.read_text() == "hello\n"
    # Headers, through curl (no leading slash, as lxc file pull sends it).
    r = daemon.api("GET", f"/1.0/instances/{ct}/files", params={"path": "tmp/owned.txt"})
    assert r.status_code == 200
    assert r.headers["x-lxd-uid"] == "1000" and r.headers["x-lxd-gid"] == "1001"
    assert r.headers["x-lxd-mode"] == "0600" and r.headers["x-lxd-type"] == "file"
    assert r.headers["content-type"] == "application/octet-stream"
    head = daemon.api("HEAD", f"/1.0/containers/{ct}/files", params={"path": "/tmp/owned.txt"})
    assert head.status_code == 200 and head.headers["x-lxd-mode"] == "0600" and head.content == b""


def test_overwrite_keeps_metadata_and_append(daemon, ct):
    path = "/root/meta.txt"
    r = daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": path}, content=b"one\n",
                   headers={"X-LXD-mode": "0600", "X-LXD-uid": "5", "X-LXD-gid": "6"})
    assert r.status_code == 200, r.text
    r = daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": path}, content=b"two\n",
                   headers={"X-LXD-write": "append", "X-LXD-mode": "0777"})
    assert r.status_code == 200
    assert sh(daemon, ct, f"cat {path}; stat -c '%a %u %g' {path}").split() == ["one", "two", "600", "5", "6"]
    r = daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": path}, content=b"three\n")
    assert sh(daemon, ct, f"cat {path}") == "three\n"
    # Default mode of a new file: 0644.
    daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": "/root/default.txt"}, content=b"x")
    assert sh(daemon, ct, "stat -c %a /root/default.txt").strip() == "644"


def test_directories_recursive_and_symlinks(daemon, ct, tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("deep\n")
    os.chmod(tree / "a", 0o700)
    os.symlink("f", tree / "a" / "b" / "link")
    daemon.lxc("file", "push", "-r", str(tree), f"{ct}/root/")
    out = sh(daemon, ct, "cat /root/tree/a/b/f; readlink /root/tree/a/b/link; stat -c %a /root/tree/a")
    assert out.split() == ["deep", "f", "700"]
    # Listing: a sync envelope of names.
    r = daemon.api("GET", f"/1.0/instances/{ct}/files", params={"path": "/root/tree/a/b"}).json()
    assert r["type"] == "sync" and sorted(r["metadata"]) == ["f", "link"]
    # A symlink comes back as its target.
    r = daemon.api("GET", f"/1.0/instances/{ct}/files", params={"path": "/root/tree/a/b/link"})
    assert r.headers["x-lxd-type"] == "symlink" and r.content == b"f"
    # Pull -r brings the tree back.
    out_dir = tmp_path / "back"
    out_dir.mkdir()
    daemon.lxc("file", "pull", "-r", f"{ct}/root/tree", str(out_dir))
    assert (out_dir / "tree" / "a" / "b" / "f").read_text() == "deep\n"
    # -p creates missing parents; without it a missing parent is an error.
    src = tmp_path / "p.txt"
    src.write_text("p\n")
    daemon.lxc("file", "push", "-p", str(src), f"{ct}/root/x/y/z.txt")
    assert sh(daemon, ct, "cat /root/x/y/z.txt") == "p\n"
    r = daemon.lxc("file", "push", str(src), f"{ct}/root/missing/dir/z.txt", check=False)
    assert r.returncode != 0
    # mkdir through the API: type=directory, default 0750.
    r = daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": "/root/newdir"},
                   headers={"X-LXD-type": "directory"})
    assert r.status_code == 200
    assert sh(daemon, ct, "stat -c %a /root/newdir").strip() == "750"


def test_delete_and_edit(daemon, ct, tmp_path):
    daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": "/root/del.txt"}, content=b"x")
    daemon.lxc("file", "delete", f"{ct}/root/del.txt")
    assert daemon.api("GET", f"/1.0/instances/{ct}/files", params={"path": "/root/del.txt"}).status_code == 404
    r = daemon.lxc("file", "delete", f"{ct}/root/del.txt", check=False)
    assert r.returncode != 0
    # `lxc file edit` runs $EDITOR on a terminal; with stdin not a terminal it pushes stdin.
    daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": "/root/edit.txt"}, content=b"hello\n")
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nsed -i s/hello/bye/ \"$1\"\n")
    os.chmod(editor, 0o755)
    env = dict(daemon.env, EDITOR=str(editor))
    subprocess.run(["script", "-qec", f"{LXC} file edit {ct}/root/edit.txt", "/dev/null"], env=env,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True)
    assert sh(daemon, ct, "cat /root/edit.txt") == "bye\n"
    daemon.lxc("file", "edit", f"{ct}/root/edit.txt", input="piped\n")
    assert sh(daemon, ct, "cat /root/edit.txt") == "piped\n"


def test_big_file_is_byte_identical(daemon, ct, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(100 << 20))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    t0 = time.monotonic()
    daemon.lxc("file", "push", "--quiet", str(src), f"{ct}/root/big.bin")
    t1 = time.monotonic()
    dst = tmp_path / "big.out"
    daemon.lxc("file", "pull", "--quiet", f"{ct}/root/big.bin", str(dst))
    t2 = time.monotonic()
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == want
    assert sh(daemon, ct, "sha256sum /root/big.bin").split()[0] == want
    print(f"100 MiB push {100 / (t1 - t0):.0f} MiB/s, pull {100 / (t2 - t1):.0f} MiB/s")
    daemon.lxc("file", "delete", f"{ct}/root/big.bin")


def test_big_api_push_overwrites_in_place_and_appends(daemon, ct):
    """A large Content-Length body is spliced from the socket (the response closes the
    connection); overwriting keeps the file's metadata and ends where the new contents end."""
    path = "/root/spliced.bin"
    first, second = os.urandom(5 << 20), os.urandom(3 << 20)
    r = daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": path}, content=first,
                   headers={"X-LXD-mode": "0600", "X-LXD-uid": "7"})
    assert r.status_code == 200 and r.headers.get("connection") == "close"
    r = daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": path}, content=second,
                   headers={"X-LXD-mode": "0644"})
    assert r.status_code == 200
    assert sh(daemon, ct, f"stat -c '%s %a %u' {path}").split() == [str(len(second)), "600", "7"]
    assert sh(daemon, ct, f"sha256sum {path}").split()[0] == hashlib.sha256(second).hexdigest()
    r = daemon.api("POST", f"/1.0/instances/{ct}/files", params={"path": path}, content=first,
                   headers={"X-LXD-write": "append"})
    assert r.status_code == 200
    assert sh(daemon, ct, f"sha256sum {path}").split()[0] == hashlib.sha256(second + first).hexdigest()
    daemon.api("DELETE", f"/1.0/instances/{ct}/files", params={"path": path})


def test_works_on_a_stopped_instance(daemon, tmp_path):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-stopped"
    daemon.lxc("init", alias, name)
    try:
        src = tmp_path / "f.txt"
        src.write_text("offline\n")
        daemon.lxc("file", "push", str(src), f"{name}/root/f.txt")
        assert daemon.lxc("file", "pull", f"{name}/root/f.txt", "-").stdout == "offline\n"
        r = daemon.api("GET", f"/1.0/instances/{name}/files", params={"path": "/root/f.txt"})
        assert r.headers["x-lxd-uid"] == "0"  # shown as the container sees it
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def test_escapes_never_touch_the_host(daemon, ct, tmp_path):
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    secret = host_dir / "secret"
    secret.write_text("host secret\n")
    before = sorted(os.listdir(host_dir))
    sh(daemon, ct, f"ln -s {secret} /root/abs-link; ln -s {host_dir} /root/dir-link; "
                   f"ln -s ../../../../../../../../{secret} /root/rel-link; ln -s / /root/root-link")
    api = f"/1.0/instances/{ct}/files"
    for path in ("/root/dir-link/secret", f"/root/root-link{secret}", f"/../../..{secret}",
                 f"root/../../../..{secret}"):
        r = daemon.api("GET", api, params={"path": path})
        assert r.status_code in (400, 403, 404), (path, r.status_code)
        assert b"host secret" not in r.content
    for path in ("/root/abs-link", "/root/rel-link"):
        r = daemon.api("GET", api, params={"path": path})
        assert r.headers.get("x-lxd-type") == "symlink" and b"host secret" not in r.content
    # Writes, mkdir, symlink creation and delete through the links all stay inside (or fail).
    for path in ("/root/abs-link", "/root/rel-link", "/root/dir-link/secret", f"/root/root-link{secret}",
                 f"/..{secret}", "/root/dir-link/new"):
        r = daemon.api("POST", api, params={"path": path}, content=b"pwned\n")
        assert r.status_code in (200, 400, 403, 404), (path, r.status_code)
    for kind in ("directory", "symlink"):
        r = daemon.api("POST", api, params={"path": "/root/dir-link/made"}, content=b"/x",
                       headers={"X-LXD-type": kind})
        assert r.status_code in (400, 403, 404)
    r = daemon.api("DELETE", api, params={"path": "/root/dir-link/secret"})
    assert r.status_code in (400, 403, 404)
    assert secret.read_text() == "host secret\n"
    assert sorted(os.listdir(host_dir)) == before
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o644
    # What a write through an absolute link did, it did inside the container.
    daemon.api("DELETE", api, params={"path": "/root/abs-link"})
    assert secret.exists()


def test_errors(daemon, ct):
    api = f"/1.0/instances/{ct}/files"
    assert daemon.api("GET", api).status_code == 400  # no path
    assert daemon.api("GET", api, params={"path": "/no/such"}).status_code == 404
    assert daemon.api("GET", "/1.0/instances/no-such-instance/files", params={"path": "/"}).status_code == 404
    r = daemon.api("POST", api, params={"path": "/root/x"}, headers={"X-LXD-type": "fifo"})
    assert r.status_code == 400
    r = daemon.api("POST", api, params={"path": "/root"}, content=b"x")
    assert r.status_code == 400  # a directory
    r = daemon.api("DELETE", api, params={"path": "/"})
    assert r.status_code == 400


def test_pylxd_files(daemon, ct):
    r = daemon.pylxd(
        f"c = client.containers.get({ct!r})\n"
        "c.files.put('/root/pylxd.txt', b'from pylxd\\n', mode='0600')\n"
        "print(json.dumps(c.files.get('/root/pylxd.txt').decode()))\n"
        "c.files.delete('/root/pylxd.txt')\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == "from pylxd\n"
    assert daemon.api("GET", f"/1.0/instances/{ct}/files", params={"path": "/root/pylxd.txt"}).status_code == 404
