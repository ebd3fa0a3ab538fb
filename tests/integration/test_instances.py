"""Instances through the stock client, curl-level API and pylxd, on the session daemon."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from tests.helpers import init_pid, root_subids, run_prefix, wait_for, wait_op

pytestmark = pytest.mark.integration


def state(d, name):
    return d.api("GET", f"/1.0/instances/{name}").json()["metadata"]["status"]


def test_launch_is_unprivileged_and_lifecycle(ready, names):
    d = ready
    c = names("a")
    d.lxc("launch", "busybox", c)
    assert state(d, c) == "Running"
    pid = init_pid(d, c)
    base_uid, base_gid = root_subids()
    uid_map = open(f"/proc/{pid}/uid_map").read().split()
    assert uid_map[:2] == ["0", str(base_uid)], uid_map
    inst = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert inst["config"]["volatile.idmap.base"] == str(base_uid)
    assert json.loads(inst["config"]["volatile.last_state.idmap"])[0]["Hostid"] == base_uid
    assert inst["config"]["volatile.base_image"]
    assert inst["expanded_devices"]["root"] == {"path": "/", "pool": "default", "type": "disk"}
    # Files in the rootfs belong to the mapped root.
    import os
    st = os.stat(f"{d.lxd_dir}/containers/{c}/rootfs/bin/busybox")
    assert (st.st_uid, st.st_gid) == (base_uid, base_gid)

    r = d.lxc("start", c, check=False)
    assert r.returncode != 0 and "already running" in r.stderr
    d.lxc("pause", c)
    assert state(d, c) == "Frozen"
    d.lxc("start", c)  # resumes a frozen instance
    assert state(d, c) == "Running"
    d.lxc("restart", c, "-f")
    assert state(d, c) == "Running"
    assert init_pid(d, c) != pid
    d.lxc("stop", c, "--timeout", "10")  # clean shutdown (SIGPWR to init)
    assert state(d, c) == "Stopped"
    r = d.lxc("stop", c, check=False)
    assert r.returncode != 0 and "already stopped" in r.stderr
    d.lxc("start", c)
    r = d.lxc("delete", c, check=False)
    assert r.returncode != 0 and "running" in r.stderr.lower()
    d.lxc("delete", "-f", c)
    assert d.api("GET", f"/1.0/instances/{c}").status_code == 404
    assert not (d.lxd_dir / "containers" / c).exists()


def test_list_formats_and_server_filter(ready, names):
    d = ready
    a, b = names("run"), names("stop")
    d.lxc("launch", "busybox", a)
    d.lxc("init", "busybox", b)
    out = d.lxc("list").stdout
    assert a in out and b in out and "RUNNING" in out and "STOPPED" in out
    csv = d.lxc("list", "-c", "ns", "--format", "csv").stdout
    assert f"{a},RUNNING" in csv and f"{b},STOPPED" in csv
    js = json.loads(d.lxc("list", "--format", "json").stdout)
    mine = {i["name"]: i for i in js if i["name"] in (a, b)}
    assert mine[a]["state"]["status"] == "Running" and mine[a]["state"]["pid"] > 0
    assert mine[b]["state"]["status"] == "Stopped"
    ym = yaml.safe_load(d.lxc("list", "--format", "yaml").stdout)
    assert {i["name"] for i in ym} >= {a, b}
    only = d.lxc("list", "status=running", "-c", "n", "--format", "csv").stdout.split()
    assert a in only and b not in only
    # The server evaluates the filter itself.
    r = d.api("GET", "/1.0/instances", params={"filter": f"name eq {b}", "recursion": "1"}).json()
    assert [i["name"] for i in r["metadata"]] == [b]
    r = d.api("GET", "/1.0/instances", params={"filter": "status eq running"}).json()
    assert f"/1.0/instances/{a}" in r["metadata"] and f"/1.0/instances/{b}" not in r["metadata"]
    full = d.api("GET", "/1.0/instances", params={"recursion": "2", "filter": f"name eq {a}"}).json()["metadata"]
    assert full[0]["state"]["network"]["lo"]["type"] == "loopback"
    assert full[0]["snapshots"] == [] and full[0]["backups"] == []
    # The same objects under the older /1.0/containers prefix.
    r = d.api("GET", "/1.0/containers").json()["metadata"]
    assert f"/1.0/containers/{a}" in r


def test_info_and_logs(ready, names):
    d = ready
    c = names("info")
    d.lxc("launch", "busybox", c)
    info = d.lxc("info", c).stdout
    assert "Status: RUNNING" in info and "PID:" in info and "Processes:" in info
    d.lxc("info", c, "--show-log")
    logs = d.api("GET", f"/1.0/instances/{c}/logs").json()["metadata"]
    assert f"/1.0/instances/{c}/logs/lxc.conf" in logs
    conf = d.api("GET", f"/1.0/instances/{c}/logs/lxc.conf")
    assert conf.status_code == 200 and "lxc.idmap" in conf.text
    assert d.api("GET", f"/1.0/instances/{c}/logs/..%2Fetc").status_code in (400, 404)
    assert d.api("DELETE", f"/1.0/instances/{c}/logs/lxc.conf").status_code == 400
    assert d.api("GET", f"/1.0/instances/{c}/logs/nope.txt").status_code == 400


def test_config_commands(ready, names):
    d = ready
    c = names("cfg")
    d.lxc("init", "busybox", c)
    d.lxc("config", "set", c, "user.color", "blue")
    assert d.lxc("config", "get", c, "user.color").stdout.strip() == "blue"
    shown = yaml.safe_load(d.lxc("config", "show", c).stdout)
    assert shown["config"]["user.color"] == "blue"
    shown["config"]["user.size"] = "big"
    shown["description"] = "edited"
    d.lxc("config", "edit", c, input=yaml.safe_dump(shown))
    inst = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert inst["config"]["user.size"] == "big" and inst["description"] == "edited"
    d.lxc("config", "unset", c, "user.color")
    assert d.lxc("config", "get", c, "user.color").stdout.strip() == ""
    r = d.lxc("config", "set", c, "bogus.key", "1", check=False)
    assert r.returncode != 0 and "bogus.key" in r.stderr
    # ETag / If-Match
    resp = d.api("GET", f"/1.0/instances/{c}")
    etag = resp.headers["ETag"]
    r = d.api("PATCH", f"/1.0/instances/{c}", json={"config": {"user.x": "1"}}, headers={"If-Match": '"bad"'})
    assert r.status_code == 412
    r = d.api("PATCH", f"/1.0/instances/{c}", json={"config": {"user.x": "1"}}, headers={"If-Match": etag})
    assert r.status_code == 200


def test_names_and_errors(ready, names):
    d = ready
    for bad in ("1abc", "-abc", "a_b", "a" * 64, "abc-"):
        r = d.api("POST", "/1.0/instances", json={"name": bad, "source": {"type": "none"}})
        assert r.status_code == 400, bad
    c = names("dup")
    d.lxc("init", "busybox", c)
    r = d.api("POST", "/1.0/instances", json={"name": c, "source": {"type": "none"}})
    assert r.status_code == 409
    r = d.api("POST", "/1.0/instances", json={"name": names("np"), "profiles": ["nope"], "source": {"type": "none"}})
    assert r.status_code == 400 and "nope" in r.json()["error"]
    r = d.api("POST", "/1.0/instances", json={"name": names("ni"), "source": {"type": "image", "alias": "nonexistent"}})
    assert r.status_code == 404
    assert d.api("GET", "/1.0/instances/nonexistent-x").status_code == 404
    # No name: the server picks one (as LXD does for `lxc launch IMAGE`).
    op = wait_op(d, d.api("POST", "/1.0/instances", json={"source": {"type": "none"}}))
    assert op["status"] == "Success", op["err"]
    url = op["resources"]["instances"][0]
    generated = url.rsplit("/", 1)[1]
    try:
        assert d.api("GET", url).status_code == 200
    finally:
        d.lxc("delete", "-f", generated, check=False)


def test_profiles_none_and_empty_list(ready, names):
    d = ready
    a, b = names("pn"), names("pe")
    wait_op(d, d.api("POST", "/1.0/instances", json={"name": a, "profiles": None, "source": {"type": "none"}}))
    assert d.api("GET", f"/1.0/instances/{a}").json()["metadata"]["profiles"] == ["default"]
    r = d.api("POST", "/1.0/instances", json={"name": b, "profiles": [], "source": {"type": "none"}})
    assert r.status_code == 400 and "root" in r.json()["error"].lower()
    wait_op(d, d.api("POST", "/1.0/instances", json={
        "name": b, "profiles": [], "source": {"type": "none"},
        "devices": {"root": {"type": "disk", "path": "/", "pool": "default"}}}))
    assert d.api("GET", f"/1.0/instances/{b}").json()["metadata"]["profiles"] == []


def test_rename_copy_and_ephemeral(ready, names):
    d = ready
    a, b, cp, e = names("ra"), names("rb"), names("cp"), names("eph")
    d.lxc("launch", "busybox", a)
    r = d.lxc("rename", a, b, check=False)
    assert r.returncode != 0
    d.lxc("stop", "-f", a)
    d.lxc("init", "busybox", b)
    r = d.api("POST", f"/1.0/instances/{a}", json={"name": b})
    op = wait_op(d, r)
    assert op["status"] == "Failure" and "already in use" in op["err"]
    d.lxc("delete", b)
    d.lxc("rename", a, b)
    assert d.api("GET", f"/1.0/instances/{a}").status_code == 404
    d.lxc("start", b)
    assert state(d, b) == "Running"
    d.lxc("copy", b, cp)
    src = d.api("GET", f"/1.0/instances/{b}").json()["metadata"]["config"]
    dst = d.api("GET", f"/1.0/instances/{cp}").json()["metadata"]["config"]
    assert dst["volatile.base_image"] == src["volatile.base_image"]
    assert "volatile.uuid" not in dst or dst["volatile.uuid"] != src["volatile.uuid"]
    assert "volatile.last_state.power" not in dst
    d.lxc("start", cp)
    assert state(d, cp) == "Running"
    d.lxc("launch", "busybox", e, "-e")
    d.lxc("stop", "-f", e)
    assert d.api("GET", f"/1.0/instances/{e}").status_code == 404


def test_profiles_commands(ready, names):
    d = ready
    p = run_prefix() + "-prof"
    p2, p3 = p + "2", p + "3"
    c = names("prof")
    try:
        r = d.api("POST", "/1.0/profiles", json={"name": p, "config": {"user.a": "1"}})
        assert r.status_code == 201 and r.headers["Location"] == f"/1.0/profiles/{p}"
        d.lxc("profile", "set", p, "user.b", "2")
        assert d.lxc("profile", "get", p, "user.b").stdout.strip() == "2"
        d.lxc("profile", "unset", p, "user.a")
        d.lxc("profile", "copy", p, p2)
        shown = yaml.safe_load(d.lxc("profile", "show", p2).stdout)
        assert shown["config"] == {"user.b": "2"}
        shown["description"] = "copied"
        d.lxc("profile", "edit", p2, input=yaml.safe_dump(shown))
        assert d.api("GET", f"/1.0/profiles/{p2}").json()["metadata"]["description"] == "copied"
        d.lxc("profile", "rename", p2, p3)
        assert d.api("GET", f"/1.0/profiles/{p3}").status_code == 200
        d.lxc("init", "busybox", c, "-p", "default", "-p", p)
        assert d.api("GET", f"/1.0/profiles/{p}").json()["metadata"]["used_by"] == [f"/1.0/instances/{c}"]
        inst = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
        assert inst["expanded_config"]["user.b"] == "2"
        r = d.lxc("profile", "delete", p, check=False)
        assert r.returncode != 0 and "in use" in r.stderr
        d.lxc("profile", "add", c, p3)
        assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["profiles"] == ["default", p, p3]
        d.lxc("profile", "remove", c, p3)
        d.lxc("profile", "assign", c, "default")
        assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["profiles"] == ["default"]
        assert d.api("GET", f"/1.0/profiles/{p}").json()["metadata"]["used_by"] == []
        # A profile change reaches the instances using it.
        d.lxc("profile", "add", c, p)
        d.lxc("profile", "set", p, "user.live", "yes")
        assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["expanded_config"]["user.live"] == "yes"
        # default can't go away or be renamed; volatile keys are refused on profiles.
        assert d.lxc("profile", "delete", "default", check=False).returncode != 0
        assert d.api("POST", "/1.0/profiles/default", json={"name": "x"}).status_code == 400
        r = d.api("PATCH", f"/1.0/profiles/{p}", json={"config": {"volatile.x": "1"}})
        assert r.status_code == 400
        assert d.api("POST", "/1.0/profiles", json={"name": p}).status_code == 409
    finally:
        d.lxc("delete", "-f", c, check=False)
        for n in (p, p2, p3):
            d.lxc("profile", "delete", n, check=False)


def test_bulk_state_and_start_all(ready, names):
    d = ready
    a, b = names("ba"), names("bb")
    d.lxc("init", "busybox", a)
    d.lxc("init", "busybox", b)
    d.lxc("start", a, b)
    assert state(d, a) == state(d, b) == "Running"
    d.lxc("stop", "-f", a, b)
    d.lxc("start", "--all")
    assert state(d, a) == state(d, b) == "Running"
    op = wait_op(d, d.api("PUT", "/1.0/instances", json={"state": {"action": "stop", "force": True}}))
    assert op["status"] == "Success", op
    assert state(d, a) == state(d, b) == "Stopped"


def test_concurrent_start_stop_one_container(ready, names):
    d = ready
    c = names("conc")
    d.lxc("init", "busybox", c)
    errors: list[str] = []

    def worker(action):
        for _ in range(5):
            r = d.api("PUT", f"/1.0/instances/{c}/state", json={"action": action, "force": True})
            op = wait_op(d, r)
            if op["status"] != "Success" and "already" not in op["err"]:
                errors.append(op["err"])

    ts = [threading.Thread(target=worker, args=(a,)) for a in ("start", "stop", "start", "stop")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    st = d.api("GET", f"/1.0/instances/{c}/state").json()["metadata"]
    if st["status"] == "Running":
        assert open(f"/proc/{st['pid']}/uid_map").read().split()[1] == str(root_subids()[0])
    d.lxc("stop", "-f", c, check=False)
    d.lxc("start", c)
    assert state(d, c) == "Running"


def test_pylxd_lifecycle(ready, names):
    d = ready
    c = names("pylxd")
    code = f"""
