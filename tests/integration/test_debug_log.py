"""Issue 8, item 12: with --debug the daemon logs each API request (method, url with its query,
status, time taken, requestor), as LXD's debug log does; without it, none."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import Daemon, wait_for

pytestmark = pytest.mark.integration


def test_debug_logs_each_request(fresh_daemon):
    d = fresh_daemon.start()
    assert d.api("GET", "/1.0/instances?recursion=1&filter=").status_code == 200
    assert d.api("GET", "/1.0/nosuchthing").status_code == 404
    d.lxc("list")  # the stock client too
    done = wait_for(lambda: [line for line in d.read_log().splitlines() if 'msg="API request done"' in line])
    line = next(x for x in done if 'url="/1.0/instances?recursion=1&filter="' in x)
    assert "method=GET" in line and "status=200" in line
    assert "protocol=unix" in line and "username=root" in line
    assert re.search(r"duration=[0-9.]+ms", line)
    assert any("url=/1.0/nosuchthing" in x and "status=404" in x for x in done)
    assert any('url="/1.0/instances?filter=&recursion=2"' in x for x in done), done  # `lxc list`
    log = d.read_log()
    assert 'msg="Handling API request"' in log and "url=/1.0/nosuchthing" in log


def test_no_request_lines_without_debug(tmp_path):
    d = Daemon(lxd_dir=tmp_path / "var", conf_dir=tmp_path / "conf")
    log = tmp_path / "plain.log"
    with open(log, "ab") as logf:
        d.proc = subprocess.Popen([sys.executable, "-m", "lxd_daemon", "--verbose"], env=d.env,
                                  stdout=logf, stderr=subprocess.STDOUT)
    try:
        d.waitready()
        assert d.api("GET", "/1.0/instances").status_code == 200
    finally:
        d.stop()
    assert "API request" not in log.read_text()
