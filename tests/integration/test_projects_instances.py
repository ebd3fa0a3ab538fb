"""Instances in projects (issue 12), service side: an instance is (project, name), named on the host
by its storage name (`p1_c1`) and in the API by its own name with its project.

Runs on the shared daemon with projects of unique names (removed, with their instances, after
the module). Two container starts in all: the same name running in two projects at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.helpers import Daemon, api_ok, run_prefix, wait_op

pytestmark = pytest.mark.integration




def create(d: Daemon, project: str, name: str, **extra) -> httpx.Response:
    body = {"name": name, "source": {"type": "image", "alias": "busybox"}, **extra}
    return d.api("POST", f"/1.0/instances?project={project}", json=body)


def create_ok(d: Daemon, project: str, name: str, **extra) -> None:
    r = create(d, project, name, **extra)
    assert r.status_code == 202, r.text
    op = wait_op(d, r)
    assert op["status"] == "Success", op


def names_in(d: Daemon, project: str) -> list[str]:
    urls = api_ok(d, "GET", f"/1.0/instances?project={project}")
    return sorted(u.split("?")[0].rsplit("/", 1)[-1] for u in urls)


def delete_all(d: Daemon, project: str) -> None:
    for n in names_in(d, project):
        d.api("PUT", f"/1.0/instances/{n}/state?project={project}", json={"action": "stop", "force": True})
        r = d.api("DELETE", f"/1.0/instances/{n}?project={project}")
        if r.status_code == 202:
            wait_op(d, r)


@pytest.fixture(scope="module")
def projects(ready):
    """Two projects: `a` uses default's images and profiles; `b` has its own profiles (its
    default profile given the root disk) and default's images."""
    prefix = run_prefix()
    a, b = f"{prefix}a", f"{prefix}b"
    api_ok(ready, "POST", "/1.0/projects", json={"name": a, "config": {
        "features.images": "false", "features.profiles": "false"}})
    api_ok(ready, "POST", "/1.0/projects", json={"name": b, "config": {
        "features.images": "false", "features.profiles": "true"}})
    try:
        api_ok(ready, "PATCH", f"/1.0/profiles/default?project={b}", json={
            "devices": {"root": {"type": "disk", "path": "/", "pool": "default"}}})
        yield a, b
    finally:
        for p in (a, b):
            delete_all(ready, p)
            for prof in api_ok(ready, "GET", f"/1.0/profiles?project={p}"):
                pname = prof.split("?")[0].rsplit("/", 1)[-1]
                if p == b and pname != "default":
                    ready.api("DELETE", f"/1.0/profiles/{pname}?project={p}")
            ready.api("DELETE", f"/1.0/projects/{p}")


def test_same_name_runs_in_two_projects(ready, projects, names):
    a, _ = projects
    c = names("c1")
    create_ok(ready, "default", c)
    create_ok(ready, a, c)
    lxd_dir = Path(ready.lxd_dir)
    try:
        api_ok(ready, "PUT", f"/1.0/instances/{c}/state", json={"action": "start"})
        api_ok(ready, "PUT", f"/1.0/instances/{c}/state?project={a}", json={"action": "start"})
        # Distinct host names: liblxc directory, log directory, cgroups.
        assert (lxd_dir / "containers" / c).is_dir()
        assert (lxd_dir / "containers" / f"{a}_{c}").is_dir()
        assert (lxd_dir / "logs" / f"{a}_{c}" / "lxc.conf").is_file()
        conf = (lxd_dir / "logs" / f"{a}_{c}" / "lxc.conf").read_text()
        assert f"lxc.uts.name = {c}\n" in conf
        # The API shows the instance's own name and its project.
        inst = api_ok(ready, "GET", f"/1.0/instances/{c}?project={a}")
        assert (inst["name"], inst["project"], inst["status"]) == (c, a, "Running")
        assert api_ok(ready, "GET", f"/1.0/instances/{c}")["project"] == "default"
        st_a = api_ok(ready, "GET", f"/1.0/instances/{c}/state?project={a}")
        st_d = api_ok(ready, "GET", f"/1.0/instances/{c}/state")
        assert st_a["pid"] > 0 and st_d["pid"] > 0 and st_a["pid"] != st_d["pid"]
        for pid, host_name in ((st_a["pid"], f"{a}_{c}"), (st_d["pid"], c)):
            with open(f"/proc/{pid}/cgroup") as f:
                assert f"/lxc.payload.{host_name}" in f.read()
        # Inside, the host name is the instance's own name.
        with open(f"/proc/{st_a['pid']}/root/etc/hostname") as f:
            assert f.read().strip() == c
        r = ready.lxc("exec", "--project", a, c, "--", "hostname", check=False)
        if r.returncode == 0:
            assert r.stdout.strip() == c
        # The stock client, per project.
        out = ready.lxc("list", "--project", a, "--format", "json").stdout
        assert [(i["name"], i["project"]) for i in json.loads(out)] == [(c, a)]
        # The project lists it in used_by, with its project.
        used = api_ok(ready, "GET", f"/1.0/projects/{a}")["used_by"]
        assert f"/1.0/instances/{c}?project={a}" in used
        # Deleting the project is refused while it holds an instance.
        r = ready.api("DELETE", f"/1.0/projects/{a}")
        assert r.status_code == 400, r.text
    finally:
        for p in ("default", a):
            ready.api("PUT", f"/1.0/instances/{c}/state?project={p}", json={"action": "stop", "force": True})
    # Stopped: the default one is untouched by the other's delete.
    r = ready.api("DELETE", f"/1.0/instances/{c}?project={a}")
    assert r.status_code == 202, r.text
    assert wait_op(ready, r)["status"] == "Success"
    assert not (lxd_dir / "containers" / f"{a}_{c}").exists()
    assert not (lxd_dir / "logs" / f"{a}_{c}").exists()
    assert (lxd_dir / "containers" / c / "rootfs").is_dir()
    assert api_ok(ready, "GET", f"/1.0/instances/{c}")["name"] == c
    assert ready.api("GET", f"/1.0/instances/{c}?project={a}").status_code == 404


