"""A full disk (issue 8, item 6): a daemon whose LXD_DIR is a small tmpfs this test mounts itself.

Image imports, file pushes, publishes and database writes that run out of space answer 507
(or fail their operation) with a message naming what ran out, never "Internal error" or raw
errno/database text; nothing partial is left behind (no temp files, no half-written file, no
row), the daemon stays healthy, and everything works again once space is freed."""

from __future__ import annotations

import os
import subprocess
import tarfile
import time

import pytest

from tests.helpers import Daemon, busybox_tarball, run_prefix

pytestmark = pytest.mark.integration

SIZE_MB = 40


def _df_free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small(tmp_path):
    """A daemon on a SIZE_MB tmpfs with the busybox image and a running container."""
    var = tmp_path / "var"
    var.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m,mode=0711", "tmpfs", str(var)], check=True)
    d = Daemon(lxd_dir=var, conf_dir=tmp_path / "conf")
    c = run_prefix() + "-full"
    try:
        d.start()
        d.lxd("init", "--auto")
        d.lxc("image", "import", str(busybox_tarball()), "--alias", "busybox")
        d.lxc("launch", "busybox", c)
        d.container = c
        yield d
    finally:
        if d.proc is not None:
            for f in var.glob("filler*"):
                f.unlink()
            d.lxc("delete", "-f", c, check=False)
        d.stop()
        for _ in range(50):
            if subprocess.run(["umount", str(var)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(var)], check=False)


def fill(d, leave: int = 0) -> None:
    """Fill the tmpfs, leaving about `leave` bytes free."""
    free = _df_free(d.lxd_dir)
    with open(d.lxd_dir / "filler", "wb") as f:
        chunk = b"\0" * (1 << 20)
        try:
            while _df_free(d.lxd_dir) > leave + len(chunk):
                f.write(chunk)
                f.flush()
            f.write(b"\0" * max(0, _df_free(d.lxd_dir) - leave))
        except OSError:
            pass
    assert _df_free(d.lxd_dir) <= leave + (1 << 20), free


def free_space(d) -> None:
    (d.lxd_dir / "filler").unlink(missing_ok=True)


def assert_clear(message: str, *words: str) -> None:
    assert "Internal error" not in message and "Errno" not in message and "database or disk" not in message, message
    for w in words:
        assert w in message, message


def images_leftovers(d) -> set[str]:
    return {p.name for p in (d.lxd_dir / "images").iterdir() if not (len(p.name) == 64 or p.name.endswith(".rootfs"))}


def healthy(d) -> None:
    r = d.api("GET", "/1.0")
    assert r.status_code == 200, r.text
    assert d.lxc("exec", d.container, "--", "echo", "alive").stdout.strip() == "alive"


def test_file_push_bigger_than_the_space(small, tmp_path):
    d = small
    c = d.container
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(0)
        f.write(os.urandom(1 << 20) * (SIZE_MB + 8))
    r = d.lxc("file", "push", str(big), f"{c}/root/big.bin", check=False)
    assert r.returncode != 0
    assert_clear(r.stderr, "No space left", f"instance '{c}'")
    # the same through the API: a 507 in the envelope
    with d.http() as h, open(big, "rb") as f:
        resp = h.post(f"/1.0/instances/{c}/files", params={"path": "/root/big2.bin"}, content=f,
                      headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 507, resp.text
    body = resp.json()
    assert body["type"] == "error" and body["error_code"] == 507
    assert_clear(body["error"], "No space left", f"instance '{c}'")
    # nothing half-written left in the container
    out = d.lxc("exec", c, "--", "sh", "-c", "ls /root; echo end").stdout.split()
    assert "big.bin" not in out and "big2.bin" not in out
    healthy(d)
    small_file = tmp_path / "small.txt"
    small_file.write_text("fits\n")
    d.lxc("file", "push", str(small_file), f"{c}/root/small.txt")
    assert d.lxc("exec", c, "--", "cat", "/root/small.txt").stdout == "fits\n"


def test_image_import_bigger_than_the_space(small, tmp_path):
    d = small
    img = tmp_path / "big-image.tar"
    with tarfile.open(img, "w") as tf:
        with tarfile.open(busybox_tarball()) as src:
            for m in src.getmembers():
                tf.addfile(m, src.extractfile(m) if m.isreg() else None)
        ti = tarfile.TarInfo("rootfs/big.bin")
        data = tmp_path / "payload"
        data.write_bytes(os.urandom(1 << 20) * (SIZE_MB + 8))
        ti.size = data.stat().st_size
        with open(data, "rb") as f:
            tf.addfile(ti, f)
    before = d.api("GET", "/1.0/images").json()["metadata"]
    r = d.lxc("image", "import", str(img), "--alias", "toobig", check=False)
    assert r.returncode != 0
    assert_clear(r.stderr, "No space left on the storage holding images", str(d.lxd_dir / "images"))
    assert d.api("GET", "/1.0/images").json()["metadata"] == before
    assert d.api("GET", "/1.0/images/aliases/toobig").status_code == 404
    assert images_leftovers(d) == set()
    healthy(d)
    # with room again, an import works
    small_img = tmp_path / "busybox-again.tar.gz"
    with tarfile.open(busybox_tarball()) as src, tarfile.open(small_img, "w:gz") as tf:
        for m in src.getmembers():
            tf.addfile(m, src.extractfile(m) if m.isreg() else None)
        extra = tarfile.TarInfo("rootfs/extra.txt")
        extra.size = 3
        import io
        tf.addfile(extra, io.BytesIO(b"new"))
    d.lxc("image", "import", str(small_img), "--alias", "again")
    assert d.api("GET", "/1.0/images/aliases/again").status_code == 200


def test_publish_without_space(small):
    d = small
    c = d.container
    d.lxc("stop", c, "-f")
    fill(d, leave=256 << 10)
    try:
        before = d.api("GET", "/1.0/images").json()["metadata"]
        r = d.lxc("publish", c, "--alias", "pub", check=False)
        assert r.returncode != 0
        assert_clear(r.stderr, "No space left")
        assert "images" in r.stderr or "database" in r.stderr, r.stderr
        assert d.api("GET", "/1.0/images").json()["metadata"] == before
        assert images_leftovers(d) == set()
    finally:
        free_space(d)
    d.lxc("publish", c, "--alias", "pub")
    assert d.api("GET", "/1.0/images/aliases/pub").status_code == 200
    d.lxc("start", c)
    healthy(d)


def test_database_write_without_space(small):
    d = small
    p = run_prefix() + "-prof"
    fill(d, leave=0)
    try:
        for _ in range(3):  # whatever the SQLite pages and WAL had free, this runs out
            r = d.api("POST", "/1.0/profiles", json={"name": p, "config": {"user.x": "y" * 200000}})
            if r.status_code not in (200, 201):
                break
            d.api("DELETE", f"/1.0/profiles/{p}")
        assert r.status_code == 507, r.text
        assert_clear(r.json()["error"], "No space left on the storage holding the database")
        assert d.api("GET", f"/1.0/profiles/{p}").status_code == 404
    finally:
        free_space(d)
    healthy(d)
    r = d.api("POST", "/1.0/profiles", json={"name": p, "config": {"user.x": "y"}})
    assert r.status_code == 201, r.text
    d.lxd("sql", "local", "SELECT 1")
