"""The instance API in projects (issue 12): every instance route resolves its instance in the
request's project, and per-instance features (exec, files, console, snapshots, backups, export
and import) work in a non-default project without touching `default`'s instance of the same name.

The conformance test enumerates every declared route under /1.0/instances and /1.0/containers
(the routers of every lxd_daemon.api module, as tests/unit/test_access.py does) and fails closed:
a route added later that is not project-aware makes it fail. Runs on the shared daemon with
projects of unique names (removed, with their instances, after the module); one container start.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import tarfile
import time

import pytest
import yaml

import lxd_daemon.api
from lxd_daemon.api.access import Routes, routes_of
from lxd_daemon.app import create_app
from tests.helpers import Daemon, api_ok, bare_services, run_prefix, wait_op

pytestmark = pytest.mark.integration

PREFIXES = ("/1.0/instances", "/1.0/containers")




def delete_all(d: Daemon, project: str) -> None:
    for u in d.api("GET", f"/1.0/instances?project={project}").json().get("metadata") or []:
        n = u.split("?")[0].rsplit("/", 1)[-1]
        d.api("PUT", f"/1.0/instances/{n}/state?project={project}", json={"action": "stop", "force": True})
        r = d.api("DELETE", f"/1.0/instances/{n}?project={project}")
        if r.status_code == 202:
            wait_op(d, r)


@pytest.fixture(scope="module")
def env(ready):
    """Projects P and Q (default's images and profiles), and three stopped instances: A only in
    default, B only in P, and C in both (default's and P's are different instances). A and B have
    a snapshot `s0` and a backup `b0` (so that those routes reach past the instance lookup)."""
    d = ready
    prefix = run_prefix()
    p, q = f"{prefix}p", f"{prefix}q"
    a, b, c = f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"
    for proj in (p, q):
        d.lxc("project", "create", proj, "-c", "features.images=false", "-c", "features.profiles=false")
    try:
        d.lxc("init", "busybox", a)
        d.lxc("init", "busybox", c)
        d.lxc("init", "busybox", b, "--project", p)
        d.lxc("init", "busybox", c, "--project", p)
        for name, qs in ((a, ""), (b, f"?project={p}")):
            api_ok(d, "POST", f"/1.0/instances/{name}/snapshots{qs}", json={"name": "s0"})
            api_ok(d, "POST", f"/1.0/instances/{name}/backups{qs}", json={"name": "b0"})
        d.lxc("config", "set", c, "user.which", "default")
        # a log file of each (exec output, deletable), where the host keeps them: by storage name
        for key in (a, f"{p}_{b}"):
            logdir = d.lxd_dir / "logs" / key
            logdir.mkdir(parents=True, exist_ok=True)
            (logdir / "exec_probe.stdout").write_text("probe\n")
        yield {"d": d, "p": p, "q": q, "a": a, "b": b, "c": c}
    finally:
        for proj in (p, q):
            delete_all(d, proj)
        for name in (a, c, f"{c}-new"):
            d.lxc("delete", "-f", name, check=False)
        for proj in (p, q):
            r = d.api("DELETE", f"/1.0/projects/{proj}")
            assert r.status_code == 200, f"project {proj} left behind: {r.text}"


# -- conformance ---------------------------------------------------------------------------------

def declared_instance_routes() -> list[tuple[str, str]]:
    """(method, path template) of every route declared under the instance prefixes."""
    tables: list[Routes] = []
    for mod in pkgutil.iter_modules(lxd_daemon.api.__path__):
        module = importlib.import_module(f"lxd_daemon.api.{mod.name}")
        tables.extend(v for v in vars(module).values() if isinstance(v, Routes) and v not in tables)
    app = create_app(services=bare_services(), routers=tables)
    out = set()
    for route in routes_of(app.routes):
        if not route.path.startswith(PREFIXES):
            continue
        for method in getattr(route, "methods", None) or {"WEBSOCKET"}:
            out.add((method, route.path))
    return sorted(out)


# A body that would make each change if the instance were reached (so a 404 proves the lookup,
# not a refused body). Routes not listed get an empty body: still a 404 is expected.
BODIES = {
    ("POST", ""): None,  # the collection: checked on its own below
    ("PUT", "/{name}"): {"config": {"user.reached": "yes"}, "devices": {}, "profiles": ["default"]},
    ("PATCH", "/{name}"): {"config": {"user.reached": "yes"}},
    ("POST", "/{name}"): {"name": "renamed-by-conformance"},
    ("PUT", "/{name}/state"): {"action": "start"},
    ("POST", "/{name}/snapshots"): {"name": "reached"},
    ("PUT", "/{name}/snapshots/{snapshot}"): {"description": "reached", "expires_at": ""},
    ("PATCH", "/{name}/snapshots/{snapshot}"): {"description": "reached"},
    ("POST", "/{name}/snapshots/{snapshot}"): {"name": "reached"},
    ("POST", "/{name}/backups"): {"name": "reached"},
    ("POST", "/{name}/backups/{backup}"): {"name": "reached"},
    ("POST", "/{name}/exec"): {"command": ["touch", "/reached"], "wait-for-websocket": False},
    ("POST", "/{name}/console"): {"width": 80, "height": 25, "type": "console"},
    ("PUT", "/{name}/metadata"): {"architecture": "x86_64", "creation_date": 1, "properties": {"reached": "y"}},
    ("PATCH", "/{name}/metadata"): {"properties": {"reached": "y"}},
}
QUERIES = {"/{name}/files": "path=/etc/reached", "/{name}/metadata/templates": "path=reached.tpl"}


def concrete(path: str, name: str) -> tuple[str, str]:
    """The URL of a route template for instance `name`: its snapshot s0, backup b0, log lxc.conf."""
    prefix = next(p for p in PREFIXES if path.startswith(p))
    suffix = path[len(prefix):]
    values = {"name": name, "snapshot": "s0", "backup": "b0", "file": "exec_probe.stdout"}
    url = re.sub(r"\{([a-z_]+)(:path)?\}", lambda m: values.get(m.group(1), "x1"), path)
    return url, suffix


def call(d: Daemon, method: str, url: str, suffix: str, project: str | None):
    qs = [f"project={project}"] if project else []
    if suffix in QUERIES:
        qs.append(QUERIES[suffix])
    full = url + ("?" + "&".join(qs) if qs else "")
    body = BODIES.get((method, suffix))
    if suffix == "/{name}/files" and method == "POST":
        return d.api(method, full, content=b"reached", headers={"X-LXD-type": "file"})
    if suffix == "/{name}/metadata/templates" and method == "POST":
        return d.api(method, full, content=b"reached")
    if body is not None:
        return d.api(method, full, json=body)
    if method in ("GET", "HEAD", "DELETE"):
        return d.api(method, full)
    return d.api(method, full, json={})


def snapshot_of(d: Daemon, name: str, project: str | None) -> dict:
    """What must not change: the instance's config, status, snapshots, backups, metadata, templates
    and a few files of its root."""
    qs = f"?project={project}" if project else ""
    inst = api_ok(d, "GET", f"/1.0/instances/{name}{qs}")
    return {
        "config": {k: v for k, v in inst["config"].items() if k != "volatile.last_state.power"},
        "status": inst["status"],
        "name": inst["name"],
        "description": inst["description"],
        "snapshots": api_ok(d, "GET", f"/1.0/instances/{name}/snapshots?recursion=1{'&' + qs[1:] if qs else ''}"),
        "backups": [b["name"] for b in api_ok(d, "GET", f"/1.0/instances/{name}/backups?recursion=1"
                                                   f"{'&' + qs[1:] if qs else ''}")],
        "metadata": api_ok(d, "GET", f"/1.0/instances/{name}/metadata{qs}"),
        "templates": api_ok(d, "GET", f"/1.0/instances/{name}/metadata/templates{qs}"),
        "reached": d.api("GET", f"/1.0/instances/{name}/files?path=/etc/reached"
                                f"{'&' + qs[1:] if qs else ''}").status_code,
        "log": d.api("GET", f"/1.0/instances/{name}/logs/exec_probe.stdout{qs}").text,
    }


def test_every_instance_route_is_confined_to_its_project(env):
    d, p, a, b = env["d"], env["p"], env["a"], env["b"]
    routes = declared_instance_routes()
    # both prefixes, the instance itself and everything under it
    assert len(routes) >= 60, routes
    assert {s for _, s in (concrete(path, "x") for _, path in routes)} >= {
        "", "/{name}", "/{name}/state", "/{name}/snapshots/{snapshot}", "/{name}/backups/{backup}/export",
        "/{name}/exec", "/{name}/files", "/{name}/console", "/{name}/logs/{file}", "/{name}/metadata/templates"}
    # (a websocket route under an instance would need a check of its own here: none today)
    assert not [path for method, path in routes if method == "WEBSOCKET"], routes
    before_a = snapshot_of(d, a, None)
    before_b = snapshot_of(d, b, p)
    wrong = []
    checked = 0
    # A (default only) through ?project=P; B (P only) without ?project= (default) and through Q.
    for target, project in ((a, p), (b, None), (b, env["q"])):
        for method, path in routes:
            url, suffix = concrete(path, target)
            if suffix == "":
                continue  # the collection routes: below
            r = call(d, method, url, suffix, project)
            checked += 1
            if r.status_code != 404:
                wrong.append(f"{method} {url} project={project}: {r.status_code} {r.text[:200]}")
            elif method != "HEAD":
                assert r.json()["error"] in ("Instance not found", "Not Found") or "not found" in r.json()["error"], r.text
    assert not wrong, "\n".join(wrong)
    assert checked >= 3 * 50
    # B's storage name is no API name in default
    for path in (f"/1.0/instances/{p}_{b}", f"/1.0/instances/{p}_{b}/state", f"/1.0/instances/{p}_{b}/logs"):
        assert d.api("GET", path).status_code in (400, 404), path
    # The collections: P's list doesn't show A; default's doesn't show B; a copy or a refresh
    # from a name of another project is a 404; a bulk state change in P leaves A alone.
    for prefix in PREFIXES:
        assert not any(u.split("?")[0].endswith("/" + a) for u in api_ok(d, "GET", f"{prefix}?project={p}"))
        assert not any(u.split("?")[0].endswith("/" + b) for u in api_ok(d, "GET", prefix))
        for src, qs in ((a, f"?project={p}"), (b, "")):
            for refresh in (False, True):
                target = env["c"] if refresh else f"{env['c']}-new"  # refresh: onto an existing one
                r = d.api("POST", f"{prefix}{qs}", json={"name": target, "source": {
                    "type": "copy", "source": src, "refresh": refresh}})
                assert r.status_code == 404 or (r.status_code == 202 and wait_op(d, r)["status"] != "Success"), \
                    (src, refresh, r.text)
                if r.status_code == 404:
                    assert "not found" in r.json()["error"].lower(), r.text
    api_ok(d, "PUT", f"/1.0/instances?project={env['q']}", json={"state": {"action": "start"}})
    assert snapshot_of(d, a, None) == before_a
    assert snapshot_of(d, b, p) == before_b


def test_lists_and_urls_carry_the_project(env):
    d, p, b, c = env["d"], env["p"], env["b"], env["c"]
    for prefix in PREFIXES:
        urls = api_ok(d, "GET", f"{prefix}?project={p}")
        assert f"{prefix}/{b}?project={p}" in urls and f"{prefix}/{c}?project={p}" in urls
        assert all(u.endswith(f"?project={p}") for u in urls)
        both = api_ok(d, "GET", f"{prefix}?all-projects=true")
        assert f"{prefix}/{c}" in both and f"{prefix}/{c}?project={p}" in both
    rows = json.loads(d.lxc("list", "-f", "json", "--all-projects").stdout)
    assert {(r["project"], r["name"]) for r in rows} >= {("default", c), (p, c), (p, b)}
    assert {r["name"] for r in json.loads(d.lxc("list", "-f", "json", "--project", p).stdout)} == {b, c}
    full = api_ok(d, "GET", "/1.0/instances?all-projects=true&recursion=1")
    assert {(i["name"], i["project"]) for i in full} >= {(c, "default"), (c, p), (b, p), (env["a"], "default")}
    assert api_ok(d, "GET", f"/1.0/instances/{b}/snapshots?project={p}") == [f"/1.0/instances/{b}/snapshots/s0?project={p}"]
    assert api_ok(d, "GET", f"/1.0/instances/{b}/backups?project={p}") == [f"/1.0/instances/{b}/backups/b0?project={p}"]
    inst = api_ok(d, "GET", f"/1.0/instances/{c}?project={p}")
    assert inst["project"] == p and inst["name"] == c and "user.which" not in inst["config"]
    # an operation on P's instance: its resources and project
    r = d.api("PATCH", f"/1.0/instances/{b}/snapshots/s0?project={p}", json={"description": "x"})
    op = r.json()["metadata"]
    assert op["resources"]["instances"] == [f"/1.0/instances/{b}?project={p}"], op
    assert op["resources"]["instances_snapshots"] == [f"/1.0/instances/{b}/snapshots/s0?project={p}"], op
    assert wait_op(d, r)["status"] == "Success"
    assert api_ok(d, "GET", f"/1.0/operations/{op['id']}?project={p}")["id"] == op["id"]


# -- the stock client in a project --------------------------------------------------------------

def test_stock_client_in_a_project(env, tmp_path):
    """`lxc ... --project P` on P's C (default has a C too): exec, file push/pull, snapshot,
    restore, info, config edit, console log, copy, rename, export and import into Q. Default's C
    is left as it was."""
    d, p, q, c = env["d"], env["p"], env["q"], env["c"]
    before = snapshot_of(d, c, None)
    P = ("--project", p)
    mons = {tag: subprocess.Popen(d.lxc_argv("monitor", "--type", "lifecycle", "-f", "json", *args), env=d.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for tag, args in (("p", P), ("default", ()))}
    time.sleep(1.0)  # connected
    d.lxc("start", c, *P)
    try:
        assert d.lxc("exec", c, *P, "--", "hostname").stdout.strip() == c
        d.lxc("exec", c, *P, "--", "sh", "-c", "echo one > /root/mark")
        src = tmp_path / "pushed"
        src.write_bytes(b"pushed into p\n")
        d.lxc("file", "push", str(src), f"{c}/root/pushed", *P)
        d.lxc("file", "pull", f"{c}/root/pushed", str(tmp_path / "pulled"), *P)
        assert (tmp_path / "pulled").read_bytes() == b"pushed into p\n"
        d.lxc("snapshot", c, "snap1", *P)
        d.lxc("exec", c, *P, "--", "sh", "-c", "echo two > /root/mark")
        info = d.lxc("info", c, *P).stdout
        assert "snap1" in info and "RUNNING" in info.upper()
        log = d.lxc("console", c, *P, "--show-log", check=False)
        assert log.returncode == 0, log.stderr
        shown = d.lxc("info", c, *P, "--show-log").stdout
        assert "lxc" in shown.split("Log:", 1)[-1], shown  # lxc.log of P's C (default's never started)
        d.lxc("restore", c, "snap1", *P)
        assert d.lxc("exec", c, *P, "--", "cat", "/root/mark").stdout.strip() == "one"
        # exec with recorded output (the API): its log URLs carry the project
        r = d.api("POST", f"/1.0/instances/{c}/exec?project={p}", json={
            "command": ["cat", "/root/mark"], "wait-for-websocket": False, "record-output": True})
        op = wait_op(d, r)
        assert op["resources"]["instances"] == [f"/1.0/instances/{c}?project={p}"], op
        out = op["metadata"]["output"]["1"]
        assert out.startswith(f"/1.0/instances/{c}/logs/exec_") and out.endswith(f".stdout?project={p}"), op
        assert d.api("GET", out).text.strip() == "one"
        assert d.api("GET", out.split("?")[0]).status_code == 404  # not default's C
    finally:
        d.lxc("stop", "-f", c, *P, check=False)
        time.sleep(0.5)
        for m in mons.values():
            m.terminate()
        outs = {tag: m.communicate(timeout=10)[0] for tag, m in mons.items()}
    events = {tag: [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
              for tag, out in outs.items()}
    seen = {(e["metadata"]["action"], e["metadata"]["source"]) for e in events["p"]}
    base = f"/1.0/instances/{c}"
    for want in (("instance-exec", f"{base}?project={p}"), ("instance-file-pushed", f"{base}?project={p}"),
                 ("instance-file-retrieved", f"{base}?project={p}"), ("instance-restored", f"{base}?project={p}"),
                 ("instance-console-retrieved", f"{base}?project={p}"),
                 ("instance-snapshot-created", f"{base}/snapshots/snap1?project={p}")):
        assert want in seen, (want, seen)
    assert all(e.get("project") == p and e["metadata"]["source"].endswith(f"?project={p}") for e in events["p"])
    assert not [e for e in events["default"] if e["metadata"]["source"].split("?")[0].startswith(base)], \
        events["default"]
    # config edit
    cfg = yaml.safe_load(d.lxc("config", "show", c, *P).stdout)
    cfg["config"]["user.edited"] = "in-p"
    d.lxc("config", "edit", c, *P, input=yaml.safe_dump(cfg))
    assert d.lxc("config", "get", c, "user.edited", *P).stdout.strip() == "in-p"
    # copy and rename within P (named like nothing in default)
    copy, renamed = f"{c}-copy", f"{c}-moved"
    d.lxc("copy", c, copy, *P)
    d.lxc("rename", copy, renamed, *P)
    listed = {r["name"] for r in json.loads(d.lxc("list", "-f", "json", *P).stdout)}
    assert renamed in listed and copy not in listed
    assert d.api("GET", f"/1.0/instances/{renamed}").status_code == 404
    assert "snap1" in d.lxc("info", renamed, *P).stdout
    # a refresh within P brings a new snapshot of C over
    d.lxc("snapshot", c, "snap2", *P)
    d.lxc("copy", c, renamed, "--refresh", *P)
    assert "snap2" in d.lxc("info", renamed, *P).stdout
    # a copy to another project (`--target-project`: the source's project in the body)
    d.lxc("copy", renamed, renamed, *P, "--target-project", q, "--instance-only")
    assert api_ok(d, "GET", f"/1.0/instances/{renamed}?project={q}")["config"].get("user.edited") == "in-p"
    assert api_ok(d, "GET", f"/1.0/instances/{renamed}?project={p}")["name"] == renamed
    # export from P, import into Q (the API name in the tarball, no storage name)
    tarball = tmp_path / "c.tar.gz"
    d.lxc("export", c, str(tarball), *P)
    with tarfile.open(tarball) as tf:
        index = yaml.safe_load(tf.extractfile("backup/index.yaml").read())
        conf = yaml.safe_load(tf.extractfile("backup/container/backup.yaml").read()) \
            if "backup/container/backup.yaml" in tf.getnames() else None
    assert index["name"] == c
    if conf is not None:
        assert conf["container"]["name"] == c and conf["volume"]["name"] == c
    d.lxc("import", str(tarball), "--project", q)
    imported = api_ok(d, "GET", f"/1.0/instances/{c}?project={q}")
    assert imported["project"] == q and imported["config"].get("user.edited") == "in-p"
    assert api_ok(d, "GET", f"/1.0/instances/{c}/snapshots?project={q}") == [
        f"/1.0/instances/{c}/snapshots/{s}?project={q}" for s in ("snap1", "snap2")]
    # importing it into P again: the name is taken there
    r = d.lxc("import", str(tarball), "--project", p, check=False)
    assert r.returncode != 0
    # default's C never changed
    assert snapshot_of(d, c, None) == before
    assert d.api("GET", f"/1.0/instances/{c}/files?path=/root/pushed").status_code == 404


def test_restrictions_use_the_instance_project(env):
    """restricted.snapshots / restricted.backups of a project refuse its instances' snapshots and
    backups (the instance's project decides, not default's)."""
    d, a = env["d"], env["a"]
    r_proj = f"{env['p']}r"
    name = env["c"]  # default has one of that name too: it stays allowed
    d.lxc("project", "create", r_proj, "-c", "features.images=false", "-c", "features.profiles=true")
    try:
        d.lxc("init", "busybox", name, "--project", r_proj, "-s", "default")
        api_ok(d, "PATCH", f"/1.0/projects/{r_proj}", json={"config": {
            "restricted": "true", "restricted.snapshots": "block", "restricted.backups": "block"}})
        q = f"?project={r_proj}"
        r = d.api("POST", f"/1.0/instances/{name}/snapshots{q}", json={"name": "refused"})
        assert r.status_code in (400, 403), r.text
        assert "snapshot" in r.json()["error"].lower()
        r = d.api("POST", f"/1.0/instances/{name}/backups{q}", json={"name": "refused"})
        assert r.status_code in (400, 403), r.text
        assert "backup" in r.json()["error"].lower()
        assert api_ok(d, "GET", f"/1.0/instances/{name}/snapshots{q}") == []
        assert api_ok(d, "GET", f"/1.0/instances/{name}/backups{q}") == []
        # default (not restricted): the same name, and another instance, are allowed
        for inst in (name, a):
            api_ok(d, "POST", f"/1.0/instances/{inst}/snapshots", json={"name": "allowed"})
            api_ok(d, "DELETE", f"/1.0/instances/{inst}/snapshots/allowed")
    finally:
        delete_all(d, r_proj)
        r = d.api("DELETE", f"/1.0/projects/{r_proj}")
        assert r.status_code == 200, f"project {r_proj} left behind: {r.text}"
