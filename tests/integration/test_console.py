"""The console: the log (`lxc console --show-log`), clearing it, and attaching with `lxc console`."""

from __future__ import annotations

import time

import pytest

from tests.helpers import LXC, PtyProcess, ensure_containers_ready, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ct(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-console"
    daemon.lxc("launch", alias, name)
    try:
        yield name
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def test_console_log_show_and_clear(daemon, ct):
    daemon.lxc("exec", ct, "--", "sh", "-c", "echo marker-one > /dev/console")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        out = daemon.lxc("console", ct, "--show-log").stdout
        if "marker-one" in out:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"console log lacks the marker: {out!r}")
    r = daemon.api("GET", f"/1.0/containers/{ct}/console")
    assert r.status_code == 200 and b"marker-one" in r.content
    r = daemon.api("DELETE", f"/1.0/instances/{ct}/console")
    assert r.status_code == 200 and r.json()["type"] == "sync"
    assert b"marker-one" not in daemon.api("GET", f"/1.0/instances/{ct}/console").content
    daemon.lxc("exec", ct, "--", "sh", "-c", "echo marker-two > /dev/console")
    wait = time.monotonic() + 5
    while b"marker-two" not in daemon.api("GET", f"/1.0/instances/{ct}/console").content:
        assert time.monotonic() < wait
        time.sleep(0.1)


def _attach(daemon, ct) -> tuple[bytes, int]:
    p = PtyProcess([LXC, "console", ct], daemon.env)
    try:
        p.pump(1.0)
        daemon.lxc("exec", ct, "--", "sh", "-c", "echo live-console-line > /dev/console")
        p.pump(1.0)
        # Detach: ctrl+a then q, as separate keystrokes (the client looks at one read at a time).
        p.write(b"\x01")
        p.pump(0.3)
        p.write(b"q")
        rc = p.finish(10)
    finally:
        p.close()
    return p.out, rc


def test_console_attach_and_detach_twice(daemon, ct):
    for _ in range(2):  # the console is released after a detach
        out, rc = _attach(daemon, ct)
        assert rc == 0, out
        assert b"live-console-line" in out, out


def test_console_errors(daemon, ct):
    r = daemon.api("POST", f"/1.0/instances/{ct}/console", json={"type": "vga"})
    assert r.status_code == 400
    r = daemon.api("POST", "/1.0/instances/no-such-instance/console", json={})
    assert r.status_code == 404
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-stopped"
    daemon.lxc("init", alias, name)
    try:
        r = daemon.api("POST", f"/1.0/instances/{name}/console", json={"width": 80, "height": 24})
        assert r.status_code == 400
        assert daemon.lxc("console", name, "--show-log", check=False).returncode == 0
    finally:
        daemon.lxc("delete", "-f", name, check=False)
