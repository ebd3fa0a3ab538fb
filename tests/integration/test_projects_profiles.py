"""Issue 12: profiles per project, through the stock client (`lxc profile ... --project P`).

A project with features.profiles has profiles of its own (and its own `default` profile, made,
moved and removed with the project); one without it uses default's. Runs on the shared daemon:
every project here has a unique name and goes (with what it holds) after its test.
"""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from tests.helpers import Daemon, ensure_containers_ready, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def projects(ready):
    """Makes uniquely named projects (`lxc project create NAME -c k=v...`); each goes afterwards with
    its instances and profiles."""
    made: list[str] = []
    prefix = run_prefix()

    def make(suffix: str, *config: str) -> str:
        name = f"{prefix}{suffix}"
        args = [a for kv in config for a in ("-c", kv)]
        ready.lxc("project", "create", name, *args)
        made.append(name)
        return name

    yield make
    for p in reversed(made):
        for url in (ready.api("GET", f"/1.0/instances?project={p}").json().get("metadata") or []):
            ready.lxc("delete", "-f", url.split("?")[0].rsplit("/", 1)[-1], "--project", p, check=False)
        for url in (ready.api("GET", f"/1.0/profiles?project={p}").json().get("metadata") or []):
            name = url.split("?")[0].rsplit("/", 1)[-1]
            if name != "default":
                ready.lxc("profile", "delete", name, "--project", p, check=False)
        ready.lxc("project", "delete", p, check=False)


def profile(d: Daemon, name: str, project: str) -> dict:
    return yaml.safe_load(d.lxc("profile", "show", name, "--project", project).stdout)


def profile_names(d: Daemon, project: str) -> list[str]:
    out = d.lxc("profile", "list", "--project", project, "--format", "json").stdout
    return sorted(p["name"] for p in json.loads(out))


def fails(d: Daemon, *args: str) -> str:
    r = d.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {' '.join(args)} succeeded: {r.stdout}"
    return r.stderr


def test_project_profiles_are_its_own(ready, projects, names):
    d = ready
    p1 = projects("p")
    # A new project (features.profiles=true by default) has its own, empty default profile.
    assert profile_names(d, p1) == ["default"]
    own = profile(d, "default", p1)
    assert own["description"] == f"Default LXD profile for project {p1}"
    assert own["devices"] == {} and own["config"] == {}
    assert "root" in profile(d, "default", "default")["devices"]  # default's is untouched
    used = yaml.safe_load(d.lxc("project", "show", p1).stdout)["used_by"]
    assert used == [f"/1.0/profiles/default?project={p1}"]
    # The URLs of a project's profiles carry it.
    listing = d.api("GET", f"/1.0/profiles?project={p1}").json()["metadata"]
    assert listing == [f"/1.0/profiles/default?project={p1}"]

    # The same name in default and in p1: two profiles.
    x = names("x")
    d.lxc("profile", "create", x)
    d.lxc("profile", "set", x, "user.where=default")
    d.lxc("profile", "create", x, "--project", p1)
    d.lxc("profile", "set", x, "user.where=p1", "limits.cpu=1", "--project", p1)
    d.lxc("profile", "device", "add", x, "t0", "unix-char", "path=/dev/zero", "--project", p1)
    d.lxc("profile", "unset", x, "limits.cpu", "--project", p1)
    assert d.lxc("profile", "get", x, "user.where", "--project", p1).stdout.strip() == "p1"
    assert d.lxc("profile", "get", x, "user.where").stdout.strip() == "default"
    got = profile(d, x, p1)
    assert got["config"] == {"user.where": "p1"} and got["devices"]["t0"]["path"] == "/dev/zero"
    assert "t0" not in profile(d, x, "default")["devices"]
    d.lxc("profile", "edit", x, "--project", p1,
          input=yaml.safe_dump({"description": "edited", "config": {"user.k": "v"}, "devices": {}}))
    got = profile(d, x, p1)
    assert (got["description"], got["config"], got["devices"]) == ("edited", {"user.k": "v"}, {})
    assert profile(d, x, "default")["config"] == {"user.where": "default"}

    # Made through the API: the Location carries the project; copied between projects.
    c = names("c")
    r = d.api("POST", f"/1.0/profiles?project={p1}", json={"name": c, "config": {"user.c": "1"}})
    assert r.status_code == 201 and r.headers["Location"] == f"/1.0/profiles/{c}?project={p1}", r.text
    d.lxc("profile", "copy", c, c, "--project", p1, "--target-project", "default")
    assert profile(d, c, "default")["config"] == {"user.c": "1"}
    d.lxc("profile", "delete", c)
    d.lxc("profile", "delete", c, "--project", p1)

    # Rename and delete act on p1's profile only.
    y = names("y")
    d.lxc("profile", "rename", x, y, "--project", p1)
    assert profile_names(d, p1) == sorted(["default", y])
    assert "not found" in fails(d, "profile", "show", y).lower()  # not in default
    assert "not found" in fails(d, "profile", "show", "nothere", "--project", p1).lower()
    assert x in profile_names(d, "default")
    assert "cannot be deleted" in fails(d, "profile", "delete", "default", "--project", p1)

    # A project holding a profile besides its default one isn't empty.
    assert "Only empty projects can be removed" in fails(d, "project", "delete", p1)
    used = yaml.safe_load(d.lxc("project", "show", p1).stdout)["used_by"]
    assert f"/1.0/profiles/{y}?project={p1}" in used
    d.lxc("profile", "delete", y, "--project", p1)
    assert profile_names(d, p1) == ["default"]
    d.lxc("profile", "delete", x)

    # Renaming the (empty) project moves its default profile; deleting it removes it.
    p2 = p1 + "r"
    d.lxc("project", "rename", p1, p2)
    assert profile_names(d, p2) == ["default"]
    assert "not found" in fails(d, "profile", "list", "--project", p1).lower()
    d.lxc("project", "delete", p2)
    d.lxc("project", "create", p2, "-c", "features.profiles=true")
    try:
        assert profile_names(d, p2) == ["default"]
        assert profile(d, "default", p2)["description"] == f"Default LXD profile for project {p2}"
    finally:
        d.lxc("project", "delete", p2)
    assert d.api("GET", f"/1.0/profiles?project={p2}").status_code == 404