def test_rename_copy_in_project(ready, projects, names):
    a, _ = projects
    c, c2, c3 = names("c1"), names("c2"), names("c3")
    create_ok(ready, "default", c)
    create_ok(ready, a, c)
    lxd_dir = Path(ready.lxd_dir)
    # rename in `a`: the default one keeps its name and volume
    api_ok(ready, "POST", f"/1.0/instances/{c}?project={a}", json={"name": c2})
    assert names_in(ready, a) == [c2]
    assert (lxd_dir / "containers" / f"{a}_{c2}" / "rootfs").is_dir()
    assert not (lxd_dir / "containers" / f"{a}_{c}").exists()
    assert (lxd_dir / "containers" / c / "rootfs").is_dir()
    assert api_ok(ready, "GET", f"/1.0/instances/{c}")["name"] == c
    # a name taken in default is free in `a`, and the reverse
    api_ok(ready, "POST", f"/1.0/instances/{c2}?project={a}", json={"name": c})
    # copy within `a`: the source is named in the request's project
    api_ok(ready, "POST", f"/1.0/instances?project={a}", json={
        "name": c3, "source": {"type": "copy", "source": c}})
    assert names_in(ready, a) == sorted([c, c3])
    assert (lxd_dir / "containers" / f"{a}_{c3}" / "rootfs").is_dir()
    assert ready.api("GET", f"/1.0/instances/{c3}").status_code == 404
    # a source in another project, named by source.project
    api_ok(ready, "POST", "/1.0/instances", json={
        "name": c3, "source": {"type": "copy", "source": c3, "project": a}})
    assert (lxd_dir / "containers" / c3 / "rootfs").is_dir()
    # a source that exists only in another project is not found
    r = ready.api("POST", f"/1.0/instances?project={a}", json={
        "name": names("c4"), "source": {"type": "copy", "source": c2}})
    assert r.status_code == 404, r.text
    delete_all(ready, a)
    assert not any(e.startswith(f"{a}_") for e in os.listdir(lxd_dir / "containers"))
    assert (lxd_dir / "containers" / c / "rootfs").is_dir()


def test_limits_per_project(ready, projects, names):
    a, b = projects
    api_ok(ready, "PATCH", f"/1.0/projects/{a}", json={"config": {"limits.instances": "2"}})
    try:
        x, y, z = names("x"), names("y"), names("z")
        create_ok(ready, a, x)
        create_ok(ready, a, y)
        r = create(ready, a, z)
        assert r.status_code == 400, r.text
        assert "limits.instances" in r.json()["error"] or "instances" in r.json()["error"], r.text
        # default is unaffected
        create_ok(ready, "default", z)
        state = api_ok(ready, "GET", f"/1.0/projects/{a}/state")
        assert state["resources"]["instances"] == {"limit": 2, "usage": 2}
        # stock client
        r = ready.lxc("init", "busybox", names("w"), "--project", a, check=False)
        assert r.returncode != 0
        # restrictions are the project's too (a restricted project has its own profiles)
        create_ok(ready, b, x)
        api_ok(ready, "PATCH", f"/1.0/projects/{b}", json={"config": {"restricted": "true"}})
        r = create(ready, b, names("priv"), config={"security.privileged": "true"})
        assert r.status_code == 400 and "security.privileged" in r.json()["error"], r.text
        r = ready.api("PATCH", f"/1.0/instances/{x}?project={b}", json={"config": {"security.nesting": "true"}})
        assert r.status_code == 400 and "security.nesting" in r.json()["error"], r.text
        r = ready.api("PATCH", f"/1.0/profiles/default?project={b}", json={"config": {"security.nesting": "true"}})
        assert r.status_code == 400 and "security.nesting" in r.json()["error"], r.text
        create_ok(ready, "default", names("priv"), config={"security.privileged": "true"})
    finally:
        delete_all(ready, a)
        delete_all(ready, b)
        api_ok(ready, "PATCH", f"/1.0/projects/{a}", json={"config": {"limits.instances": ""}})
        api_ok(ready, "PATCH", f"/1.0/projects/{b}", json={"config": {"restricted": ""}})


