"""A client certificate confined to a project (issue 12), over TLS, with the stock client.

One daemon of this module's own serves HTTPS on a loopback port. Its admin (the unix socket)
makes projects p1 (restricted, default's images) and p2, an instance in each and one in default,
and a token restricted to p1 (`lxc config trust add --restricted --projects p1`). A second client
configuration redeems the token (`lxc remote add r TOKEN`): that client sees only p1 (`lxc list`,
`lxc project list`, events, operations), gets 403 or 404 for everything else, and each escape
LXD documents fails through restricted p1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time

import httpx
import pytest
import websockets
import yaml

from tests.helpers import Daemon, ensure_containers_ready, release_host_state, run_prefix
from tests.integration.test_access_tls import self_signed

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Setup:
    def __init__(self, admin: Daemon, client: Daemon, url: str, p1: str, p2: str, fingerprint: str):
        self.admin, self.client, self.url, self.p1, self.p2 = admin, client, url, p1, p2
        self.fingerprint = fingerprint

    def http(self) -> httpx.Client:
        """An HTTPS client presenting the confined certificate (the one `lxc remote add` made)."""
        return httpx.Client(base_url=self.url, verify=self.tls_context(), timeout=60)

    def tls_context(self) -> ssl.SSLContext:
        """Presents the confined certificate; accepts the daemon's self-signed one."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conf = self.client.conf_dir
        ctx.load_cert_chain(str(conf / "client.crt"), str(conf / "client.key"))
        return ctx


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    base = tmp_path_factory.mktemp("lxdprojtls")
    admin = Daemon(lxd_dir=base / "var", conf_dir=base / "conf")
    (base / "client-var").mkdir()
    client = Daemon(lxd_dir=base / "client-var", conf_dir=base / "client-conf")  # only its lxc
    admin.start()
    prefix = run_prefix()
    p1, p2 = f"{prefix}p1", f"{prefix}p2"
    try:
        ensure_containers_ready(admin)
        port = free_port()
        r = admin.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{port}"}})
        assert r.status_code == 200, r.text
        admin.lxc("project", "create", p1, "-c", "features.images=false", "-c", "restricted=true")
        admin.lxc("profile", "device", "add", "default", "root", "disk", "path=/", "pool=default",
                  "--project", p1)
        admin.lxc("project", "create", p2, "-c", "features.images=false", "-c", "features.profiles=false")
        admin.lxc("init", "busybox", "in-default")
        admin.lxc("init", "busybox", "in-p1", "--project", p1)
        admin.lxc("init", "busybox", "in-p2", "--project", p2)
        out = admin.lxc("config", "trust", "add", "--name", "confined", "--restricted", "--projects", p1).stdout
        token = [line for line in out.splitlines() if line.strip()][-1].strip()
        client.lxc("remote", "add", "r", token)
        client.lxc("remote", "switch", "r")
        certs = admin.api("GET", "/1.0/certificates?recursion=1").json()["metadata"]
        rec = next(c for c in certs if c["name"] == "confined")
        assert rec["restricted"] is True and rec["projects"] == [p1], rec
        yield Setup(admin, client, f"https://127.0.0.1:{port}", p1, p2, rec["fingerprint"])
    finally:
        for p in (p1, p2, "default"):
            for url in admin.api("GET", f"/1.0/instances?project={p}").json().get("metadata") or []:
                admin.lxc("delete", "-f", url.split("?")[0].rsplit("/", 1)[-1], "--project", p, check=False)
        for p in (p1, p2):
            admin.api("DELETE", f"/1.0/projects/{p}")
        admin.stop()
        release_host_state(admin.lxd_dir)


def fails(d: Daemon, *args: str, input: str | None = None) -> str:
    r = d.lxc(*args, check=False, input=input)
    assert r.returncode != 0, f"lxc {' '.join(args)} succeeded: {r.stdout}"
    return r.stderr