def test_project_without_features_profiles_uses_defaults(ready, projects, names):
    d = ready
    q = projects("q", "features.profiles=false")
    assert profile_names(d, q) == profile_names(d, "default")
    assert "root" in profile(d, "default", q)["devices"]
    assert yaml.safe_load(d.lxc("project", "show", q).stdout)["used_by"] == []
    # A profile made through q is default's (plain URL, visible without --project).
    z = names("z")
    r = d.api("POST", f"/1.0/profiles?project={q}", json={"name": z, "config": {"user.a": "b"}})
    assert r.status_code == 201 and r.headers["Location"] == f"/1.0/profiles/{z}", r.text
    assert profile(d, z, "default")["config"] == {"user.a": "b"}
    d.lxc("profile", "set", z, "user.a=c", "--project", q)
    assert profile(d, z, "default")["config"] == {"user.a": "c"}
    d.lxc("profile", "delete", z, "--project", q)
    assert z not in profile_names(d, "default")

    # features.profiles changes on the empty project: its own default profile comes and goes.
    d.lxc("project", "set", q, "features.profiles=true")
    assert profile_names(d, q) == ["default"]
    assert profile(d, "default", q)["devices"] == {}
    d.lxc("project", "set", q, "features.profiles=false")
    assert "root" in profile(d, "default", q)["devices"]
    assert yaml.safe_load(d.lxc("project", "show", q).stdout)["used_by"] == []


