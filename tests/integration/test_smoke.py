import pytest

pytestmark = pytest.mark.integration


def test_lxc_info_reports_our_server(daemon):
    out = daemon.lxc("info").stdout
    assert "server: lxd" in out
    assert "driver: lxc" in out


def test_pylxd_connects(daemon):
    r = daemon.pylxd("print(client.trusted, client.host_info['api_version'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "1.0"]