def test_the_confined_client_sees_only_its_project(s):
    c, p1 = s.client, s.p1
    # `lxc project list` and `lxc list` in p1.
    assert [p["name"] for p in json.loads(c.lxc("project", "list", "-f", "json").stdout)] == [p1]
    names = [i["name"] for i in json.loads(c.lxc("list", "-f", "json", "--project", p1).stdout)]
    assert names == ["in-p1"]
    # `lxc remote add` with a certificate confined to one project makes it the remote's project.
    assert [i["name"] for i in json.loads(c.lxc("list", "-f", "json").stdout)] == ["in-p1"]
    # The other projects: refused.
    for args in (("--project", "default"), ("--project", s.p2)):
        err = fails(c, "list", *args)
        assert "Certificate is restricted" in err or "not found" in err.lower(), err
    err = fails(c, "info", "in-default", "--project", "default")
    assert "restricted" in err or "not found" in err.lower(), err
    err = fails(c, "project", "show", s.p2)
    assert "restricted" in err, err
    # Nothing server-wide.
    assert "restricted" in fails(c, "config", "set", "core.https_address", "127.0.0.1:1")
    assert "restricted" in fails(c, "project", "set", p1, "restricted", "false")
    assert "restricted" in fails(c, "project", "create", f"{p1}x")
    assert "restricted" in fails(c, "storage", "create", f"{p1}pool", "dir")
    # It works in p1.
    c.lxc("config", "set", "in-p1", "user.x", "1", "--project", p1)
    assert c.lxc("config", "get", "in-p1", "user.x", "--project", p1).stdout.strip() == "1"
    # all-projects: p1's only.
    rows = json.loads(c.lxc("list", "-f", "json", "--all-projects").stdout)
    assert [(i["project"], i["name"]) for i in rows] == [(p1, "in-p1")]


def test_api_refusals_over_tls(s):
    p1, p2 = s.p1, s.p2
    with s.http() as h:
        def code(method, url, **kw):
            return h.request(method, url, **kw).status_code

        assert h.get("/1.0").json()["metadata"]["auth"] == "trusted"
        for url in ("/1.0/instances", "/1.0/instances/in-default", f"/1.0/instances?project={p2}",
                    f"/1.0/instances/in-p2?project={p2}", "/1.0/projects/default", f"/1.0/projects/{p2}",
                    f"/1.0/profiles?project={p2}", "/1.0/profiles/default", "/1.0/storage-pools",
                    "/1.0/networks", "/1.0/certificates", "/1.0/operations",
                    f"/1.0/storage-pools/default/volumes?project={p2}"):
            assert code("GET", url) in (403, 404), url
        # Outside p1 it is any untrusted client: default's private images are hidden.
        fp = s.admin.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
        assert h.get("/1.0/images").json()["metadata"] == []
        assert code("GET", f"/1.0/images/{fp}") == 404
        assert code("GET", f"/1.0/images/{fp}/export") == 404
        # In p1 (which uses default's images) it sees them.
        urls = h.get(f"/1.0/images?project={p1}").json()["metadata"]
        assert [u.split("?")[0] for u in urls] == [f"/1.0/images/{fp}"], urls
        assert code("PATCH", "/1.0", json={"config": {}}) == 403
        assert code("PUT", f"/1.0/projects/{p1}", json={"config": {}}) == 403
        assert code("DELETE", "/1.0/instances/in-default") in (403, 404)
        assert code("DELETE", f"/1.0/instances/in-p2?project={p1}") == 404  # p1 has no in-p2
        assert code("POST", "/1.0/instances", json={"name": "x", "source": {"type": "none"}}) == 403
        # An object of another project named from p1 is simply not found.
        r = h.get(f"/1.0/instances/in-default?project={p1}")
        assert r.status_code == 404 and r.json()["error"] == "Instance not found", r.text
        listed = h.get("/1.0/instances?all-projects=true").json()["metadata"]
        assert listed == [f"/1.0/instances/in-p1?project={p1}"], listed
        assert h.get("/1.0/projects").json()["metadata"] == [f"/1.0/projects/{p1}"]


