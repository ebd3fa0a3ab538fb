"""Exec through the stock client, curl and pylxd against a running busybox container."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.helpers import LXC, PtyProcess, ensure_containers_ready, run_prefix, wait_op

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ct(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-exec"
    daemon.lxc("launch", alias, name)
    try:
        yield name
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def test_exit_status_and_output(daemon, ct):
    r = daemon.lxc("exec", ct, "--", "sh", "-c", "echo hi; echo oops >&2; exit 3", check=False)
    assert r.returncode == 3
    assert r.stdout == "hi\n"
    assert r.stderr == "oops\n"


@pytest.mark.parametrize(("cmd", "rc"), [
    (["sh", "-c", "true"], 0),
    (["sh", "-c", "false"], 1),
    (["sh", "-c", "exit 255"], 255),
    (["no-such-command"], 127),
    (["/etc/passwd"], 126),
    (["sh", "-c", "kill -9 $$"], 137),
    (["sh", "-c", "kill -TERM $$"], 143),
])
def test_exit_codes(daemon, ct, cmd, rc):
    assert daemon.lxc("exec", ct, "--", *cmd, check=False).returncode == rc


def test_stdin_is_piped_and_large_output_is_complete(daemon, ct):
    data = "".join(f"line {i}\n" for i in range(40000))  # ~400 KB, more than a pipe buffer
    r = daemon.lxc("exec", ct, "--", "cat", input=data)
    assert r.stdout == data
    r = daemon.lxc("exec", ct, "--", "wc", "-c", input="abc")
    assert r.stdout.strip() == "3"


def test_environment_cwd_user_group(daemon, ct):
    r = daemon.lxc("exec", ct, "--env", "FOO=bar baz", "--", "sh", "-c", 'echo "$FOO|$HOME|$USER|$LANG|$PATH"; pwd')
    assert r.stdout.splitlines() == [
        "bar baz|/root|root|C.UTF-8|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "/root"]
    assert daemon.lxc("exec", ct, "--cwd", "/tmp", "--", "pwd").stdout.strip() == "/tmp"
    r = daemon.lxc("exec", ct, "--user", "1000", "--group", "1001", "--", "sh", "-c", "id -u; id -g; echo $HOME")
    assert r.stdout.split() == ["1000", "1001"]  # HOME is only defaulted for root
    # environment.* instance keys, with the request on top.
    daemon.lxc("config", "set", ct, "environment.FROMCONF", "yes")
    try:
        r = daemon.lxc("exec", ct, "--", "sh", "-c", "echo $FROMCONF")
        assert r.stdout.strip() == "yes"
        r = daemon.lxc("exec", ct, "--env", "FROMCONF=override", "--", "sh", "-c", "echo $FROMCONF")
        assert r.stdout.strip() == "override"
    finally:
        daemon.lxc("config", "unset", ct, "environment.FROMCONF")


def test_command_is_isolated_from_the_daemon(daemon, ct):
    # Only 0, 1, 2 are open in the command (no worker socket or daemon fd leaks in).
    r = daemon.lxc("exec", ct, "--", "ls", "/proc/self/fd")
    assert sorted(r.stdout.split()) == ["0", "1", "2", "3"]  # 3 is ls's own directory fd
    uid_map = daemon.lxc("exec", ct, "--", "cat", "/proc/self/uid_map").stdout.split()
    assert uid_map[0] == "0" and uid_map[1] != "0"  # container root is not host root


def _run_in_pty(args: list[str], env: dict, script: list[tuple[float, bytes | tuple]], size=(24, 80),
                timeout: float = 15) -> tuple[bytes, int]:
    """Run args on a new pty; script items are (delay, bytes to type) or (delay, ("resize", rows, cols))."""
    p = PtyProcess(args, env, size)
    try:
        for delay, action in script:
            p.pump(delay)
            if isinstance(action, tuple):
                _, rows, cols = action
                p.resize(rows, cols)
            else:
                p.write(action)
        rc = p.finish(timeout, tail=0.2)
    finally:
        p.close()
    return p.out, rc


def test_interactive_tty_and_resize(daemon, ct):
    out, rc = _run_in_pty([LXC, "exec", ct, "-t", "--", "sh"], daemon.env, [
        (0.5, b"tty; stty size\n"),
        (0.5, ("resize", 50, 120)),
        (0.5, b"stty size; exit 7\n"),
    ], size=(33, 99))
    text = out.decode(errors="replace")
    assert rc == 7, text
    assert "/dev/pts/" in text, text
    assert "33 99" in text, text
    assert "50 120" in text, text


def test_forced_tty_with_piped_stdin(daemon, ct):
    # `-t` with stdin at EOF: the command sees EOF (^D) and ends normally instead of a hangup.
    r = subprocess.run([LXC, "exec", ct, "-t", "--", "cat"], input="hello\n", capture_output=True, text=True,
                       env=daemon.env, timeout=30)
    assert r.returncode == 0
    assert "hello" in r.stdout
    r = subprocess.run([LXC, "exec", ct, "-t", "--", "sh", "-c", "tty; exit 5"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, env=daemon.env, timeout=30)
    assert r.returncode == 5
    assert r.stdout.startswith("/dev/pts/")


def test_signals_are_forwarded(daemon, ct):
    proc = subprocess.Popen([LXC, "exec", ct, "--", "sh", "-c", "trap 'echo got-term; exit 42' TERM; "
                             "echo ready; while :; do sleep 0.1; done"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=daemon.env, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.terminate()  # the client forwards SIGTERM through the control socket
        out, _ = proc.communicate(timeout=20)
        assert "got-term" in out
        assert proc.returncode == 42
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_client_going_away_kills_the_command(daemon, ct):
    marker = f"/tmp/{run_prefix()}"
    proc = subprocess.Popen([LXC, "exec", ct, "--", "sh", "-c", f"echo $$ > {marker}; exec sleep 300"],
                            env=daemon.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        pid = ""
        while time.monotonic() < deadline and not pid:
            pid = daemon.lxc("exec", ct, "--", "sh", "-c", f"cat {marker} 2>/dev/null", check=False).stdout.strip()
            time.sleep(0.1)
        assert pid
        proc.kill()  # no close frame, just a dropped connection
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if daemon.lxc("exec", ct, "--", "sh", "-c", f"kill -0 {pid}", check=False).returncode != 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the command outlived its client")
    finally:
        daemon.lxc("exec", ct, "--", "rm", "-f", marker, check=False)


def test_record_output_and_logs(daemon, ct):
    r = daemon.api("POST", f"/1.0/instances/{ct}/exec", json={
        "command": ["sh", "-c", "echo out; echo err >&2; exit 4"], "wait-for-websocket": False,
        "record-output": True, "interactive": False})
    assert r.status_code == 202
    op = wait_op(daemon, r)
    assert op["status"] == "Success", op
    assert op["metadata"]["return"] == 4
    out = op["metadata"]["output"]
    assert out["1"].endswith(f"exec_{op['id']}.stdout") and out["2"].endswith(f"exec_{op['id']}.stderr")
    log_dir = daemon.lxd_dir / "logs" / ct
    assert (log_dir / f"exec_{op['id']}.stdout").read_text() == "out\n"
    assert (log_dir / f"exec_{op['id']}.stderr").read_text() == "err\n"
    got = daemon.api("GET", out["1"])
    if got.status_code == 200:  # served by the logs API
        assert got.text == "out\n"
    # Without record-output the command still runs, output discarded.
    r = daemon.api("POST", f"/1.0/containers/{ct}/exec", json={
        "command": ["sh", "-c", "exit 6"], "wait-for-websocket": False})
    assert wait_op(daemon, r)["metadata"]["return"] == 6


def test_exec_errors(daemon, ct):
    r = daemon.api("POST", "/1.0/instances/no-such-instance/exec", json={"command": ["sh"]})
    assert r.status_code == 404
    r = daemon.api("POST", f"/1.0/instances/{ct}/exec", json={"command": "sh"})
    assert r.status_code == 400
    r = daemon.api("POST", f"/1.0/instances/{ct}/exec", json={"command": []})
    assert r.status_code == 400
    # Nobody connects: the operation gives up after 5 s.
    r = daemon.api("POST", f"/1.0/instances/{ct}/exec", json={"command": ["sh", "-c", "true"],
                                                             "wait-for-websocket": True})
    body = r.json()["metadata"]
    assert set(body["metadata"]["fds"]) == {"0", "1", "2", "control"}
    assert all(len(s) == 64 for s in body["metadata"]["fds"].values())
    assert body["metadata"]["environment"]["PATH"].startswith("/usr/local/sbin")
    op = wait_op(daemon, r, timeout=15)
    assert op["status"] == "Failure"
    # A wrong secret is refused with 403.
    r = daemon.api("POST", f"/1.0/instances/{ct}/exec", json={"command": ["sh", "-c", "true"],
                                                             "wait-for-websocket": True, "interactive": True})
    assert set(r.json()["metadata"]["metadata"]["fds"]) == {"0", "control"}
    url = f"{r.json()['operation']}/websocket?secret={'0' * 64}"
    got = daemon.curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
                      "-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                      f"lxd{url}")
    assert got.stdout == "403"


def test_exec_on_a_stopped_instance_is_refused(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-stopped"
    daemon.lxc("init", alias, name)
    try:
        r = daemon.lxc("exec", name, "--", "sh", "-c", "true", check=False)
        assert r.returncode != 0
        assert "not running" in r.stderr
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def test_pylxd_execute(daemon, ct):
    r = daemon.pylxd(
        f"c = client.containers.get({ct!r})\n"
        "res = c.execute(['sh', '-c', 'echo out; echo err >&2; exit 3'])\n"
        "print(json.dumps([res.exit_code, res.stdout, res.stderr]))\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [3, "out\n", "err\n"]


def test_privileged_container_exec(daemon):
    # Privileged containers go through liblxc's attach (the fast path is for unprivileged ones).
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-priv"
    daemon.lxc("launch", alias, name, "-c", "security.privileged=true")
    try:
        r = daemon.lxc("exec", name, "--", "sh", "-c", "cat /proc/self/uid_map; echo in; exit 9", check=False)
        assert r.returncode == 9
        assert r.stdout.split() == ["0", "0", "4294967295", "in"]
        assert daemon.lxc("exec", name, "--", "no-such-command", check=False).returncode == 127
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def test_same_confinement_as_the_container_init(daemon, ct):
    """The exec'd command gets the init's cgroups, capability bounding set and seccomp filter."""
    pid = daemon.api("GET", f"/1.0/instances/{ct}/state").json()["metadata"]["pid"]
    init = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    out = daemon.lxc("exec", ct, "--", "sh", "-c", "cat /proc/self/status; echo ---; cat /proc/self/cgroup").stdout
    status_text, cgroups = out.split("---\n")
    mine = dict(line.split(":\t", 1) for line in status_text.splitlines() if ":\t" in line)
    for key in ("CapBnd", "NoNewPrivs", "Seccomp"):
        assert mine[key] == init[key], key
    host_view = open(f"/proc/{pid}/cgroup").read()
    assert all(line.endswith(":/") for line in cgroups.split())  # the container's cgroup namespace
    assert f"lxc.payload.{ct}" in host_view