def test_profile_edit_checks_only_its_users(ready, projects, names):
    _, b = projects
    prof, c_def, c_b = names("prof"), names("cd"), names("cb")
    api_ok(ready, "POST", "/1.0/profiles", json={"name": prof})
    api_ok(ready, "POST", f"/1.0/profiles?project={b}", json={"name": prof})
    create_ok(ready, "default", c_def, profiles=["default", prof])
    bad = {"devices": {"vol": {"type": "disk", "pool": "default", "source": "nosuchvolume", "path": "/mnt"}}}
    # b's profile of that name is unused: the change passes, default's instance isn't looked at
    api_ok(ready, "PATCH", f"/1.0/profiles/{prof}?project={b}", json=bad)
    api_ok(ready, "PUT", f"/1.0/profiles/{prof}?project={b}", json={"config": {}, "devices": {}})
    # default's is used by c_def: refused, naming it
    r = ready.api("PATCH", f"/1.0/profiles/{prof}", json=bad)
    assert r.status_code == 400, r.text
    assert c_def in r.json()["error"]
    # an instance of b uses b's profiles: b's change is checked against it and names its project
    create_ok(ready, b, c_b, profiles=["default", prof])
    assert api_ok(ready, "GET", f"/1.0/profiles/{prof}?project={b}")["used_by"] == [
        f"/1.0/instances/{c_b}?project={b}"]
    assert api_ok(ready, "GET", f"/1.0/profiles/{prof}")["used_by"] == [f"/1.0/instances/{c_def}"]
    r = ready.api("PATCH", f"/1.0/profiles/{prof}?project={b}", json=bad)
    assert r.status_code == 400, r.text
    assert c_b in r.json()["error"] and b in r.json()["error"]
    # instances of b can't use default's profiles
    only = names("only")
    api_ok(ready, "POST", "/1.0/profiles", json={"name": only})
    r = create(ready, b, names("cx"), profiles=["default", only])
    assert r.status_code == 400, r.text
    assert "doesn't exist" in r.json()["error"]
    delete_all(ready, b)
    ready.api("DELETE", f"/1.0/profiles/{prof}?project={b}")


def test_recover_an_instance_of_a_project(fresh_daemon):
    """`lxd recover` brings back an instance of a non-default project whose rows were lost."""
    import sqlite3

    from tests.helpers import ensure_containers_ready, wait_for

    d = fresh_daemon
    d.start()
    ensure_containers_ready(d)
    p, c = run_prefix(), "c1"
    api_ok(d, "POST", "/1.0/projects", json={"name": p, "config": {
        "features.images": "false", "features.profiles": "false"}})
    create_ok(d, p, c)
    create_ok(d, "default", c)
    vol = d.lxd_dir / "storage-pools" / "default" / "containers" / f"{p}_{c}"
    wait_for(lambda: (vol / "backup.yaml").exists())
    (vol / "rootfs" / "marker").write_text("p1")
    assert d.stop() == 0
    con = sqlite3.connect(d.lxd_dir / "database" / "lxd.db")
    with con:
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("DELETE FROM instances WHERE project=? AND name=?", (p, c))
    con.close()
    d.start()
    assert names_in(d, p) == []
    assert (vol / "rootfs" / "marker").read_text() == "p1"  # the sweep kept it
    r = d.lxd("recover", "--dry-run")
    assert f'Container "{c}" on pool "default" in project "{p}"' in r.stdout, r.stdout
    d.lxd("recover", "--pool", "default", "--yes")
    assert names_in(d, p) == [c]
    inst = api_ok(d, "GET", f"/1.0/instances/{c}?project={p}")
    assert inst["project"] == p and inst["expanded_devices"]["root"]["pool"] == "default"
    assert (d.lxd_dir / "containers" / f"{p}_{c}").resolve() == vol.resolve()
    assert api_ok(d, "GET", f"/1.0/instances/{c}")["project"] == "default"
    delete_all(d, p)
    delete_all(d, "default")
    api_ok(d, "DELETE", f"/1.0/projects/{p}")


