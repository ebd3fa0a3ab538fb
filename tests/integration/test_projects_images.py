"""Issue 12: images and aliases per project, through the stock client (`lxc image ... --project P`).

A project with features.images has images and aliases of its own; one without it sees and uses
default's. The same image in two projects is two rows over one set of files, removed with the
last row. Runs on the shared daemon: every project here has a unique name and goes (with what it
holds) after its test.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import Daemon, busybox_tarball, run_prefix

pytestmark = pytest.mark.integration



def images(d: Daemon, project: str) -> list[dict]:
    return json.loads(d.lxc("image", "list", "--project", project, "--format", "json").stdout)


def aliases(d: Daemon, project: str) -> list[str]:
    out = json.loads(d.lxc("image", "alias", "list", "--project", project, "--format", "json").stdout)
    return sorted(a["name"] for a in out)


def target(d: Daemon, alias: str, project: str = "default") -> str:
    """The fingerprint an alias of `project` names (`lxc image alias list` has it)."""
    out = json.loads(d.lxc("image", "alias", "list", "--project", project, "--format", "json").stdout)
    return next(a["target"] for a in out if a["name"] == alias)


def fails(d: Daemon, *args: str) -> str:
    r = d.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {' '.join(args)} succeeded: {r.stdout}"
    return r.stderr


def test_project_images_are_its_own(ready, projects):
    d = ready
    p1 = projects("i")
    fp = target(d, "busybox")
    assert images(d, p1) == [] and aliases(d, p1) == []
    fails(d, "image", "show", "busybox", "--project", p1)

    # The image default has, imported into p1 under another alias: a row of p1's own.
    b = run_prefix()
    d.lxc("image", "import", str(busybox_tarball()), "--alias", b, "--project", p1)
    [img] = images(d, p1)
    assert img["fingerprint"] == fp and [a["name"] for a in img["aliases"]] == [b]
    assert aliases(d, p1) == [b]
    assert b not in aliases(d, "default")
    fails(d, "image", "show", b)  # p1's alias is not default's
    assert "already exists" in fails(d, "image", "import", str(busybox_tarball()), "--project", p1)
    # URLs, events and the project's used_by carry the project.
    listing = d.api("GET", f"/1.0/images?project={p1}").json()["metadata"]
    assert listing == [f"/1.0/images/{fp}?project={p1}"]
    assert d.api("GET", f"/1.0/images/aliases?project={p1}").json()["metadata"] == [
        f"/1.0/images/aliases/{b}?project={p1}"]
    assert f"/1.0/images/{fp}?project={p1}" in yaml.safe_load(d.lxc("project", "show", p1).stdout)["used_by"]
    assert "Only empty projects" in fails(d, "project", "delete", p1)

    # Edits in p1 leave default's row alone, and the other way round.
    d.lxc("image", "set-property", fp, "user.where", "p1", "--project", p1)
    assert yaml.safe_load(d.lxc("image", "show", fp, "--project", p1).stdout)["properties"]["user.where"] == "p1"
    assert "user.where" not in yaml.safe_load(d.lxc("image", "show", fp).stdout)["properties"]
    d.lxc("image", "alias", "create", f"{b}-2", fp, "--project", p1)
    assert aliases(d, p1) == [b, f"{b}-2"] and f"{b}-2" not in aliases(d, "default")
    d.lxc("image", "alias", "rename", f"{b}-2", f"{b}-3", "--project", p1)
    d.lxc("image", "alias", "delete", f"{b}-3", "--project", p1)
    assert aliases(d, p1) == [b]

    # Deleting p1's row keeps the files default's row uses.
    d.lxc("image", "delete", fp, "--project", p1)
    assert images(d, p1) == [] and aliases(d, p1) == []
    assert (d.lxd_dir / "images" / fp).is_file()
    assert target(d, "busybox") == fp
    d.lxc("project", "delete", p1)


def test_a_project_without_the_feature_uses_defaults_images(ready, projects):
    d = ready
    p2 = projects("n", "features.images=false")
    fp = target(d, "busybox")
    assert fp in [i["fingerprint"] for i in images(d, p2)]
    assert "busybox" in aliases(d, p2)
    assert target(d, "busybox", p2) == fp
    assert "public" in yaml.safe_load(d.lxc("image", "show", "busybox", "--project", p2).stdout)
    # An alias made through p2 is default's.
    a = run_prefix()
    d.lxc("image", "alias", "create", a, fp, "--project", p2)
    try:
        assert a in aliases(d, "default")
    finally:
        d.lxc("image", "alias", "delete", a)
    # The project holds no images of its own.
    assert not [u for u in yaml.safe_load(d.lxc("project", "show", p2).stdout)["used_by"] if "/images/" in u]


def test_launch_and_publish_in_a_project(ready, projects):
    d = ready
    p1 = projects("l")
    b = run_prefix()
    d.lxc("image", "import", str(busybox_tarball()), "--alias", b, "--project", p1)
    c1 = run_prefix()
    assert "not found" in fails(d, "init", b, c1, "-s", "default").lower()  # default doesn't know p1's alias
    d.lxc("init", b, c1, "--project", p1, "-s", "default")  # p1's own default profile has no root disk
    pub = run_prefix()
    d.lxc("publish", c1, "--project", p1, "--alias", pub)
    assert pub in aliases(d, p1) and pub not in aliases(d, "default")
    new_fp = target(d, pub, p1)
    assert new_fp not in [i["fingerprint"] for i in images(d, "default")]
    assert "not found" in fails(d, "publish", c1, "--alias", pub).lower()  # default has no such instance
    d.lxc("delete", c1, "--project", p1)
    d.lxc("image", "delete", pub, "--project", p1)
    assert not (d.lxd_dir / "images" / new_fp).exists()  # the last row took the files with it
