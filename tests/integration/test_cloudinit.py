"""cloud-init through the stock client: an image carrying LXD's NoCloud seed templates (the busybox
test image plus the four templates), the seed files rendered from the instance's keys, and
`volatile.cloud-init.instance-id` set at create and rotated by cloud-init key changes (instance
and profile), rename and copy, and re-rendered into meta-data at the next start."""

from __future__ import annotations

import io
import tarfile
import uuid

import pytest
import yaml

from lxd_daemon.instances import cloudinit as ci
from tests.helpers import busybox_tarball, run_prefix

pytestmark = pytest.mark.integration

SEED = "/var/lib/cloud/seed/nocloud-net"
ID = "volatile.cloud-init.instance-id"


def with_cloud_init_templates(src, dst) -> None:
    """The busybox image with the four cloud-init templates added to metadata.yaml/templates/."""
    files, entries = ci.image_templates()
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            if m.name == "metadata.yaml":
                meta = yaml.safe_load(data)
                meta["templates"].update(entries)
                data = yaml.safe_dump(meta).encode()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
        for name, text in files.items():
            info = tarfile.TarInfo(f"templates/{name}")
            info.size, info.mode, info.mtime = len(text.encode()), 0o644, 1
            tout.addfile(info, io.BytesIO(text.encode()))


@pytest.fixture(scope="module")
def ci_image(ready, tmp_path_factory):
    path = tmp_path_factory.mktemp("ci-img") / "busybox-ci.tar.gz"
    with_cloud_init_templates(busybox_tarball(), path)
    alias = f"{run_prefix()}-ci"
    ready.lxc("image", "import", str(path), "--alias", alias)
    try:
        yield alias
    finally:
        ready.lxc("image", "delete", alias, check=False)


def iid(d, name: str) -> str:
    return d.lxc("config", "get", name, ID).stdout.strip()


def seed(d, name: str) -> dict[str, str]:
    r = d.lxc("exec", name, "--", "sh", "-c",
              f"for f in meta-data user-data vendor-data network-config; do cat {SEED}/$f; echo '@@'; done")
    parts = r.stdout.split("@@\n")
    return dict(zip(("meta-data", "user-data", "vendor-data", "network-config"), parts, strict=False))


USER_DATA = "#cloud-config\nwrite_files:\n- path: /etc/hello\n  content: hi\n"
USER_DATA2 = "#cloud-config\nruncmd:\n- [touch, /run/second]\n"


def test_seed_rendered_and_instance_id_rotated(ready, ci_image, names):
    d = ready
    c = names("ci")
    d.lxc("init", ci_image, c, "-c", f"cloud-init.user-data={USER_DATA}", "-c", "user.user-data=#cloud-config\nx: 1")
    first = iid(d, c)
    assert uuid.UUID(first)
    d.lxc("start", c)
    files = seed(d, c)
    assert files["user-data"] == USER_DATA + "\n"  # cloud-init.* wins over user.*
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": first, "local-hostname": c}
    assert files["vendor-data"] == "#cloud-config\n{}\n"
    assert yaml.safe_load(files["network-config"])["config"][0]["name"] == "eth0"

    # other keys leave the id alone; a cloud-init key changes it (on a running instance too)
    d.lxc("config", "set", c, "user.other=1")
    d.lxc("config", "set", c, "user.meta-data=public-keys: k")  # (as LXD: not a rotating key)
    assert iid(d, c) == first
    d.lxc("config", "set", c, f"cloud-init.user-data={USER_DATA2}")
    second = iid(d, c)
    assert uuid.UUID(second) and second != first
    assert yaml.safe_load(seed(d, c)["meta-data"])["instance-id"] == first  # until the next start
    d.lxc("stop", "-f", c)
    d.lxc("start", c)
    files = seed(d, c)
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": second, "local-hostname": c, "public-keys": "k"}
    assert files["user-data"] == USER_DATA2 + "\n"
    d.lxc("stop", "-f", c)

    # a `lxc config edit` (PUT) that leaves the key out keeps it
    conf = yaml.safe_load(d.lxc("config", "show", c).stdout)
    conf["config"].pop(ID)
    conf["config"]["user.more"] = "2"
    d.lxc("config", "edit", c, input=yaml.safe_dump(conf))
    assert iid(d, c) == second
    # a bad value is refused, the id untouched
    r = d.lxc("config", "set", c, "cloud-init.user-data=#cloud-config\nfoo: [", check=False)
    assert r.returncode != 0 and "cloud-init.user-data" in r.stderr
    r = d.lxc("config", "set", c, f"{ID}=nope", check=False)
    assert r.returncode != 0 and ID in r.stderr
    assert iid(d, c) == second


def test_profile_rename_and_copy_rotate(ready, ci_image, names):
    d = ready
    c, p = names("cip"), names("cipp")
    d.lxc("init", ci_image, c)
    first = iid(d, c)
    d.lxc("profile", "create", p)
    d.lxc("profile", "set", p, "user.unrelated=1")
    d.lxc("profile", "add", c, p)  # the expanded cloud-init keys are unchanged
    assert iid(d, c) == first
    d.lxc("profile", "set", p, "cloud-init.vendor-data=#cloud-config\nv: 1")
    second = iid(d, c)
    assert second != first
    d.lxc("profile", "set", p, "user.unrelated=2")
    assert iid(d, c) == second
    d.lxc("config", "set", c, "cloud-init.vendor-data=#cloud-config\nv: 1")  # same expanded value
    assert iid(d, c) == second
    # copy: its own id; rename: a new one
    c2, c3 = names("cic"), names("cir")
    d.lxc("copy", c, c2)
    assert uuid.UUID(iid(d, c2)) and iid(d, c2) != second
    d.lxc("move", c, c3)
    third = iid(d, c3)
    assert uuid.UUID(third) and third != second
    # the copy gets the templates at its first start (`copy` and `start` triggers): its own id
    d.lxc("start", c2)
    r = d.lxc("exec", c2, "--", "cat", f"{SEED}/meta-data", f"{SEED}/vendor-data")
    assert f"instance-id: {iid(d, c2)}\nlocal-hostname: {c2}\n" in r.stdout
    assert "#cloud-config\nv: 1\n" in r.stdout


def test_restore_of_other_cloud_init_data_rotates(ready, names):
    """`lxc restore` to a snapshot whose cloud-init keys differ gets a new instance-id (cloud-init
    runs again), as an update would; one whose keys are the same keeps it."""
    d = ready
    c = names("cr")
    d.lxc("init", "busybox", c, "-c", "cloud-init.user-data=#cloud-config\n{}")

    def iid() -> str:
        return d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["config"]["volatile.cloud-init.instance-id"]

    d.lxc("snapshot", c, "s0")
    first = iid()
    d.lxc("restore", c, "s0")
    assert iid() == first  # same keys: same id
    d.lxc("config", "set", c, "cloud-init.user-data", "#cloud-config\nhostname: x")
    second = iid()
    assert second != first
    d.lxc("restore", c, "s0")
    assert iid() not in (first, second)