def test_disk_of_a_project_volume(ready, projects, names):
    """A disk device names a custom volume of the instance's project (features.storage.volumes)."""
    _, b = projects
    v, c = names("vol"), names("cv")
    base = "/1.0/storage-pools/default/volumes"
    api_ok(ready, "POST", f"{base}/custom?project={b}", json={"name": v})
    try:
        disk = {"vol": {"type": "disk", "pool": "default", "source": v, "path": "/mnt"}}
        create_ok(ready, b, c, devices=disk)
        used = api_ok(ready, "GET", f"{base}/custom/{v}?project={b}")["used_by"]
        assert used == [f"/1.0/instances/{c}?project={b}"]
        # default has no volume of that name
        r = create(ready, "default", names("cx"), devices=disk)
        assert r.status_code == 400 and "doesn't exist" in r.json()["error"], r.text
        # the volume is in use: not deleted
        assert ready.api("DELETE", f"{base}/custom/{v}?project={b}").status_code == 400
        # the instance's root volume is listed in its project under its own name
        vols = api_ok(ready, "GET", f"{base}?project={b}")
        assert f"{base}/container/{c}?project={b}" in vols, vols
    finally:
        delete_all(ready, b)
        ready.api("DELETE", f"{base}/custom/{v}?project={b}")


def test_nic_of_a_project_instance(net_daemon):
    """A nic's `network=` in a project without features.networks is default's network: the
    container gets its address there; static addresses are checked across projects."""
    from tests.helpers import wait_for

    d = net_daemon
    p, net = run_prefix(), f"pn{run_prefix()[1:6]}"
    c = "c1"
    d.lxc("network", "create", net, "ipv4.address=10.237.0.1/24", "ipv6.address=none")
    api_ok(d, "POST", "/1.0/projects", json={"name": p, "config": {
        "features.images": "false", "features.profiles": "false"}})
    try:
        d.lxc("launch", "busybox", c, "--project", p, "-n", net)
        d.lxc("init", "busybox", c, "-n", net)  # the same name in default, on the same network

        def addr() -> list[str]:
            st = api_ok(d, "GET", f"/1.0/instances/{c}/state?project={p}")["network"] or {}
            return [a["address"] for a in st.get("eth0", {}).get("addresses", []) if a["family"] == "inet"]

        wait_for(lambda: addr(), timeout=20)
        assert addr()[0].startswith("10.237.0.")
        used = api_ok(d, "GET", f"/1.0/networks/{net}")["used_by"]
        assert f"/1.0/instances/{c}?project={p}" in used and f"/1.0/instances/{c}" in used, used
        # a static address another project's instance holds on the same network is refused
        d.lxc("config", "device", "set", c, "eth0", "ipv4.address=10.237.0.50")
        r = d.api("PATCH", f"/1.0/instances/{c}?project={p}", json={"devices": {
            "eth0": {"type": "nic", "network": net, "name": "eth0", "ipv4.address": "10.237.0.50"}}})
        assert r.status_code == 400 and "already used" in r.json()["error"], r.text
    finally:
        for proj in (p, "default"):
            d.lxc("delete", "-f", c, "--project", proj, check=False)
        d.api("DELETE", f"/1.0/projects/{p}")
        d.lxc("network", "delete", net, check=False)


def test_init_preseed_projects(ready):
    """`lxd init --preseed` creates the projects it names, and updates existing ones."""
    import yaml

    p = run_prefix()
    seed = {"projects": [{"name": p, "description": "from a preseed", "config": {"features.images": "false"}}]}
    try:
        ready.lxd("init", "--preseed", input=yaml.safe_dump(seed))
        got = api_ok(ready, "GET", f"/1.0/projects/{p}")
        assert got["description"] == "from a preseed" and got["config"]["features.images"] == "false"
        seed["projects"][0]["config"] = {"limits.instances": "3"}
        ready.lxd("init", "--preseed", input=yaml.safe_dump(seed))
        got = api_ok(ready, "GET", f"/1.0/projects/{p}")
        assert got["config"]["limits.instances"] == "3" and got["config"]["features.images"] == "false"
        r = ready.lxd("init", "--preseed", input=yaml.safe_dump({"projects": [{"config": {}}]}), check=False)
        assert r.returncode != 0 and "a project has no name" in r.stderr + r.stdout
    finally:
        ready.api("DELETE", f"/1.0/projects/{p}")
