"""The TLS endpoint (`core.https_address`), driven with curl and the stock client between two
daemons of ours in one network namespace (the `tls_pair` fixture): untrusted access, TLS versions,
moving and stopping the listener, and every remote command the client has (list, launch, exec,
files, console, monitor), plus a removed certificate losing its open websockets."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import PtyProcess, run_prefix, wait_for

pytestmark = pytest.mark.integration


def curl(pair, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """curl inside the pair's namespace (no client certificate unless args give one)."""
    return subprocess.run(["nsenter", f"--net={pair.ns.path}", "curl", "-sk", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=timeout)


def free_port(pair) -> int:
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(pair.ns.run("/usr/bin/python3", "-c", code).stdout)


def client_fingerprint(d) -> str:
    pem = (Path(d.conf_dir) / "client.crt").read_text()
    body = "".join(x for x in pem.strip().splitlines() if not x.startswith("-----"))
    import base64

    return hashlib.sha256(base64.b64decode(body)).hexdigest()


# -- untrusted clients, TLS versions -----------------------------------------------------------

def test_untrusted_client_sees_the_public_list_only(tls_pair):
    r = curl(tls_pair, f"{tls_pair.url_b}/1.0")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status_code"] == 200
    meta = doc["metadata"]
    assert meta["auth"] == "untrusted"
    assert meta["auth_methods"] == ["tls"]
    assert meta["api_version"] == "1.0" and meta["api_extensions"]
    assert "environment" not in meta and "config" not in meta
    assert json.loads(curl(tls_pair, f"{tls_pair.url_b}/").stdout)["metadata"] == ["/1.0"]
    for path in ("/1.0/instances", "/1.0/profiles", "/1.0/storage-pools", "/1.0/operations"):
        r = curl(tls_pair, "-w", "\n%{http_code}", f"{tls_pair.url_b}{path}")
        body, _, status = r.stdout.rpartition("\n")
        assert status == "403", (path, r.stdout)
        assert json.loads(body)["error_code"] == 403
    r = curl(tls_pair, "-X", "PATCH", "-w", "\n%{http_code}", "-d", '{"config": {"core.https_address": ""}}',
             f"{tls_pair.url_b}/1.0")
    assert r.stdout.endswith("403"), r.stdout
    # The trusted document shows where the listener is.
    env = tls_pair.b.api("GET", "/1.0").json()["metadata"]["environment"]
    assert env["addresses"] == [f"127.0.0.1:{tls_pair.port_b}"]


def test_unknown_client_certificate_completes_the_handshake(tls_pair, tmp_path):
    key, crt = tmp_path / "c.key", tmp_path / "c.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(crt), "-subj", "/CN=stranger", "-days", "1"],
                   check=True, capture_output=True)
    r = curl(tls_pair, "--cert", str(crt), "--key", str(key), f"{tls_pair.url_b}/1.0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metadata"]["auth"] == "untrusted"
    r = curl(tls_pair, "--cert", str(crt), "--key", str(key), "-w", "\n%{http_code}", f"{tls_pair.url_b}/1.0/instances")
    assert r.stdout.endswith("403")


def test_tls_versions_and_ciphers(tls_pair):
    url = f"{tls_pair.url_b}/1.0"
    assert curl(tls_pair, "--tls-max", "1.1", url).returncode == 35  # handshake refused
    for args in (["--tlsv1.2", "--tls-max", "1.2"], ["--tlsv1.3"]):
        r = curl(tls_pair, *args, "-w", "\n%{http_code}", url)
        assert r.stdout.endswith("200"), (args, r.stderr)
    # TLS 1.2 without an AEAD cipher: refused.
    assert curl(tls_pair, "--tlsv1.2", "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-SHA", url).returncode == 35


def test_server_certificate_names_the_host(tls_pair):
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tls_pair.b.lxd_dir / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert dns and dns[0] == socket.gethostname()
    # What the stock client pinned is what the server presents.
    pinned = Path(tls_pair.a.conf_dir) / "servercerts" / "b.crt"
    assert pinned.read_text().strip() == (tls_pair.b.lxd_dir / "server.crt").read_text().strip()