def test_operations_of_other_projects_are_not_found(s):
    """A token operation lives in default: the confined client neither lists, reads, waits for
    nor cancels it (404, as a missing one); the admin does."""
    r = s.admin.api("POST", "/1.0/certificates", json={"name": run_prefix(), "type": "client", "token": True})
    assert r.status_code == 202, r.text
    op_id = r.json()["metadata"]["id"]
    try:
        with s.http() as h:
            for url in (f"/1.0/operations/{op_id}", f"/1.0/operations/{op_id}?project={s.p1}",
                        f"/1.0/operations/{op_id}/wait?project={s.p1}&timeout=0"):
                r = h.get(url)
                assert r.status_code in (403, 404), (url, r.text)
            r = h.get(f"/1.0/operations/{op_id}?project={s.p1}")
            assert r.json()["error"] == "Operation not found"
            assert h.delete(f"/1.0/operations/{op_id}?project={s.p1}").status_code == 404
            for url in (f"/1.0/operations?project={s.p1}&recursion=1", "/1.0/operations?all-projects=true&recursion=1"):
                r = h.get(url)
                assert r.status_code == 200, r.text
                ids = {o["id"] for ops in (r.json()["metadata"] or {}).values() for o in ops}
                assert op_id not in ids, url
        assert s.admin.api("GET", f"/1.0/operations/{op_id}").status_code == 200
    finally:
        s.admin.api("DELETE", f"/1.0/operations/{op_id}")


