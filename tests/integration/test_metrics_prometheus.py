"""A real Prometheus (Debian's `prometheus`) scrapes GET /1.0/metrics (issue 14).

The shared daemon listens on a loopback TLS port for this module; a `metrics` certificate made
here is added through POST /1.0/certificates; one busybox container runs. Prometheus, started by
this test in a temporary directory on a free loopback port, scrapes the daemon every second over
HTTPS with that certificate: its target is up and `lxd_procs_total` has a sample for the container.
A client with an unknown certificate gets 403 from the same endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.parse
import urllib.request

import httpx
import pytest

from tests.integration.test_access_tls import client_context, free_port, self_signed

pytestmark = pytest.mark.integration

PROMETHEUS = "/usr/bin/prometheus"


@pytest.fixture(scope="module")
def https(daemon):
    port = free_port()
    r = daemon.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{port}"}})
    assert r.status_code == 200, r.text
    yield port
    daemon.api("PATCH", "/1.0", json={"config": {"core.https_address": ""}})


def _der_b64(crt) -> tuple[str, str]:
    der = ssl.PEM_cert_to_DER_cert(open(crt).read())
    return base64.b64encode(der).decode(), hashlib.sha256(der).hexdigest()


def _prom_get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _start_prometheus(tmp_path, target_port: int, crt, key) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    # JSON is YAML: no YAML library needed to write Prometheus' configuration.
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "lxd",
            "scheme": "https",
            "metrics_path": "/1.0/metrics",
            "tls_config": {"cert_file": str(crt), "key_file": str(key), "insecure_skip_verify": True},
            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
        }],
    }, indent=1))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK), reason="Debian's prometheus is not installed "
                    "(scripts/install-deps.sh installs it)")
def test_prometheus_scrapes_metrics_with_a_metrics_certificate(ready, https, names, tmp_path):
    c = names("prom")
    ready.lxc("launch", "busybox", c)
    crt, key = self_signed(tmp_path, "prometheus")
    b64, fp = _der_b64(crt)
    r = ready.api("POST", "/1.0/certificates", json={"type": "metrics", "name": "prom-" + c, "certificate": b64})
    assert r.status_code in (200, 201), r.text
    proc = None
    try:
        assert ready.api("GET", f"/1.0/certificates/{fp}").json()["metadata"]["type"] == "metrics"

        # An unknown client is refused; the metrics certificate may scrape.
        stranger = self_signed(tmp_path, "stranger")
        with httpx.Client(base_url=f"https://127.0.0.1:{https}", verify=client_context(stranger), timeout=30) as h:
            r = h.get("/1.0/metrics")
            assert r.status_code == 403, r.text
            assert r.json()["error_code"] == 403
        with httpx.Client(base_url=f"https://127.0.0.1:{https}", verify=client_context((crt, key)), timeout=30) as h:
            r = h.get("/1.0/metrics")
            assert r.status_code == 200, r.text
            assert f'name="{c}"' in r.text

        proc, api = _start_prometheus(tmp_path, https, crt, key)
        deadline = time.monotonic() + 30
        sample, targets, err = None, [], None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                targets = _prom_get(api, "/api/v1/targets")["data"]["activeTargets"]
                result = _prom_get(api, "/api/v1/query", query=f'lxd_procs_total{{name="{c}"}}')["data"]["result"]
            except OSError as e:  # not listening yet
                err = e
                time.sleep(0.3)
                continue
            if result and targets and targets[0]["health"] == "up":
                sample = result[0]
                break
            time.sleep(0.3)
        assert sample is not None, f"no sample for {c}: targets={targets} last error={err}"
        assert len(targets) == 1
        target = targets[0]
        assert target["health"] == "up", target
        assert target["lastError"] == "", target["lastError"]
        assert target["scrapeUrl"] == f"https://127.0.0.1:{https}/1.0/metrics"
        labels = sample["metric"]
        assert labels["name"] == c and labels["project"] == "default" and labels["type"] == "container"
        assert labels["job"] == "lxd"
        assert float(sample["value"][1]) >= 1  # busybox init at least

        # Other families arrive too (a counter with its _total name, the memory gauges).
        cpu = _prom_get(api, "/api/v1/query", query=f'lxd_cpu_seconds_total{{name="{c}"}}')["data"]["result"]
        assert {s["metric"]["mode"] for s in cpu} == {"user", "system"}
        rss = _prom_get(api, "/api/v1/query", query=f'lxd_memory_RSS_bytes{{name="{c}"}}')["data"]["result"]
        assert rss and float(rss[0]["value"][1]) > 0
    finally:
        if proc is not None:
            _stop(proc)
        ready.api("DELETE", f"/1.0/certificates/{fp}")