def test_listener_moves_and_stops_without_a_restart(tls_pair):
    a = tls_pair.a
    old, new = tls_pair.port_a, free_port(tls_pair)
    pid = a.proc.pid
    try:
        r = a.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{new}"}})
        assert r.status_code == 200, r.text
        assert curl(tls_pair, f"https://127.0.0.1:{old}/1.0").returncode == 7  # nobody listens there now
        assert json.loads(curl(tls_pair, f"https://127.0.0.1:{new}/1.0").stdout)["metadata"]["auth"] == "untrusted"
        assert a.api("GET", "/1.0").json()["metadata"]["environment"]["addresses"] == [f"127.0.0.1:{new}"]
        # A port in use (B's): refused with a clear 400, the listener stays where it was.
        r = a.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{tls_pair.port_b}"}})
        assert r.status_code == 400, r.text
        assert "Cannot listen on" in r.json()["error"] and "in use" in r.json()["error"]
        assert a.api("GET", "/1.0").json()["metadata"]["config"]["core.https_address"] == f"127.0.0.1:{new}"
        assert curl(tls_pair, f"https://127.0.0.1:{new}/1.0").returncode == 0
        # Malformed values: 400 before anything moves.
        for bad in ("127.0.0.1:99999", "[::1", "not a host:1", "1:2:3"):
            r = a.api("PATCH", "/1.0", json={"config": {"core.https_address": bad}})
            assert r.status_code == 400, (bad, r.text)
        # The same port on every address (the old listener holds it: freed, then rebound).
        r = a.api("PATCH", "/1.0", json={"config": {"core.https_address": f":{new}"}})
        assert r.status_code == 200, r.text
        assert curl(tls_pair, f"https://127.0.0.1:{new}/1.0").returncode == 0
        assert curl(tls_pair, "-g", f"https://[::1]:{new}/1.0").returncode == 0
        r = a.api("PATCH", "/1.0", json={"config": {"core.https_address": f"[::1]:{new}"}})
        assert r.status_code == 200, r.text
        assert curl(tls_pair, "-g", f"https://[::1]:{new}/1.0").returncode == 0
        assert curl(tls_pair, f"https://127.0.0.1:{new}/1.0").returncode == 7
        assert a.api("GET", "/1.0").json()["metadata"]["environment"]["addresses"] == [f"[::1]:{new}"]
        # Unset: stopped.
        r = a.api("PATCH", "/1.0", json={"config": {"core.https_address": ""}})
        assert r.status_code == 200, r.text
        assert curl(tls_pair, "-g", f"https://[::1]:{new}/1.0").returncode == 7
        assert a.api("GET", "/1.0").json()["metadata"]["environment"]["addresses"] == []
    finally:
        r = a.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{old}"}})
        assert r.status_code == 200, r.text
    assert a.proc.pid == pid and a.proc.poll() is None
    assert curl(tls_pair, f"https://127.0.0.1:{old}/1.0").returncode == 0


def test_listener_comes_back_after_a_restart(tls_pair):
    b = tls_pair.b
    mon = _monitor(tls_pair.a)  # an open TLS websocket does not hold the daemon up
    try:
        time.sleep(0.5)
        assert mon.poll() is None, mon.stderr.read()
        t = time.monotonic()
        assert b.stop() == 0
        assert time.monotonic() - t < 5
        mon.wait(timeout=5)
    finally:
        if mon.poll() is None:
            mon.kill()
        mon.wait()
    b.start()
    r = curl(tls_pair, f"{tls_pair.url_b}/1.0")
    assert r.returncode == 0, r.stderr
    assert "listening on HTTPS" in b.read_log()
    # Still trusted: the client certificate A's lxc added is in B's trust store.
    assert "b" in tls_pair.a.lxc("remote", "list", "--format", "csv").stdout
    tls_pair.a.lxc("info", "b:")


# -- the stock client over TLS -----------------------------------------------------------------

@pytest.fixture(scope="module")
def remote_ct(tls_pair):
    """c1 on B, launched by A's client over TLS."""
    name = f"{run_prefix()}-c1"
    r = tls_pair.a.lxc("launch", "b:busybox", f"b:{name}", check=False)
    assert r.returncode == 0, r.stderr + r.stdout
    yield name
    tls_pair.a.lxc("delete", "-f", f"b:{name}", check=False)


def test_remote_add_list_and_info(tls_pair, remote_ct):
    a = tls_pair.a
    remotes = a.lxc("remote", "list", "--format", "csv").stdout
    assert any(line.startswith("b,") and tls_pair.url_b in line for line in remotes.splitlines()), remotes
    info = a.lxc("query", "b:/1.0")
    assert json.loads(info.stdout)["auth"] == "trusted"
    out = a.lxc("list", "b:", "--format", "csv", "-c", "ns").stdout
    assert f"{remote_ct},RUNNING" in out, out
    # On B itself (unix socket): the container exists there, not on A.
    assert tls_pair.b.api("GET", f"/1.0/instances/{remote_ct}").status_code == 200
    assert tls_pair.a.api("GET", f"/1.0/instances/{remote_ct}").status_code == 404


