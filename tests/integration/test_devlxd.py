"""/dev/lxd from inside real containers: a static client (devlxd_client.c) pushed into busybox
containers talks to /dev/lxd/sock; the daemon tells who is calling from the kernel's credentials."""

import json
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ensure_containers_ready, run_prefix

pytestmark = pytest.mark.integration

SOURCE = Path(__file__).with_name("devlxd_client.c")
CLIENT = "/root/devlxd"


@pytest.fixture(scope="module")
def client_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("devlxd") / "devlxd"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(SOURCE)], check=True, capture_output=True)
    return out


def _launch(d, name, client_bin, *config):
    args = ["init", ensure_containers_ready(d), name]
    for c in config:
        args += ["-c", c]
    d.lxc(*args)
    d.lxc("start", name)
    d.lxc("file", "push", str(client_bin), f"{name}{CLIENT}", "--mode", "0755")


@pytest.fixture(scope="module")
def guest(ready, client_bin):
    """A running container with user.foo, cloud-init.user-data and some non-user keys."""
    name = run_prefix() + "-dl1"
    try:
        _launch(ready, name, client_bin, "user.foo=bar baz", "cloud-init.user-data=#cloud-config\n",
                "limits.memory=256MiB", "user.meta-data=extra: 1")
        yield name
    finally:
        ready.lxc("delete", "-f", name, check=False)


def req(d, name, method, path, body=None):
    argv = ["exec", name, "--", CLIENT, "req", method, path] + ([body] if body is not None else [])
    out = d.lxc(*argv).stdout
    status, _, rest = out.partition("\n")
    return int(status), rest


def test_root_and_api(ready, guest):
    assert req(ready, guest, "GET", "/") == (200, '["/1.0"]\n')
    status, body = req(ready, guest, "GET", "/1.0")
    assert status == 200
    doc = json.loads(body)
    assert doc["api_version"] == "1.0" and doc["instance_type"] == "container"
    assert doc["location"] == "none" and doc["state"] == "Started"
    assert req(ready, guest, "PATCH", "/1.0", '{"state":"Ready"}')[0] == 200
    assert json.loads(req(ready, guest, "GET", "/1.0")[1])["state"] == "Ready"
    assert req(ready, guest, "PATCH", "/1.0", '{"state":"Bogus"}')[0] == 400
    assert req(ready, guest, "GET", "/nope")[0] == 404


def test_non_root_is_refused(ready, guest):
    ready.lxc("exec", guest, "--", "cp", CLIENT, "/tmp/devlxd")
    r = ready.lxc("exec", guest, "--user", "1000", "--", "/tmp/devlxd", "req", "GET", "/1.0")
    assert r.stdout == "401\nAccess denied for non-root user\n"


def test_config(ready, guest):
    status, body = req(ready, guest, "GET", "/1.0/config")
    assert status == 200
    keys = json.loads(body)
    assert sorted(keys) == ["/1.0/config/cloud-init.user-data", "/1.0/config/user.foo", "/1.0/config/user.meta-data"]
    assert req(ready, guest, "GET", "/1.0/config/user.foo") == (200, "bar baz")
    assert req(ready, guest, "GET", "/1.0/config/cloud-init.user-data") == (200, "#cloud-config\n")
    # a value set while it runs is read at once
    ready.lxc("config", "set", guest, "user.later", "v2")
    assert req(ready, guest, "GET", "/1.0/config/user.later") == (200, "v2")
    # outside user.* and cloud-init.*: refused; a missing user key: not found
    assert req(ready, guest, "GET", "/1.0/config/limits.memory")[0] == 403
    assert req(ready, guest, "GET", "/1.0/config/volatile.idmap.current")[0] == 403
    assert req(ready, guest, "GET", "/1.0/config/user.missing")[0] == 404


def test_meta_data_and_devices(ready, guest):
    status, body = req(ready, guest, "GET", "/1.0/meta-data")
    assert status == 200
    conf = ready.api("GET", f"/1.0/instances/{guest}").json()["metadata"]["config"]
    iid = conf.get("volatile.cloud-init.instance-id") or guest
    assert body == f"#cloud-config\ninstance-id: {iid}\nlocal-hostname: {guest}\nextra: 1"
    status, body = req(ready, guest, "GET", "/1.0/devices")
    assert status == 200
    devices = json.loads(body)
    expanded = ready.api("GET", f"/1.0/instances/{guest}").json()["metadata"]["expanded_devices"]
    assert devices == expanded and devices["root"]["type"] == "disk"


