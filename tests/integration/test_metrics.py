"""GET /1.0/metrics (issue 14): LXD 5.0.2's OpenMetrics text for the running containers.

One busybox container on the shared daemon: its samples are there (processes, memory, CPU,
network, root filesystem) and agree with its cgroup; a stopped one is absent. Over TLS (the
shared daemon on a loopback port for this module): a certificate added with
`lxc config trust add --type metrics` may scrape and nothing else; an unknown client is refused
until core.metrics_authentication=false.
"""

from __future__ import annotations

import hashlib
import re
import ssl

import httpx
import pytest

from tests.integration.test_access_tls import client_context, free_port, self_signed

pytestmark = pytest.mark.integration

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (\S+)$')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', m.group(2)))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def of(samples, name: str, instance: str, **want) -> list[tuple[dict, float]]:
    return [(lb, v) for n, lb, v in samples
            if n == name and lb.get("name") == instance and all(lb.get(k) == x for k, x in want.items())]


def cgroup_dir(pid: int, controller: str) -> str:
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        _, ctrls, rel = line.split(":", 2)
        if controller in ctrls.split(","):
            return f"/sys/fs/cgroup/{controller}{rel}"
    raise AssertionError(f"no {controller} cgroup for pid {pid}")


def test_running_container_metrics_match_its_cgroup(ready, names):
    c, stopped = names("met"), names("metoff")
    ready.lxc("launch", "busybox", c)
    ready.lxc("init", "busybox", stopped)
    # Some CPU time for the cgroup to account (user and system time are counted in ticks).
    ready.lxc("exec", c, "--", "sh", "-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done")
    pid = ready.api("GET", f"/1.0/instances/{c}/state").json()["metadata"]["pid"]
    assert pid > 0

    r = ready.api("GET", "/1.0/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain"
    text = r.text
    assert text.endswith("\n# EOF\n")
    assert "# HELP lxd_procs_total The number of running processes.\n# TYPE lxd_procs_total gauge\n" in text
    assert "# TYPE lxd_cpu_seconds_total counter\n" in text
    assert "# TYPE lxd_memory_RSS_bytes gauge\n" in text
    samples = parse(text)
    base = {"project": "default", "type": "container"}

    procs = of(samples, "lxd_procs_total", c, **base)
    assert len(procs) == 1 and procs[0][1] >= 1

    rss = of(samples, "lxd_memory_RSS_bytes", c, **base)
    assert len(rss) == 1 and rss[0][1] > 0
    mem = cgroup_dir(pid, "memory")
    stat = dict(line.split() for line in open(f"{mem}/memory.stat").read().splitlines())
    assert abs(rss[0][1] - int(stat["total_rss"])) < 8 << 20, (rss, stat["total_rss"])
    total = of(samples, "lxd_memory_MemTotal_bytes", c, **base)
    assert len(total) == 1 and total[0][1] > 0
    for fam in ("Cached", "Active", "Inactive", "Mapped", "Shmem", "MemFree", "MemAvailable"):
        assert len(of(samples, f"lxd_memory_{fam}_bytes", c, **base)) == 1, fam

    cpu = of(samples, "lxd_cpu_seconds_total", c, **base)
    assert {lb["mode"] for lb, _ in cpu} == {"user", "system"}
    assert all(lb["cpu"].isdigit() for lb, _ in cpu)
    seconds = sum(v for _, v in cpu)
    usage = int(open(f"{cgroup_dir(pid, 'cpuacct')}/cpuacct.usage").read()) / 1e9
    assert 0 < seconds <= usage + 0.5, (seconds, usage)

    lo = of(samples, "lxd_network_receive_bytes_total", c, device="lo", **base)
    assert len(lo) == 1
    for fam in ("receive_packets", "transmit_bytes", "transmit_packets", "receive_errs", "transmit_errs",
                "receive_drop", "transmit_drop"):
        assert len(of(samples, f"lxd_network_{fam}_total", c, device="lo", **base)) == 1, fam

    size = of(samples, "lxd_filesystem_size_bytes", c, mountpoint="/", project="default")
    avail = of(samples, "lxd_filesystem_avail_bytes", c, mountpoint="/", project="default")
    assert len(size) == 1 and len(avail) == 1 and 0 < avail[0][1] <= size[0][1]
    assert "type" not in size[0][0] and size[0][0].get("fstype")  # LXD 5.0.2's filesystem labels

    assert not [s for s in samples if s[1].get("name") == stopped]

    # ?project= narrows; a project that does not exist is LXD's 404.
    assert of(parse(ready.api("GET", "/1.0/metrics?project=default").text), "lxd_procs_total", c)
    assert ready.api("GET", "/1.0/metrics?project=nope-x").status_code == 404

    # Once stopped, the container is gone from the scrape.
    ready.lxc("stop", "-f", c)
    assert not of(parse(ready.api("GET", "/1.0/metrics").text), "lxd_procs_total", c)


@pytest.fixture(scope="module")
def https(daemon):
    port = free_port()
    r = daemon.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{port}"}})
    assert r.status_code == 200, r.text
    yield f"https://127.0.0.1:{port}"
    daemon.api("PATCH", "/1.0", json={"config": {"core.https_address": "", "core.metrics_authentication": ""}})


def _fingerprint(crt) -> str:
    der = ssl.PEM_cert_to_DER_cert(open(crt).read())
    return hashlib.sha256(der).hexdigest()


def test_metrics_certificate_and_authentication(ready, https, tmp_path):
    assert "metrics" in ready.api("GET", "/1.0").json()["metadata"]["api_extensions"]
    scraper = self_signed(tmp_path, "scraper")
    stranger = self_signed(tmp_path, "stranger")
    ready.lxc("config", "trust", "add", str(scraper[0]), "--type", "metrics", "--name", "scraper")
    fp = _fingerprint(scraper[0])
    try:
        cert = ready.api("GET", f"/1.0/certificates/{fp}").json()["metadata"]
        assert cert["type"] == "metrics"
        with httpx.Client(base_url=https, verify=client_context(scraper), timeout=30) as c:
            r = c.get("/1.0/metrics")
            assert r.status_code == 200, r.text
            assert r.text.endswith("# EOF\n")
            assert c.get("/1.0/instances").status_code == 403
            assert c.get("/1.0/certificates").status_code == 403
            assert c.get("/1.0").json()["metadata"]["auth"] == "untrusted"
        with httpx.Client(base_url=https, verify=client_context(stranger), timeout=30) as c:
            r = c.get("/1.0/metrics")
            assert r.status_code == 403 and r.json()["error"] == "not authorized"
            r = ready.api("PATCH", "/1.0", json={"config": {"core.metrics_authentication": "false"}})
            assert r.status_code == 200, r.text
            r = c.get("/1.0/metrics")
            assert r.status_code == 200, r.text
            assert r.text.endswith("# EOF\n")
            assert c.get("/1.0/instances").status_code == 403
            r = ready.api("PATCH", "/1.0", json={"config": {"core.metrics_authentication": "true"}})
            assert r.status_code == 200
            assert c.get("/1.0/metrics").status_code == 403
        r = ready.api("PATCH", "/1.0", json={"config": {"core.metrics_authentication": "maybe"}})
        assert r.status_code == 400
    finally:
        ready.api("PATCH", "/1.0", json={"config": {"core.metrics_authentication": ""}})
        ready.lxc("config", "trust", "remove", fp, check=False)


def test_metrics_address_serves_only_metrics(ready, tmp_path, projects, names):
    """core.metrics_address: a second TLS listener (same access rules) serving `/`, `/1.0` and
    `/1.0/metrics` only; a restricted metrics certificate scrapes its own projects only."""
    own = projects("metp")
    elsewhere = names("metr")
    ready.lxc("launch", "busybox", elsewhere)  # running in default: not the certificate's project
    scraper = self_signed(tmp_path, "scraper2")
    ready.lxc("config", "trust", "add", str(scraper[0]), "--type", "metrics", "--name", "scraper2",
              "--restricted", "--projects", own)
    fp = _fingerprint(scraper[0])
    port = free_port()
    try:
        r = ready.api("PATCH", "/1.0", json={"config": {"core.metrics_address": f"127.0.0.1:{port}"}})
        assert r.status_code == 200, r.text
        assert ready.api("PATCH", "/1.0", json={"config": {"core.metrics_address": "127.0.0.1:x"}}).status_code == 400
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=client_context(scraper), timeout=30) as c:
            r = c.get(f"/1.0/metrics?project={own}")
            assert r.status_code == 200 and r.text.endswith("# EOF\n"), r.text
            assert c.get("/1.0/metrics?project=default").status_code == 403
            r = c.get("/1.0/metrics")  # its projects only
            assert r.status_code == 200 and elsewhere not in r.text
        assert of(parse(ready.api("GET", "/1.0/metrics").text), "lxd_procs_total", elsewhere)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=client_context(scraper), timeout=30) as c:
            r = c.get("/1.0/instances")
            assert r.status_code == 404 and r.json()["error_code"] == 404
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=client_context(), timeout=30) as c:
            assert c.get("/1.0/metrics").status_code == 403
            assert c.get("/1.0").json()["metadata"]["auth"] == "untrusted"
        r = ready.api("PATCH", "/1.0", json={"config": {"core.metrics_address": ""}})
        assert r.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/1.0/metrics", verify=client_context(scraper), timeout=5)
    finally:
        ready.api("PATCH", "/1.0", json={"config": {"core.metrics_address": ""}})
        ready.lxc("config", "trust", "remove", fp, check=False)