def test_profile_used_by_and_checks_across_projects(ready, projects, names):
    """used_by lists instances of every project using the profile (with ?project=); a profile
    change is checked against the limits and restrictions of the projects using it."""
    d = ready
    pool = profile(d, "default", "default")["devices"]["root"]["pool"]
    p = projects("u", "features.images=false")  # default's busybox image
    q = projects("v", "features.images=false", "features.profiles=false")
    d.lxc("profile", "device", "add", "default", "root", "disk", "path=/", f"pool={pool}", "--project", p)
    d.lxc("init", "busybox", "c1", "--project", p)
    d.lxc("init", "busybox", "c1", "--project", q)
    assert profile(d, "default", p)["used_by"] == [f"/1.0/instances/c1?project={p}"]
    used = profile(d, "default", "default")["used_by"]
    assert f"/1.0/instances/c1?project={q}" in used and f"/1.0/instances/c1?project={p}" not in used
    assert profile(d, "default", q)["used_by"] == used  # q sees default's profile

    # A profile of p, used by p's c1: rename follows, delete is refused while in use.
    w = names("w")
    d.lxc("profile", "create", w, "--project", p)
    d.lxc("profile", "add", "c1", w, "--project", p)
    w2 = names("w2")
    d.lxc("profile", "rename", w, w2, "--project", p)
    inst = yaml.safe_load(d.lxc("config", "show", "c1", "--project", p).stdout)
    assert inst["profiles"] == ["default", w2]
    assert "in use" in fails(d, "profile", "delete", w2, "--project", p)
    # p's restrictions apply to p's profiles; default's profiles aren't p's.
    d.lxc("project", "set", p, "restricted=true")
    err = fails(d, "profile", "set", w2, "security.privileged=true", "--project", p)
    assert "security.privileged" in err, err
    r = d.api("POST", f"/1.0/profiles?project={p}", json={"name": names("r"), "config": {"raw.lxc": "lxc.tty.max=2"}})
    assert r.status_code in (400, 403) and "raw.lxc" in r.json()["error"], r.text
    d.lxc("project", "unset", p, "restricted")
    d.lxc("profile", "remove", "c1", w2, "--project", p)
    d.lxc("profile", "delete", w2, "--project", p)


def test_project_profiles_persist_across_restart(fresh_daemon):
    """What the project hooks did to the profiles is in the database: a restart finds it so."""
    d = fresh_daemon
    d.start()
    d.lxc("project", "create", "pa")
    d.lxc("profile", "create", "x", "--project", "pa")
    d.lxc("profile", "set", "x", "user.k=v", "--project", "pa")
    d.lxc("profile", "delete", "x", "--project", "pa")
    d.lxc("profile", "create", "keep", "--project", "pa")
    d.lxc("profile", "delete", "keep", "--project", "pa")
    d.lxc("project", "rename", "pa", "pb")
    d.lxc("profile", "create", "y", "--project", "pb")
    d.lxc("profile", "set", "y", "user.k=v", "--project", "pb")
    d.lxc("project", "create", "pc", "-c", "features.profiles=false")
    d.stop()
    d.start()
    assert profile_names(d, "pb") == ["default", "y"]
    assert profile(d, "y", "pb")["config"] == {"user.k": "v"}
    assert profile(d, "default", "pb")["description"] == "Default LXD profile for project pa"  # (kept, as LXD)
    assert profile_names(d, "pc") == ["default"] and profile(d, "default", "pc")["description"] == \
        "Default LXD profile"
    d.lxc("profile", "delete", "y", "--project", "pb")
    d.lxc("project", "delete", "pb")
    d.lxc("project", "delete", "pc")
    d.stop()
    d.start()
    d.lxc("project", "create", "pb", "-c", "features.profiles=true")
    assert profile(d, "default", "pb")["description"] == "Default LXD profile for project pb"
    assert profile_names(d, "default") == ["default"]


def test_used_by_shows_a_confined_client_only_its_project(fresh_daemon, tmp_path):
    """A certificate confined to a project that uses default's profiles sees them, but their
    used_by only names its own project's instances (as LXD filters used_by)."""
    admin = fresh_daemon
    admin.start()
    ensure_containers_ready(admin)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    admin.lxc("config", "set", "core.https_address", f"127.0.0.1:{port}")
    admin.lxc("project", "create", "pq", "-c", "features.images=false", "-c", "features.profiles=false")
    admin.lxc("init", "busybox", "c0")
    admin.lxc("init", "busybox", "c1", "--project", "pq")
    try:
        out = admin.lxc("config", "trust", "add", "--name", "confined", "--restricted", "--projects", "pq").stdout
        token = [line for line in out.splitlines() if line.strip()][-1].strip()
        (tmp_path / "cvar").mkdir()
        client = Daemon(lxd_dir=tmp_path / "cvar", conf_dir=tmp_path / "cconf")
        client.lxc("remote", "add", "r", token)
        shown = yaml.safe_load(client.lxc("profile", "show", "r:default", "--project", "pq").stdout)
        assert shown["used_by"] == ["/1.0/instances/c1?project=pq"], shown
        assert "root" in shown["devices"]
        full = profile(admin, "default", "default")["used_by"]
        assert sorted(full) == ["/1.0/instances/c0", "/1.0/instances/c1?project=pq"]
    finally:
        admin.lxc("delete", "c0", check=False)
        admin.lxc("delete", "c1", "--project", "pq", check=False)
        admin.lxc("project", "delete", "pq", check=False)
