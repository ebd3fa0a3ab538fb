"""Issue 12: storage volumes per project, through the stock client (`lxc storage volume ... --project P`).

A project with features.storage.volumes has custom volumes of its own (on disk
`custom/<project>_<name>`); one without it uses default's. An instance's root volume is listed in
its project under its own name (`container/c1`), stored as `containers/<project>_c1`. Runs on the
shared daemon (dir pool `default`): every project and volume here has a unique name and goes after
its test.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import Daemon, busybox_tarball, run_prefix

pytestmark = pytest.mark.integration

POOL = "default"



def volumes(d: Daemon, project: str, vtype: str | None = None) -> list[dict]:
    out = json.loads(d.lxc("storage", "volume", "list", POOL, "--project", project, "--format", "json").stdout)
    return [v for v in out if vtype is None or v["type"] == vtype]


def custom_names(d: Daemon, project: str) -> list[str]:
    return sorted(v["name"] for v in volumes(d, project, "custom"))


def show(d: Daemon, name: str, project: str) -> dict:
    return yaml.safe_load(d.lxc("storage", "volume", "show", POOL, name, "--project", project).stdout)


def fails(d: Daemon, *args: str) -> str:
    r = d.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {' '.join(args)} succeeded: {r.stdout}"
    return r.stderr


def test_project_custom_volumes_are_its_own(ready, projects, tmp_path):
    d = ready
    p1 = projects("v")
    pool_dir = d.lxd_dir / "storage-pools" / POOL
    v = run_prefix()
    d.lxc("storage", "volume", "create", POOL, v, "--project", p1)
    assert v in custom_names(d, p1) and v not in custom_names(d, "default")
    assert show(d, v, p1)["project"] == p1
    assert (pool_dir / "custom" / f"{p1}_{v}").is_dir()
    fails(d, "storage", "volume", "show", POOL, v)  # not default's
    # The same name in default is another volume.
    d.lxc("storage", "volume", "create", POOL, v)
    try:
        d.lxc("storage", "volume", "set", POOL, v, "user.where=p1", "--project", p1)
        assert show(d, v, p1)["config"].get("user.where") == "p1"
        assert "user.where" not in show(d, v, "default")["config"]
    finally:
        d.lxc("storage", "volume", "delete", POOL, v)
    assert (pool_dir / "custom" / f"{p1}_{v}").is_dir()

    # URLs carry the project: the listing, the project's and the pool's used_by.
    url = f"/1.0/storage-pools/{POOL}/volumes/custom/{v}?project={p1}"
    assert url in d.api("GET", f"/1.0/storage-pools/{POOL}/volumes?project={p1}").json()["metadata"]
    assert url in yaml.safe_load(d.lxc("project", "show", p1).stdout)["used_by"]
    assert url in yaml.safe_load(d.lxc("storage", "show", POOL).stdout)["used_by"]
    assert "Only empty projects" in fails(d, "project", "delete", p1)

    # Snapshots, copies, export and import stay in the project.
    d.lxc("storage", "volume", "snapshot", POOL, v, "snap0", "--project", p1)
    assert f"{v}/snap0" in custom_names(d, p1)
    assert show(d, f"{v}/snap0", p1)["name"] == "snap0"
    d.lxc("storage", "volume", "copy", f"{POOL}/{v}", f"{POOL}/{v}-copy", "--project", p1)
    tarball = tmp_path / "v.tar.gz"
    d.lxc("storage", "volume", "export", POOL, v, str(tarball), "--project", p1)
    d.lxc("storage", "volume", "import", POOL, str(tarball), f"{v}-imp", "--project", p1)
    assert {f"{v}-copy", f"{v}-imp"} <= set(custom_names(d, p1))
    assert not {f"{v}-copy", f"{v}-imp"} & set(custom_names(d, "default"))
    assert (pool_dir / "custom" / f"{p1}_{v}-imp").is_dir()

    # An instance of p1: its root volume is listed in p1 by its name; attached volumes show it.
    c1 = run_prefix()
    d.lxc("init", "busybox", c1, "-s", POOL, "--project", "default", check=False)  # default's c1 too
    try:
        d.lxc("image", "import", str(busybox_tarball()), "--alias", "busybox", "--project", p1)
        d.lxc("init", "busybox", c1, "-s", POOL, "--project", p1)
        conts = {x["name"]: x for x in volumes(d, p1, "container")}
        assert list(conts) == [c1] and conts[c1]["used_by"] == [f"/1.0/instances/{c1}?project={p1}"]
        assert (pool_dir / "containers" / f"{p1}_{c1}").is_dir() and (pool_dir / "containers" / c1).is_dir()
        assert c1 in [x["name"] for x in volumes(d, "default", "container")]
        d.lxc("storage", "volume", "attach", POOL, v, c1, "/mnt", "--project", p1)
        assert show(d, v, p1)["used_by"] == [f"/1.0/instances/{c1}?project={p1}"]
        assert "still in use" in fails(d, "storage", "volume", "delete", POOL, v, "--project", p1)
        d.lxc("storage", "volume", "detach", POOL, v, c1, "--project", p1)
        assert show(d, v, p1)["used_by"] == []
    finally:
        d.lxc("delete", c1, "--project", p1, check=False)
        d.lxc("delete", c1, check=False)
        d.lxc("image", "delete", "busybox", "--project", p1, check=False)
    for name in (f"{v}-copy", f"{v}-imp", v):
        d.lxc("storage", "volume", "delete", POOL, name, "--project", p1)
    assert not (pool_dir / "custom" / f"{p1}_{v}").exists()


def test_a_project_without_the_feature_uses_defaults_volumes(ready, projects):
    d = ready
    p2 = projects("n", "features.storage.volumes=false")
    v = run_prefix()
    d.lxc("storage", "volume", "create", POOL, v, "--project", p2)
    try:
        assert v in custom_names(d, "default") and v in custom_names(d, p2)
        assert show(d, v, p2)["project"] == "default"
        assert (d.lxd_dir / "storage-pools" / POOL / "custom" / f"default_{v}").is_dir()
        assert not [u for u in yaml.safe_load(d.lxc("project", "show", p2).stdout)["used_by"] if "/volumes/" in u]
    finally:
        d.lxc("storage", "volume", "delete", POOL, v)


def test_limits_disk_applies_per_project(ready, projects):
    """p3's limits.disk needs a size on p3's volumes (a dir pool here can't enforce sizes, so the
    aggregate itself is tested on btrfs in test_project_limits.py); default's volumes don't."""
    d = ready
    p3 = projects("d", "limits.disk=50MiB")
    v = run_prefix()
    err = fails(d, "storage", "volume", "create", POOL, v, "--project", p3)
    assert f'Custom volume "{v}" in project "{p3}" has no "size" config set' in err, err
    assert v not in custom_names(d, p3)
    d.lxc("storage", "volume", "create", POOL, v)  # default has no such limit
    d.lxc("storage", "volume", "delete", POOL, v)


def test_volume_moves_to_another_project_with_its_snapshots_and_content(ready, projects):
    """`lxc storage volume move --target-project`: the volume leaves its project with its data and
    snapshots; a project that doesn't exist is "not found"."""
    d = ready
    p1, p2 = projects("mv1"), projects("mv2")
    pool_dir = d.lxd_dir / "storage-pools" / POOL
    v = run_prefix() + "m"
    d.lxc("storage", "volume", "create", POOL, v, "--project", p1)
    (pool_dir / "custom" / f"{p1}_{v}" / "data.txt").write_text("moved\n")
    d.lxc("storage", "volume", "snapshot", POOL, v, "s0", "--project", p1)
    d.lxc("storage", "volume", "move", f"{POOL}/{v}", f"{POOL}/{v}", "--project", p1, "--target-project", p2)
    assert v not in custom_names(d, p1) and v in custom_names(d, p2)
    assert (pool_dir / "custom" / f"{p2}_{v}" / "data.txt").read_text() == "moved\n"
    assert not (pool_dir / "custom" / f"{p1}_{v}").exists()
    assert [s["name"] for s in volumes(d, p2, "custom") if s["name"].startswith(v + "/")] == [f"{v}/s0"]
    assert "not found" in fails(d, "storage", "volume", "move", f"{POOL}/{v}", f"{POOL}/{v}",
                                "--project", p2, "--target-project", "nosuchproject").lower()


def test_volume_list_all_projects(ready, projects):
    """`lxc storage volume list --all-projects`: every project's volumes, each once, with its project."""
    d = ready
    p1, p2 = projects("al1"), projects("al2", "features.storage.volumes=false")
    v = run_prefix() + "a"
    d.lxc("storage", "volume", "create", POOL, v, "--project", p1)
    d.lxc("storage", "volume", "create", POOL, v + "d", "--project", p2)  # lands in default
    try:
        out = json.loads(d.lxc("storage", "volume", "list", POOL, "--all-projects", "--format", "json").stdout)
        got = sorted((x["project"], x["name"]) for x in out if x["type"] == "custom" and x["name"].startswith(v))
        assert got == [("default", v + "d"), (p1, v)]
        urls = d.api("GET", f"/1.0/storage-pools/{POOL}/volumes/custom?all-projects=true").json()["metadata"]
        assert f"/1.0/storage-pools/{POOL}/volumes/custom/{v}?project={p1}" in urls
        assert f"/1.0/storage-pools/{POOL}/volumes/custom/{v}d" in urls
    finally:
        d.lxc("storage", "volume", "delete", POOL, v + "d", check=False)
