"""`storage.images_volume` and `storage.backups_volume`: the image store and the backups on a
custom volume, set and unset with the stock client, kept across a restart; the volume is in use
by the server meanwhile."""

from __future__ import annotations

import os

import pytest

from tests.helpers import ensure_containers_ready

pytestmark = pytest.mark.integration


def _tree(p):
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


def test_images_and_backups_on_a_custom_volume(fresh_daemon, tmp_path):
    d = fresh_daemon.start()
    ensure_containers_ready(d)
    fp = d.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    d.lxc("storage", "volume", "create", "default", "store")
    d.lxc("init", "busybox", "c1")
    d.lxc("query", "--wait", "-X", "POST", "/1.0/instances/c1/backups", "--data", '{"name": "b0"}')
    images, backups = d.lxd_dir / "images", d.lxd_dir / "backups"
    before_i, before_b = _tree(images), _tree(backups)
    assert any(x.endswith("b0") for x in before_b), before_b
    vol = d.lxd_dir / "storage-pools" / "default" / "custom" / "default_store"

    d.lxc("config", "set", "storage.images_volume", "default/store")
    d.lxc("config", "set", "storage.backups_volume", "default/store")
    assert images.is_symlink() and images.resolve() == (vol / "images").resolve()
    assert backups.is_symlink() and backups.resolve() == (vol / "backups").resolve()
    assert _tree(vol / "images") == before_i and _tree(vol / "backups") == before_b
    assert oct(os.stat(vol / "images").st_mode & 0o777) == "0o700"
    # The server uses the volume: it can't go, and the API says who uses it.
    r = d.lxc("storage", "volume", "delete", "default", "store", check=False)
    assert r.returncode != 0 and "in use" in r.stderr
    got = d.api("GET", "/1.0/storage-pools/default/volumes/custom/store").json()["metadata"]
    assert got["used_by"] == ["/1.0"]
    # Everything works from there, also after a restart: launch, export, backups.
    d.lxc("init", "busybox", "c2")
    out = tmp_path / "c1.tar.gz"
    d.lxc("export", "c1", str(out))
    assert out.stat().st_size > 0
    d.stop()
    d.start()
    d.lxc("start", "c2")
    assert d.api("GET", f"/1.0/images/{fp}").status_code == 200
    d.lxc("delete", "-f", "c2")
    # Bad values: clear refusals, nothing moved.
    for value, words in (("nope/store", "doesn't exist"), ("default/missing", "doesn't exist"),
                         ("default", "POOL/VOLUME")):
        r = d.lxc("config", "set", "storage.images_volume", value, check=False)
        assert r.returncode != 0 and words in r.stderr, (value, r.stderr)
    assert images.resolve() == (vol / "images").resolve()
    # Unset: back into plain directories, with their content.
    d.lxc("config", "unset", "storage.images_volume")
    d.lxc("config", "unset", "storage.backups_volume")
    assert not images.is_symlink() and images.is_dir() and not backups.is_symlink()
    assert _tree(images) == before_i and _tree(backups) == before_b
    assert not (vol / "images").exists() and not (vol / "backups").exists()
    d.lxc("delete", "c1")
    d.lxc("storage", "volume", "delete", "default", "store")
