"""Shared test helpers: a real daemon in a temporary LXD_DIR, driven by real clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
LXC = shutil.which("lxc") or "/usr/bin/lxc"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which has python3-pylxd


def run_prefix() -> str:
    """A unique prefix for names this test run creates (containers, bridges, tables...)."""
    return "t" + uuid.uuid4().hex[:6]


@dataclass
class Daemon:
    lxd_dir: Path
    conf_dir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    extra_env: dict = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.lxd_dir / "unix.socket"

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update({"LXD_DIR": str(self.lxd_dir), "LXD_CONF": str(self.conf_dir)})
        env.update(self.extra_env)
        return env

    def start(self, *args: str, wait: bool = True) -> Daemon:
        self.log = self.lxd_dir.parent / (self.lxd_dir.name + ".log")
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "lxd_daemon", "--debug", *args],
                                         env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        if wait:
            self.waitready()
        return self

    def waitready(self, timeout: int = 30) -> None:
        r = subprocess.run([sys.executable, "-m", "lxd_daemon", "waitready", f"--timeout={timeout}"],
                           env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"daemon not ready: {r.stderr}\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def lxc(self, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([LXC, *args], env=self.env, capture_output=True, text=True, input=input,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"lxc {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def lxd(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "lxd_daemon", *args], env=self.env, capture_output=True,
                           text=True, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"lxd {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-s", "--unix-socket", str(self.socket), *args], capture_output=True,
                              text=True, timeout=60)

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://lxd",
                            timeout=timeout)

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        with self.http() as c:
            return c.request(method, path, **kw)

    def pylxd(self, code: str) -> subprocess.CompletedProcess:
        """Run a pylxd snippet under Debian's python3 (python3-pylxd); `client` is connected."""
        prelude = "import pylxd, json\nclient = pylxd.Client()\n"  # finds $LXD_DIR/unix.socket
        return subprocess.run([SYSTEM_PYTHON, "-c", prelude + code], capture_output=True, text=True,
                              timeout=300, env=self.env)


def envelope_ok(doc: dict) -> None:
    for key in ("type", "status", "status_code", "operation", "error_code", "error", "metadata"):
        assert key in doc, f"missing envelope key {key}: {json.dumps(doc)[:200]}"


def wait_for(cond, timeout: float = 10, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not met in time")