c = client.containers.create({{"name": "{c}", "source": {{"type": "image", "alias": "busybox"}}}}, wait=True)
c.start(wait=True)
c.sync()
print("STATUS", c.status)
c.stop(wait=True, force=True)
c.sync()
print("STATUS", c.status)
c.delete(wait=True)
print("EXISTS", client.containers.exists("{c}"))
"""
    r = d.pylxd(code)
    assert r.returncode == 0, r.stderr
    assert "STATUS Running" in r.stdout and "STATUS Stopped" in r.stdout and "EXISTS False" in r.stdout


def test_storage_pool_endpoints(ready):
    d = ready
    pools = d.api("GET", "/1.0/storage-pools").json()["metadata"]
    assert "/1.0/storage-pools/default" in pools
    p = d.api("GET", "/1.0/storage-pools/default").json()["metadata"]
    assert p["driver"] == "dir" and p["status"] == "Created"
    assert "/1.0/profiles/default" in p["used_by"]
    r = d.api("POST", "/1.0/storage-pools", json={"name": "default", "driver": "dir"})
    assert r.status_code == 409
    r = d.api("POST", "/1.0/storage-pools", json={"name": "zz", "driver": "zfs"})
    assert r.status_code == 400
    assert d.api("DELETE", "/1.0/storage-pools/default").status_code == 400
    assert d.lxc("storage", "list").returncode == 0


def test_lifecycle_events(ready, names):
    d = ready
    c = names("ev")
    import subprocess
    import time
    mon = subprocess.Popen([d.env.get("LXC", "lxc"), "monitor", "--type", "lifecycle", "--format", "json"],
                           env=d.env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        d.lxc("launch", "busybox", c)
        d.lxc("config", "set", c, "user.e", "1")
        d.lxc("stop", "-f", c)
        d.lxc("delete", c)
        time.sleep(0.5)
    finally:
        mon.terminate()
        out, _ = mon.communicate(timeout=10)
    actions = []
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        ev = json.loads(line)
        if ev.get("metadata", {}).get("source", "").endswith(f"/{c}"):
            actions.append(ev["metadata"]["action"])
    for want in ("instance-created", "instance-started", "instance-updated", "instance-stopped", "instance-deleted"):
        assert want in actions, (want, actions)


def test_launch_delete_cycles_leave_nothing(ready):
    _cycles(ready, 20)


@pytest.mark.slow
def test_launch_delete_soak(ready):
    _cycles(ready, 500)


def _cycles(d, n):
    import os

    prefix = run_prefix()
    pid = d.proc.pid
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    for i in range(n):
        c = f"{prefix}-cy{i % 3}"
        wait_op(d, d.api("POST", "/1.0/instances", json={"name": c, "source": {"type": "image", "alias": "busybox"}}))
        op = wait_op(d, d.api("PUT", f"/1.0/instances/{c}/state", json={"action": "start"}))
        assert op["status"] == "Success", (i, op["err"])
        op = wait_op(d, d.api("PUT", f"/1.0/instances/{c}/state", json={"action": "stop", "force": True}))
        assert op["status"] == "Success", (i, op["err"])
        op = wait_op(d, d.api("DELETE", f"/1.0/instances/{c}"))
        assert op["status"] == "Success", (i, op["err"])

    def clean():
        procs = [p for p in os.listdir("/proc") if p.isdigit() and _cmd(p).find(f"{prefix}-cy") >= 0]
        cgs = [e for ctrl in os.listdir("/sys/fs/cgroup") if os.path.isdir(f"/sys/fs/cgroup/{ctrl}")
               for e in os.listdir(f"/sys/fs/cgroup/{ctrl}") if f"{prefix}-cy" in e]
        mounts = [m for m in open("/proc/self/mountinfo").read().splitlines() if f"{prefix}-cy" in m]
        dirs = [e for e in os.listdir(d.lxd_dir / "storage-pools/default/containers") if prefix in e]
        return not (procs or cgs or mounts or dirs)

    wait_for(clean, timeout=15, interval=0.2)
    rows = d.lxd("sql", "local", f"SELECT count(*) FROM instances WHERE name LIKE '{prefix}%'").stdout
    assert "| 0 " in rows or "0" in rows.split("|")[-2], rows
    fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    assert fds_after <= fds_before + 5, (fds_before, fds_after)


def _cmd(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""
