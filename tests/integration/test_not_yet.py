"""Issue 8, item 8: features that do not exist yet answer a clear error that names them, in
LXD's envelope, through the stock client and the API (never "not found"/"method not allowed"
for the feature's own endpoints), and nothing is created by such a request."""

from __future__ import annotations

import pytest

from tests.helpers import ensure_containers_ready, envelope_ok, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ct(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-ny"
    daemon.lxc("init", alias, name)
    yield name
    daemon.lxc("delete", "-f", name, check=False)


def fails(daemon, *args) -> str:
    r = daemon.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {args} unexpectedly succeeded: {r.stdout}"
    return r.stderr


def test_lxc_snapshot_of_missing_instance_is_not_found(daemon):
    assert "Instance not found" in fails(daemon, "snapshot", f"{run_prefix()}-missing")


def test_config_trust_list_is_empty(daemon):
    r = daemon.lxc("config", "trust", "list")
    assert "FINGERPRINT" in r.stdout and "not found" not in r.stderr
    body = daemon.api("GET", "/1.0/certificates?recursion=1").json()
    assert body["metadata"] == []


# (the trust store exists now: tests/integration/test_trust.py)


def test_volumes_of_a_missing_pool_are_not_found(daemon):
    r = daemon.api("GET", "/1.0/storage-pools/nosuchpool/volumes")
    assert r.status_code == 404 and r.json()["error"] == "Storage pool not found"


# (managed networks exist now: tests/integration/test_networks_managed.py, which creates them
# inside a network namespace of its own; never from this host-namespace daemon)


@pytest.mark.parametrize("method,path,words", [
    ("GET", "/1.0/cluster", "Clustering is not implemented yet"),
    ("PUT", "/1.0/cluster", "Clustering is not implemented yet"),
    ("GET", "/1.0/cluster/members", "Clustering is not implemented yet"),
    ("GET", "/1.0/network-acls", "Network ACLs are not implemented yet"),
])
def test_endpoints_answer_501_in_the_envelope(daemon, ct, method, path, words):
    r = daemon.api(method, path.format(ct=ct), json={"name": "x"})
    assert r.status_code == 501, (r.status_code, r.text)
    body = r.json()
    envelope_ok(body)
    assert body["type"] == "error" and body["error_code"] == 501
    assert words in body["error"]


def test_snapshot_and_backup_objects_are_not_found(daemon, ct):
    # (instance snapshots exist now: tests/integration/test_snapshots.py)
    r = daemon.api("GET", f"/1.0/instances/{ct}/snapshots/s0")
    assert r.status_code == 404 and "not found" in r.json()["error"], r.text
    # and for an instance that does not exist, the instance is what is missing
    r = daemon.api("POST", f"/1.0/instances/{run_prefix()}-missing/snapshots", json={"name": "s0"})
    assert r.status_code == 404 and r.json()["error"] == "Instance not found"


def test_restore_publish_and_migration_say_not_implemented(daemon, ct):
    assert "not found" in fails(daemon, "restore", ct, "s0")  # (snapshots exist now; s0 doesn't)
    assert "not found" in fails(daemon, "publish", f"{ct}/s0")
    # migration exists now (tests/integration/test_migration.py): a websocket operation with its
    # secrets, cancelled here as no sink comes
    r = daemon.api("POST", f"/1.0/instances/{ct}", json={"migration": True})
    assert r.status_code == 202 and set(r.json()["metadata"]["metadata"]) == {"control", "fs"}, r.text
    assert daemon.api("DELETE", f"/1.0/operations/{r.json()['metadata']['id']}").status_code == 200
    r = daemon.api("POST", "/1.0/instances", json={
        "name": f"{run_prefix()}-cp", "source": {"type": "copy", "source": f"{ct}/s0"}})
    assert r.status_code == 404, r.text
    assert "not found" in r.json()["error"]
    name = f"{run_prefix()}-mig"
    r = daemon.api("POST", "/1.0/instances", json={
        "name": name, "source": {"type": "migration", "mode": "pull", "operation": "https://127.0.0.1:1/x"}})
    assert r.status_code == 400 and "secrets are missing" in r.json()["error"], r.text
    assert daemon.api("GET", f"/1.0/instances/{name}").status_code == 404
