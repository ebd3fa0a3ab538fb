"""Projects (issue 12) through the stock client: `lxc project ...`, the global `--project` flag and
`--all-projects`, two projects each running a `c1`, features.images shared and isolated,
limits.instances, a restricted project refusing every escape on every path, bad input, and
events per project.

Projects are server-wide state: this module runs a daemon of its own (module-scoped). Every test
makes projects with names of its own and deletes what it made. Only one test starts containers
(two of them, at once).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
import yaml

from tests.helpers import Daemon, busybox_tarball, module_daemon, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    yield from module_daemon(tmp_path_factory, "lxdprojects")


def fails(d: Daemon, *args: str, input: str | None = None) -> str:
    r = d.lxc(*args, check=False, input=input)
    assert r.returncode != 0, f"lxc {' '.join(args)} succeeded: {r.stdout}"
    return r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_names(d: Daemon) -> list[str]:
    return [p["name"] for p in json.loads(d.lxc("project", "list", "-f", "json").stdout)]


def instances(d: Daemon, *args: str) -> set[tuple[str, str]]:
    """(project, name) of what `lxc list ARGS` shows."""
    rows = json.loads(d.lxc("list", "-f", "json", *args).stdout)
    return {(r.get("project") or "", r["name"]) for r in rows}


def empty_project(d: Daemon, name: str) -> None:
    """Delete whatever the tests left in project `name`, then the project."""
    if d.api("GET", f"/1.0/projects/{name}").status_code != 200:
        return
    for url in d.api("GET", f"/1.0/instances?project={name}").json().get("metadata") or []:
        d.lxc("delete", "-f", url.split("?")[0].rsplit("/", 1)[-1], "--project", name, check=False)
    for url in d.api("GET", f"/1.0/images?project={name}").json().get("metadata") or []:
        if d.api("GET", f"/1.0/projects/{name}").json()["metadata"]["config"].get("features.images") == "true":
            d.lxc("image", "delete", url.split("?")[0].rsplit("/", 1)[-1], "--project", name, check=False)
    for url in d.api("GET", f"/1.0/profiles?project={name}").json().get("metadata") or []:
        prof = url.split("?")[0].rsplit("/", 1)[-1]
        if prof != "default":
            d.lxc("profile", "delete", prof, "--project", name, check=False)
    r = d.api("DELETE", f"/1.0/projects/{name}")
    assert r.status_code == 200, f"project {name} left behind: {r.text}"


@pytest.fixture
def projects(d):
    """make(suffix, *config) creates a project with this test's unique name, sharing default's
    images unless `config` says otherwise (a project with its own has none: LXD's rule); its own
    profiles get the pool's root disk, as `lxd init` gives default's. All go after the test."""
    prefix = run_prefix()
    made: list[str] = []

    def make(suffix: str, *config: str, root: bool = True) -> str:
        name = f"{prefix}{suffix}"
        if not any(kv.startswith("features.images=") for kv in config):
            config = ("features.images=false", *config)
        args = [a for kv in config for a in ("-c", kv)]
        d.lxc("project", "create", name, *args)
        made.append(name)
        cfg = d.api("GET", f"/1.0/projects/{name}").json()["metadata"]["config"]
        if root and cfg.get("features.profiles") == "true":
            d.lxc("profile", "device", "add", "default", "root", "disk", "path=/", "pool=default",
                  "--project", name)
        return name

    yield make
    for name in reversed(made):
        empty_project(d, name)


# -- the `lxc project` commands ----------------------------------------------------------------------

def test_project_commands_through_the_stock_client(d, projects):
    p = projects("cmd", "features.images=false", "user.team=blue", root=False)
    assert p in project_names(d)
    shown = yaml.safe_load(d.lxc("project", "show", p).stdout)
    assert shown["name"] == p
    # LXD's defaults for what the request leaves out; features.images as asked.
    assert shown["config"]["features.images"] == "false"
    assert shown["config"]["features.profiles"] == "true"
    assert shown["config"]["features.storage.volumes"] == "true"
    # Its own default profile (features.profiles), listed in used_by.
    assert f"/1.0/profiles/default?project={p}" in shown["used_by"]
    prof = yaml.safe_load(d.lxc("profile", "show", "default", "--project", p).stdout)
    assert prof["devices"] == {} and p in prof["description"]
    assert d.lxc("project", "get", p, "user.team").stdout.strip() == "blue"
    d.lxc("project", "set", p, "limits.instances", "5")
    assert d.lxc("project", "get", p, "limits.instances").stdout.strip() == "5"
    d.lxc("project", "unset", p, "limits.instances")
    assert d.lxc("project", "get", p, "limits.instances").stdout.strip() == ""
    # edit: the YAML on stdin replaces description and config.
    edited = {"description": "edited by the test", "config": {**shown["config"], "user.team": "red"}}
    d.lxc("project", "edit", p, input=yaml.safe_dump(edited))
    shown = yaml.safe_load(d.lxc("project", "show", p).stdout)
    assert shown["description"] == "edited by the test" and shown["config"]["user.team"] == "red"
    info = d.lxc("project", "info", p).stdout
    assert "INSTANCES" in info and "UNLIMITED" in info
    # switch: the client's current project, used by every command without --project.
    d.lxc("project", "switch", p)
    try:
        current = {r["name"] for r in json.loads(d.lxc("project", "list", "-f", "json").stdout)}
        assert p in current
        out = d.lxc("project", "list", "-f", "csv").stdout
        assert any(line.startswith(f"{p} (current),") for line in out.splitlines()), out
        assert d.lxc("list", "-f", "csv", "-c", "n").stdout.strip() == ""  # p has no instances
        # p's own default profile ("Default LXD profile for project P"), not default's.
        out = d.lxc("profile", "list", "-f", "csv").stdout
        assert out.startswith("default,") and p in out, out
    finally:
        d.lxc("project", "switch", "default")
    # rename (an empty project), then delete.
    renamed = p + "x"
    d.lxc("project", "rename", p, renamed)
    try:
        assert "Project not found" in fails(d, "project", "show", p)
        assert yaml.safe_load(d.lxc("project", "show", renamed).stdout)["description"] == "edited by the test"
        # Its default profile moved with it.
        assert d.lxc("profile", "show", "default", "--project", renamed).returncode == 0
    finally:
        d.lxc("project", "delete", renamed, check=False)
    assert renamed not in project_names(d)
    assert d.api("GET", f"/1.0/projects/{renamed}").status_code == 404


def test_bad_project_input_gets_clear_errors(d, projects):
    prefix = run_prefix()
    assert "slashes" in fails(d, "project", "create", f"{prefix}a/b")
    assert "underscores" in fails(d, "project", "create", f"{prefix}a_b")
    assert not [n for n in project_names(d) if n.startswith(prefix)]
    p = projects("in")
    assert "already exists" in fails(d, "project", "create", p)
    # Instance names can't hold `_`: `p1_c1` on disk can't clash with another project's name.
    assert "Invalid instance name" in fails(d, "init", "busybox", "a_b", "--project", p)
    d.lxc("init", "busybox", "c1", "--project", p)
    err = fails(d, "project", "rename", p, p + "x")
    assert "Only empty projects can be renamed" in err
    err = fails(d, "project", "delete", p)
    assert "Only empty projects can be removed" in err
    assert "The 'default' project cannot be deleted" in fails(d, "project", "delete", "default")
    assert "cannot be renamed" in fails(d, "project", "rename", "default", f"{prefix}dx")
    assert "Project not found" in fails(d, "list", "--project", f"{prefix}nope")
    assert "Project not found" in fails(d, "project", "delete", f"{prefix}nope")
    assert p in project_names(d)
    d.lxc("delete", "c1", "--project", p)
    d.lxc("project", "delete", p)  # empty again: its own default profile goes with it
    assert p not in project_names(d)


# -- two projects, one `c1` each ---------------------------------------------------------------------

def test_two_projects_each_run_a_container_named_c1(d, projects):
    p = projects("run")
    d.lxc("launch", "busybox", "c1")
    try:
        d.lxc("launch", "busybox", "c1", "--project", p)
        assert instances(d, "--project", p) == {(p, "c1")}
        assert ("default", "c1") in instances(d) and (p, "c1") not in instances(d)
        states = {}
        for args in ((), ("--project", p)):
            st = json.loads(d.lxc("list", "c1", "-f", "json", *args).stdout)
            assert [s["name"] for s in st] == ["c1"] and st[0]["status"] == "Running", st
            states[args] = st[0]["state"]["pid"]
            # The API name inside the container, whatever the storage name.
            assert d.lxc("exec", "c1", *args, "--", "hostname").stdout.strip() == "c1"
        assert len(set(states.values())) == 2 and all(pid > 0 for pid in states.values())
        # The other one keeps running while one stops.
        d.lxc("stop", "-f", "c1", "--project", p)
        assert json.loads(d.lxc("list", "c1", "-f", "json").stdout)[0]["status"] == "Running"
        assert d.api("GET", f"/1.0/instances/c1?project={p}").json()["metadata"]["project"] == p
        both = instances(d, "--all-projects")
        assert {("default", "c1"), (p, "c1")} <= both
    finally:
        d.lxc("delete", "-f", "c1", "--project", p, check=False)
        d.lxc("delete", "-f", "c1", check=False)
    assert d.api("GET", "/1.0/instances/c1").status_code == 404


def test_move_an_instance_to_another_project(d, projects):
    """`lxc move c1 --target-project P` (the client copies, then deletes the source)."""
    p = projects("mv")
    d.lxc("init", "busybox", "mc1", "-c", "user.kept=yes")
    try:
        d.lxc("move", "mc1", "--target-project", p)
        assert d.api("GET", "/1.0/instances/mc1").status_code == 404
        moved = d.api("GET", f"/1.0/instances/mc1?project={p}").json()["metadata"]
        assert moved["project"] == p and moved["config"]["user.kept"] == "yes"
        assert (d.lxd_dir / "containers" / f"{p}_mc1").exists() and not (d.lxd_dir / "containers" / "mc1").exists()
        d.lxc("start", "mc1", "--project", p)
        assert d.lxc("exec", "mc1", "--project", p, "--", "hostname").stdout.strip() == "mc1"
    finally:
        d.lxc("delete", "-f", "mc1", "--project", p, check=False)
        d.lxc("delete", "-f", "mc1", check=False)


# -- features.images ---------------------------------------------------------------------------------

def test_features_images_off_shares_default_images_and_on_isolates_them(d, projects):
    shared = projects("sh", "features.images=false", "features.profiles=false")
    own = projects("own", "features.images=true", "features.profiles=false")
    fp = d.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    # Off: default's images and aliases are the project's.
    listed = json.loads(d.lxc("image", "list", "--project", shared, "-f", "json").stdout)
    assert fp in [i["fingerprint"] for i in listed]
    d.lxc("init", "busybox", "s1", "--project", shared)
    # On: none of default's.
    assert json.loads(d.lxc("image", "list", "--project", own, "-f", "json").stdout) == []
    assert d.api("GET", f"/1.0/images/{fp}?project={own}").status_code == 404
    fails(d, "init", "busybox", "o1", "--project", own)
    # Its own import (the same image file as default's) under an alias of its own.
    d.lxc("image", "import", str(busybox_tarball()), "--alias", "mine", "--project", own)
    listed = json.loads(d.lxc("image", "list", "--project", own, "-f", "json").stdout)
    assert [i["fingerprint"] for i in listed] == [fp]
    assert d.api("GET", "/1.0/images/aliases/mine").status_code == 404  # not in default
    d.lxc("init", "mine", "o1", "--project", own)
    d.lxc("delete", "o1", "--project", own)
    d.lxc("image", "delete", fp, "--project", own)
    # default's copy of the same image is untouched.
    assert d.api("GET", f"/1.0/images/{fp}").status_code == 200
    d.lxc("init", "busybox", "s2", "--project", shared)
    assert instances(d, "--project", shared) == {(shared, "s1"), (shared, "s2")}


# -- limits ------------------------------------------------------------------------------------------

def test_limits_instances_refuses_the_third_naming_the_limit(d, projects):
    p = projects("lim", "limits.instances=2")
    d.lxc("init", "busybox", "a", "--project", p)
    d.lxc("init", "busybox", "b", "--project", p)
    err = fails(d, "init", "busybox", "c", "--project", p)
    assert f'Reached maximum number of instances in project "{p}"' in err
    err = fails(d, "copy", "a", "c", "--project", p)
    assert f'Reached maximum number of instances in project "{p}"' in err
    assert d.api("GET", f"/1.0/instances/c?project={p}").status_code == 404
    res = d.api("GET", f"/1.0/projects/{p}/state").json()["metadata"]["resources"]
    assert res["instances"] == {"limit": 2, "usage": 2}
    # default's instances don't count against p's limit, nor p's against default's.
    d.lxc("init", "busybox", "c")
    d.lxc("delete", "c")


# -- restrictions ------------------------------------------------------------------------------------

ESCAPES = (("security.privileged", "true", "Privileged containers are forbidden"),
           ("security.nesting", "true", "Container nesting is forbidden"),
           ("raw.lxc", "lxc.apparmor.profile=unconfined", 'Use of low-level config "raw.lxc"'),
           ("raw.idmap", "both 1000 1000", 'Use of low-level "raw.idmap" element 0'))


def test_restricted_project_refuses_escapes_through_create_edit_profile_and_copy(d, projects, tmp_path):
    host, outside = tmp_path / "shared", tmp_path / "other"
    host.mkdir()
    outside.mkdir()
    p = projects("rs", "restricted=true", "restricted.devices.disk=allow",
                 f"restricted.devices.disk.paths={host}")
    pp = ("--project", p)
    d.lxc("init", "busybox", "ok", *pp)
    d.lxc("profile", "create", "prof", *pp)
    for key, value, msg in ESCAPES:
        err = fails(d, "init", "busybox", "bad", "-c", f"{key}={value}", *pp)
        assert msg in err and "Failed checking if instance creation allowed" in err, err
        err = fails(d, "config", "set", "ok", key, value, *pp)
        assert msg in err and "Failed checking if instance update allowed" in err, err
        err = fails(d, "profile", "set", "prof", key, value, *pp)
        assert msg in err and "Failed checking if profile update allowed" in err, err
        err = fails(d, "profile", "set", "default", key, value, *pp)
        assert msg in err, err
        err = fails(d, "copy", "ok", "bad", "-c", f"{key}={value}", *pp)
        assert msg in err, err
    # edit: the whole YAML through `lxc config edit`.
    conf = yaml.safe_load(d.lxc("config", "show", "ok", *pp).stdout)
    conf["config"]["security.privileged"] = "true"
    err = fails(d, "config", "edit", "ok", *pp, input=yaml.safe_dump(conf))
    assert "Privileged containers are forbidden" in err, err
    # A host-path disk outside restricted.devices.disk.paths: create and copy (API), config and
    # profile devices; one inside is fine.
    disk = {"type": "disk", "source": str(outside), "path": "/mnt"}
    for source in ({"type": "image", "alias": "busybox"}, {"type": "copy", "source": "ok"}):
        r = d.api("POST", f"/1.0/instances?project={p}", json={"name": "bad", "source": source,
                                                                "devices": {"h": disk}})
        assert r.status_code == 400 and "not allowed" in r.json()["error"], r.text
    err = fails(d, "config", "device", "add", "ok", "h", "disk", f"source={outside}", "path=/mnt", *pp)
    assert f'Disk source path "{outside}" not allowed' in err, err
    err = fails(d, "profile", "device", "add", "prof", "h", "disk", f"source={outside}", "path=/mnt", *pp)
    assert "not allowed" in err and "profile update" in err, err
    d.lxc("config", "device", "add", "ok", "h", "disk", f"source={host}", "path=/mnt", *pp)
    d.lxc("copy", "ok", "ok2", *pp)
    assert d.api("GET", f"/1.0/instances/bad?project={p}").status_code == 404
    # Nothing of the refused settings landed anywhere.
    got = d.api("GET", f"/1.0/instances/ok?project={p}").json()["metadata"]["config"]
    assert not {k for k, _, _ in ESCAPES} & set(got)
    # restricted.cluster.target (blocked by `restricted`): targeting a member is refused first.
    assert "doesn't allow cluster member targeting" in fails(d, "init", "busybox", "bad", "--target", "m1", *pp)
    assert "Target only allowed when clustered" in fails(d, "init", "busybox", "bad", "--target", "m1")
    # The same keys are fine in default (unrestricted), which the restriction doesn't touch.
    d.lxc("init", "busybox", "free", "-c", "security.nesting=true")
    d.lxc("delete", "free")


# -- events per project ------------------------------------------------------------------------------

def test_events_are_filtered_by_project(d, projects):
    p = projects("ev", "features.profiles=false", root=False)
    mons = {}
    for tag, args in (("p", ("--project", p)), ("all", ("--all-projects",)), ("default", ())):
        mons[tag] = subprocess.Popen(d.lxc_argv("monitor", "--type", "lifecycle", "-f", "json", *args),
                                     env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # connected
        d.lxc("init", "busybox", "e1", "--project", p)
        d.lxc("init", "busybox", "e1")
        d.lxc("delete", "e1", "--project", p)
        d.lxc("delete", "e1")
        time.sleep(1.0)
    finally:
        for m in mons.values():
            m.terminate()
        outs = {tag: m.communicate(timeout=10)[0] for tag, m in mons.items()}

    def events(tag):
        return [json.loads(line) for line in outs[tag].splitlines() if line.strip().startswith("{")]

    def created(tag):
        return {(e.get("project"), e["metadata"]["source"]) for e in events(tag)
                if e["metadata"]["action"] == "instance-created"}

    assert created("p") == {(p, f"/1.0/instances/e1?project={p}")}, outs["p"]
    assert created("default") == {("default", "/1.0/instances/e1")}, outs["default"]
    assert created("all") == created("p") | created("default"), outs["all"]
    assert all(e.get("project") == p for e in events("p"))


def test_operations_list_per_project(d, projects):
    """An operation is listed in its project only, and in the all-projects list."""
    p = projects("op", "features.profiles=false", root=False)
    r = d.api("GET", f"/1.0/operations?project={p}&recursion=1")
    assert r.status_code == 200 and not any(r.json()["metadata"].get(k) for k in ("running", "pending"))
    # A token operation lives in default: not in p's list, in the all-projects list.
    r = d.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{free_port()}"}})
    assert r.status_code == 200, r.text  # tokens need a network address
    tok = d.api("POST", "/1.0/certificates", json={"name": run_prefix(), "type": "client", "token": True})
    assert tok.status_code == 202, tok.text
    op_id = tok.json()["metadata"]["id"]
    try:
        def ids(url):
            meta = d.api("GET", url).json()["metadata"] or {}
            return {o["id"] for ops in meta.values() for o in ops}
        assert op_id in ids("/1.0/operations?recursion=1")
        assert op_id not in ids(f"/1.0/operations?recursion=1&project={p}")
        assert op_id in ids(f"/1.0/operations?recursion=1&project={p}&all-projects=true")
        assert d.api("GET", f"/1.0/operations/{op_id}?project={p}").status_code == 200  # unrestricted
    finally:
        d.api("DELETE", f"/1.0/operations/{op_id}")
        d.api("PATCH", "/1.0", json={"config": {"core.https_address": ""}})