def test_events_reach_the_confined_client_for_its_project_only(s):
    c, p1 = s.client, s.p1
    mons = [subprocess.Popen(c.lxc_argv("monitor", "--type", "lifecycle", "-f", "json", *args), env=c.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for args in (("--all-projects",), ("--project", p1))]
    try:
        time.sleep(2.0)  # connected
        s.admin.lxc("config", "set", "in-default", "user.ev", "1")
        s.admin.lxc("config", "set", "in-p2", "user.ev", "1", "--project", s.p2)
        s.admin.lxc("config", "set", "in-p1", "user.ev", "1", "--project", p1)
        time.sleep(1.0)
    finally:
        for m in mons:
            m.terminate()
        outs = [m.communicate(timeout=10) for m in mons]
    for out, err in outs:
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        sources = [e["metadata"]["source"] for e in events if e["metadata"]["action"] == "instance-updated"]
        assert sources == [f"/1.0/instances/in-p1?project={p1}"], (out, err)
        assert {e.get("project") for e in events} == {p1}
    # The default project's events: refused (403 before the websocket handshake).
    r = c.lxc("monitor", "--type", "lifecycle", "--project", "default", check=False, timeout=20)
    assert r.returncode != 0, r.stdout

    async def handshake(query: str) -> int:
        try:
            async with websockets.connect(s.url.replace("https", "wss") + "/1.0/events" + query, ssl=s.tls_context(),
                                          open_timeout=10):
                return 101
        except websockets.exceptions.InvalidStatus as e:
            return e.response.status_code

    for query, want in (("", 403), ("?project=default", 403), (f"?project={s.p2}", 403),
                        (f"?project={p1}", 101), ("?all-projects=true", 101)):
        assert asyncio.run(handshake(query)) == want, query


ESCAPES = (("security.privileged", "true"), ("raw.lxc", "lxc.apparmor.profile=unconfined"),
           ("security.nesting", "true"), ("raw.idmap", "both 0 0"), ("raw.idmap", "uid 1000-2000 0-1000"))


def test_no_escape_to_the_host_through_the_restricted_project(s, tmp_path):
    c, p1 = s.client, s.p1
    pp = ("--project", p1)
    for key, value in ESCAPES:
        for args in (("init", "busybox", "esc", "-c", f"{key}={value}", *pp),
                     ("config", "set", "in-p1", key, value, *pp),
                     ("profile", "set", "default", key, value, *pp),
                     ("copy", "in-p1", "esc", "-c", f"{key}={value}", *pp)):
            err = fails(c, *args)
            assert "forbidden" in err, (args, err)
    conf = yaml.safe_load(c.lxc("config", "show", "in-p1", *pp).stdout)
    conf["config"]["security.privileged"] = "true"
    assert "forbidden" in fails(c, "config", "edit", "in-p1", *pp, input=yaml.safe_dump(conf))
    # A disk device of a host path (restricted.devices.disk defaults to managed volumes only).
    err = fails(c, "config", "device", "add", "in-p1", "h", "disk", "source=/", "path=/mnt", *pp)
    assert "not allowed" in err or "forbidden" in err, err
    err = fails(c, "profile", "device", "add", "default", "h", "disk", "source=/etc", "path=/mnt", *pp)
    assert "not allowed" in err or "forbidden" in err, err
    with s.http() as h:
        r = h.post(f"/1.0/instances?project={p1}", json={
            "name": "esc", "source": {"type": "image", "alias": "busybox"},
            "devices": {"h": {"type": "disk", "source": "/", "path": "/mnt"}}})
        assert r.status_code in (400, 403), r.text
        # A new profile with the escape, attached at create.
        r = h.post(f"/1.0/profiles?project={p1}", json={"name": "esc", "config": {"security.privileged": "true"}})
        assert r.status_code in (400, 403) and "forbidden" in r.text, r.text
        # Unix devices and the like are blocked too (restricted.devices.unix-char=block).
        r = h.patch(f"/1.0/instances/in-p1?project={p1}", json={
            "devices": {"k": {"type": "unix-char", "source": "/dev/kmsg", "path": "/dev/kmsg"}}})
        assert r.status_code in (400, 403), r.text
    after = s.admin.api("GET", f"/1.0/instances/in-p1?project={p1}").json()["metadata"]
    assert not {"security.privileged", "raw.lxc", "security.nesting", "raw.idmap"} & set(after["config"])
    assert "h" not in after["devices"] and "k" not in after["devices"]
    assert s.admin.api("GET", f"/1.0/instances/esc?project={p1}").status_code == 404


def test_certificate_projects_must_exist_and_follow_rename_and_delete(s, tmp_path):
    a = s.admin
    crt, _ = self_signed(tmp_path, "follow")
    pem = crt.read_text()
    err = fails(a, "config", "trust", "add", "--name", "x", "--restricted", "--projects", f"{s.p1}-nope")
    assert "not found" in err, err
    r = a.api("POST", "/1.0/certificates", json={"type": "client", "certificate": pem, "name": "follow",
                                                 "restricted": True, "projects": ["nope-" + s.p1]})
    assert r.status_code == 404 and "not found" in r.json()["error"], r.text
    moving = f"{s.p1}m"
    a.lxc("project", "create", moving, "-c", "features.profiles=false")
    try:
        r = a.api("POST", "/1.0/certificates", json={"type": "client", "certificate": pem, "name": "follow",
                                                     "restricted": True, "projects": [moving, s.p1]})
        assert r.status_code == 201, r.text
        fp = r.headers["location"].rsplit("/", 1)[-1]
        a.lxc("project", "rename", moving, moving + "x")
        assert a.api("GET", f"/1.0/certificates/{fp}").json()["metadata"]["projects"] == [moving + "x", s.p1]
        a.lxc("project", "delete", moving + "x")
        assert a.api("GET", f"/1.0/certificates/{fp}").json()["metadata"]["projects"] == [s.p1]
        a.api("DELETE", f"/1.0/certificates/{fp}")
    finally:
        for p in (moving, moving + "x"):
            a.api("DELETE", f"/1.0/projects/{p}")