def test_images_export_needs_the_key(ready, guest):
    fp = ready.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    assert req(ready, guest, "GET", f"/1.0/images/{fp}/export")[0] == 403


def _read_line(proc, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if r:
            return proc.stdout.readline()
    raise AssertionError("no line in time")


@pytest.mark.parametrize("mode", ["events", "wsevents"])
def test_config_and_device_events(ready, guest, mode, tmp_path):
    proc = subprocess.Popen(ready.lxc_argv("exec", guest, "--", CLIENT, mode, "2"), env=ready.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _read_line(proc, 30).strip() == "ready"
        ready.lxc("config", "set", guest, f"user.{mode}", "y")
        ev = json.loads(_read_line(proc, 10))
        assert ev["type"] == "config"
        assert ev["metadata"] == {"key": f"user.{mode}", "old_value": "", "value": "y"}
        ready.lxc("config", "device", "add", guest, "extra", "disk", f"source={tmp_path}", "path=/mnt/extra")
        ev = json.loads(_read_line(proc, 10))
        assert ev["type"] == "device"
        assert ev["metadata"] == {"action": "added", "name": "extra",
                                  "config": {"type": "disk", "source": str(tmp_path), "path": "/mnt/extra"}}
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ready.lxc("config", "device", "remove", guest, "extra", check=False)


def test_events_type_filter_and_other_keys(ready, guest, tmp_path):
    proc = subprocess.Popen(ready.lxc_argv("exec", guest, "--", CLIENT, "events", "1", "type=config"),
                            env=ready.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _read_line(proc, 30).strip() == "ready"
        ready.lxc("config", "device", "add", guest, "filtered", "disk", f"source={tmp_path}",
                  "path=/mnt/filtered")  # a device: not asked for
        ready.lxc("config", "set", guest, "limits.processes", "500")     # not user.*: never sent
        ready.lxc("config", "set", guest, "user.filter", "z")
        ev = json.loads(_read_line(proc, 10))
        assert ev["type"] == "config" and ev["metadata"]["key"] == "user.filter"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ready.lxc("config", "device", "remove", guest, "filtered", check=False)


def test_profile_change_events(ready, guest, names, tmp_path):
    """A change to a profile the guest uses reaches it as a change of its expanded config and
    devices; a profile key the instance overrides changes nothing it sees."""
    prof = names("dlp")
    ready.lxc("profile", "create", prof)
    ready.lxc("profile", "add", guest, prof)
    proc = subprocess.Popen(ready.lxc_argv("exec", guest, "--", CLIENT, "events", "4"), env=ready.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _read_line(proc, 30).strip() == "ready"
        ready.lxc("profile", "set", prof, "user.foo", "from-profile")  # the instance's own value wins
        ready.lxc("profile", "set", prof, "user.prof", "y")
        ev = json.loads(_read_line(proc, 10))
        assert ev["type"] == "config" and ev["metadata"] == {"key": "user.prof", "old_value": "", "value": "y"}
        ready.lxc("profile", "set", prof, "user.prof", "z")
        ev = json.loads(_read_line(proc, 10))
        assert ev["metadata"] == {"key": "user.prof", "old_value": "y", "value": "z"}
        ready.lxc("profile", "device", "add", prof, "pdev", "disk", f"source={tmp_path}", "path=/mnt/pdev")
        ev = json.loads(_read_line(proc, 10))
        assert ev["type"] == "device"
        assert ev["metadata"] == {"action": "added", "name": "pdev",
                                  "config": {"type": "disk", "source": str(tmp_path), "path": "/mnt/pdev"}}
        ready.lxc("profile", "device", "remove", prof, "pdev")
        ev = json.loads(_read_line(proc, 10))
        assert ev["type"] == "device" and ev["metadata"]["action"] == "removed"
        assert ev["metadata"]["name"] == "pdev"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ready.lxc("profile", "remove", guest, prof, check=False)
        ready.lxc("profile", "delete", prof, check=False)
    assert req(ready, guest, "GET", "/1.0/config/user.prof")[0] == 404
    assert req(ready, guest, "GET", "/1.0/config/user.foo") == (200, "bar baz")


def _export(d, name, fp) -> tuple[int, dict, bytes]:
    r = subprocess.run(d.lxc_argv("exec", name, "--", CLIENT, "dump", f"/1.0/images/{fp}/export"), env=d.env,
                       capture_output=True, check=True, timeout=60)
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_image_export_unified_and_split(ready, guest, tmp_path):
    import hashlib

    from lxd_daemon.imagebuilder.busybox import build_busybox
    from tests.helpers import busybox_tarball

    fp = ready.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    split = build_busybox(tmp_path, name=run_prefix() + "-dlsplit", fmt="split", compression="gzip",
                          rootfs_format="tar")
    ready.lxc("image", "import", *map(str, split.paths), "--public")
    ready.lxc("config", "set", guest, "security.devlxd.images", "true")
    try:
        # a private image that is not cached: not for the guest; neither is a fingerprint prefix
        assert _export(ready, guest, fp)[0] == 404
        assert _export(ready, guest, split.fingerprint[:12])[0] == 404
        assert _export(ready, guest, "0" * 64)[0] == 404
        # a unified image, once public: its one file
        assert ready.api("PATCH", f"/1.0/images/{fp}", json={"public": True}).status_code == 200
        status, headers, body = _export(ready, guest, fp)
        assert status == 200 and headers["content-type"] == "application/octet-stream"
        assert body == busybox_tarball().read_bytes() and hashlib.sha256(body).hexdigest() == fp
        assert f"filename={fp}.tar.gz" in headers["content-disposition"]
        # a split image: multipart/form-data with the metadata and rootfs parts
        status, headers, body = _export(ready, guest, split.fingerprint)
        assert status == 200 and int(headers["content-length"]) == len(body)
        ctype = headers["content-type"]
        assert ctype.startswith("multipart/form-data; boundary="), ctype
        boundary = ctype.split("boundary=", 1)[1].encode()
        parts = body.split(b"--" + boundary)
        assert parts[0] == b"" and parts[-1] == b"--\r\n" and len(parts) == 4
        got = {}
        for part in parts[1:3]:
            phead, _, data = part.partition(b"\r\n\r\n")
            assert data.endswith(b"\r\n")
            got[phead.split(b'name="')[1].split(b'"')[0].decode()] = (phead, data[:-2])
        meta, rootfs = (Path(p).read_bytes() for p in split.paths)
        assert got["metadata"][1] == meta and got["rootfs"][1] == rootfs
        assert b'filename="meta-' + split.fingerprint.encode() + b'.tar.gz"' in got["metadata"][0]
        assert hashlib.sha256(meta + rootfs).hexdigest() == split.fingerprint
    finally:
        ready.api("PATCH", f"/1.0/images/{fp}", json={"public": False})
        ready.lxc("config", "unset", guest, "security.devlxd.images", check=False)
        ready.lxc("image", "delete", split.fingerprint, check=False)
    assert _export(ready, guest, fp)[0] == 403  # the key is off again


def test_second_guest_sees_only_itself_and_devlxd_off(ready, guest, client_bin, names):
    other = names("dl2")
    _launch(ready, other, client_bin, "user.mine=2")
    status, body = req(ready, other, "GET", "/1.0/config")
    assert status == 200 and json.loads(body) == ["/1.0/config/user.mine"]
    assert req(ready, other, "GET", "/1.0/config/user.foo")[0] == 404  # the first guest's key
    assert f"\nlocal-hostname: {other}\n" in req(ready, other, "GET", "/1.0/meta-data")[1]
    # security.devlxd=false, set while stopped: no /dev/lxd/sock after the start
    ready.lxc("stop", "-f", other)
    ready.lxc("config", "set", other, "security.devlxd", "false")
    ready.lxc("start", other)
    r = ready.lxc("exec", other, "--", "sh", "-c", "test -e /dev/lxd/sock && echo present || echo absent")
    assert r.stdout.strip() == "absent"
    r = ready.lxc("exec", other, "--", CLIENT, "req", "GET", "/1.0", check=False)
    assert r.returncode != 0 and "connect" in r.stderr
    # toggled on the running container: the socket comes and goes at once
    ready.lxc("config", "set", other, "security.devlxd", "true")
    assert req(ready, other, "GET", "/1.0/config") == (200, '["/1.0/config/user.mine"]\n')
    ready.lxc("config", "set", other, "security.devlxd", "false")
    r = ready.lxc("exec", other, "--", "sh", "-c", "test -e /dev/lxd && echo present || echo absent")
    assert r.stdout.strip() == "absent"


def test_host_process_is_refused(ready, guest):
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(ready.lxd_dir / "devlxd" / "sock"))
    s.sendall(b"GET /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 403 ")
    mode = (ready.lxd_dir / "devlxd" / "sock").stat().st_mode & 0o777
    assert mode == 0o666 and (ready.lxd_dir / "devlxd").stat().st_mode & 0o777 == 0o755


def test_bad_input_and_request_budget(ready, guest):
    out = ready.lxc("exec", guest, "--", CLIENT, "raw", "GARBAGE\\r\\n\\r\\n").stdout
    assert out.startswith("HTTP/1.1 4"), out
    out = ready.lxc("exec", guest, "--", CLIENT, "raw",
                    "GET /1.0 HTTP/1.1\\r\\nHost: lxd\\r\\nContent-Length: x\\r\\n\\r\\n").stdout
    assert out.startswith("HTTP/1.1 4"), out
    out = ready.lxc("exec", guest, "--", CLIENT, "bighead", "100000").stdout
    assert 400 <= int(out.strip()) < 500
    # on one keep-alive connection, each answer read before the next request: the per-guest
    # request budget (a burst, then a steady rate) runs out and the answer is 429
    out = ready.lxc("exec", guest, "--", CLIENT, "burst", "20000", "/1.0").stdout
    counts = dict(kv.split("=") for kv in out.split())
    assert counts["last"] == "429" and 400 <= int(counts["ok"]) < 20000, out
    time.sleep(1.1)  # the budget refills
    assert req(ready, guest, "GET", "/1.0")[0] == 200


def _daemon_pid(d) -> int:
    pid = d.proc.pid
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"lxd_daemon" in cmd, cmd
    return pid


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _in_guest_us(d, name) -> int:
    """The round trip of GET /1.0 measured inside the guest (lxc exec's own cost left out)."""
    out = d.lxc("exec", name, "--", CLIENT, "bench", "3", "/1.0").stdout
    return int(dict(kv.split("=") for kv in out.split())["p90_us"])


def _flood(d, name, n=2000, seconds=4):
    return subprocess.Popen(d.lxc_argv("exec", name, "--", CLIENT, "flood", str(n), str(seconds)), env=d.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _flood_result(proc) -> dict:
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    counts = {k: int(v) for k, v in (kv.split("=") for kv in out.split())}
    assert proc.returncode == 0 and sum(counts.values()) == 2000, (out, err)
    # a few held connections are served, the rest refused (per-guest connection limit); none is
    # left unanswered
    assert counts["ok"] >= 1 and counts["refused"] >= 1900 and counts["failed"] == 0, out
    return counts


def test_flood_thousands_of_connections(ready, guest, client_bin, names):
    other = names("dlf")
    _launch(ready, other, client_bin)
    pid = _daemon_pid(ready)
    assert _in_guest_us(ready, other) < 1_000_000
    before = _fds(pid)
    # 2000 connections at once from one guest: the host API and the other guest are answered
    # within a second meanwhile
    flood = _flood(ready, guest)
    try:
        time.sleep(1.5)
        for _ in range(3):
            t0 = time.monotonic()
            assert ready.api("GET", "/1.0").status_code == 200
            assert time.monotonic() - t0 < 1.0
        assert _in_guest_us(ready, other) < 1_000_000
    finally:
        _flood_result(flood)
    # 2000 from each of the two guests at once: the host API still answers within a second
    floods = [_flood(ready, guest), _flood(ready, other)]
    try:
        time.sleep(1.5)
        for _ in range(3):
            t0 = time.monotonic()
            assert ready.api("GET", "/1.0").status_code == 200
            assert time.monotonic() - t0 < 1.0
    finally:
        for f in floods:
            _flood_result(f)
    # afterwards both guests are served as before, and the daemon holds no descriptor of theirs
    time.sleep(1.1)  # the request budgets refill
    assert req(ready, guest, "GET", "/1.0")[0] == 200
    assert req(ready, other, "GET", "/1.0/config") == (200, "[]\n")
    deadline = time.monotonic() + 10
    while _fds(pid) > before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _fds(pid) <= before + 5, (before, _fds(pid))