def test_remote_exec(tls_pair, remote_ct):
    a, ct = tls_pair.a, f"b:{remote_ct}"
    r = a.lxc("exec", ct, "--", "sh", "-c", "echo hi; echo err >&2; exit 3", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, "hi\n", "err\n")
    r = a.lxc("exec", ct, "--", "cat", input="abc\n")
    assert (r.returncode, r.stdout) == (0, "abc\n")
    r = a.lxc("exec", ct, "-T", "--", "tty", check=False)
    assert r.returncode == 1 and "not a tty" in r.stdout
    r = a.lxc("exec", "-t", ct, "--", "sh", "-c", "tty; exit 4", check=False)
    assert r.returncode == 4 and r.stdout.startswith("/dev/pts/"), r.stdout
    # Interactive, at a real terminal.
    p = PtyProcess(a.lxc_argv("exec", ct, "--", "sh"), a.env)
    try:
        p.pump(1.0)
        p.write(b"echo inter$((6*7))active; exit 5\n")
        assert p.finish(10) == 5
        assert b"inter42active" in p.out
    finally:
        p.close()


def test_remote_exec_returns_as_soon_as_the_command_exits(tls_pair, remote_ct):
    a, ct = tls_pair.a, f"b:{remote_ct}"
    a.lxc("exec", ct, "--", "true")  # warm
    times = []
    for _ in range(3):
        t = time.monotonic()
        a.lxc("exec", ct, "--", "true")
        times.append(time.monotonic() - t)
    assert min(times) < 0.5, times
    assert max(times) < 1.0, times
    t = time.monotonic()
    a.lxc("exec", "-t", ct, "--", "true")
    assert time.monotonic() - t < 1.0


def test_remote_files(tls_pair, remote_ct, tmp_path):
    a, ct = tls_pair.a, f"b:{remote_ct}"
    src = tmp_path / "hello.txt"
    data = b"hello over tls\n" + bytes(range(256)) * 4096  # 1 MiB and a bit: several chunks
    src.write_bytes(data)
    src.chmod(0o640)
    a.lxc("file", "push", str(src), f"{ct}/root/hello.txt")
    st = a.lxc("exec", ct, "--", "stat", "-c", "%a %s", "/root/hello.txt").stdout.split()
    assert st == ["640", str(len(data))]
    dst = tmp_path / "back.txt"
    a.lxc("file", "pull", f"{ct}/root/hello.txt", str(dst))
    assert dst.read_bytes() == data
    r = subprocess.run(a.lxc_argv("file", "pull", f"{ct}/root/hello.txt", "-"), env=a.env, capture_output=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout == data


def test_remote_console(tls_pair, remote_ct):
    a, ct = tls_pair.a, f"b:{remote_ct}"
    a.lxc("exec", ct, "--", "sh", "-c", "echo tls-console-marker > /dev/console")
    wait_for(lambda: "tls-console-marker" in a.lxc("console", ct, "--show-log").stdout, timeout=5)
    p = PtyProcess(a.lxc_argv("console", ct), a.env)
    try:
        p.pump(1.0)
        a.lxc("exec", ct, "--", "sh", "-c", "echo live-tls-console > /dev/console")
        p.pump(1.0)
        p.write(b"\x01")
        p.pump(0.3)
        p.write(b"q")
        assert p.finish(10) == 0, p.out
    finally:
        p.close()
    assert b"live-tls-console" in p.out, p.out


def _monitor(a, *args: str) -> subprocess.Popen:
    return subprocess.Popen(a.lxc_argv("monitor", "b:", "--format", "json", *args), env=a.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_remote_monitor_sees_lifecycle_events(tls_pair, remote_ct):
    a = tls_pair.a
    mon = _monitor(a, "--type", "lifecycle")
    try:
        time.sleep(0.5)  # connected (the client prints nothing until an event)
        a.lxc("config", "set", f"b:{remote_ct}", "user.tls-monitor", "1")
        deadline = time.monotonic() + 10
        seen = []
        import select

        while time.monotonic() < deadline:
            r, _, _ = select.select([mon.stdout], [], [], 0.2)
            if r:
                line = mon.stdout.readline()
                seen.append(line)
                if "instance-updated" in line and remote_ct in line:
                    break
        else:
            raise AssertionError(f"no instance-updated event: {seen}")
    finally:
        mon.kill()
        mon.wait()


def test_removed_certificate_loses_its_websockets_at_once(tls_pair, remote_ct):
    a, b = tls_pair.a, tls_pair.b
    fp = client_fingerprint(a)
    mon = _monitor(a)
    try:
        time.sleep(0.5)
        assert mon.poll() is None, mon.stderr.read()
        r = b.api("DELETE", f"/1.0/certificates/{fp}")
        assert r.status_code == 200, r.text
        t = time.monotonic()
        mon.wait(timeout=5)
        assert time.monotonic() - t < 3
        assert mon.returncode != 0
        r = a.lxc("list", "b:", check=False)
        assert r.returncode != 0
        info = json.loads(a.lxc("query", "b:/1.0", check=False).stdout or "{}")
        assert info.get("auth") == "untrusted"
    finally:
        if mon.poll() is None:
            mon.kill()
        mon.wait()
        tls_pair.remote_add(a, "b", tls_pair.url_b)
    assert remote_ct in a.lxc("list", "b:", "--format", "csv", "-c", "n").stdout.split()
