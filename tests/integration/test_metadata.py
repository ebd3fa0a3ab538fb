"""Instance metadata (metadata.yaml) and template files: `lxc config metadata` / `lxc config template`."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import ensure_containers_ready, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ct(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-meta"
    daemon.lxc("init", alias, name)
    try:
        yield name
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def test_metadata_show_edit_and_etag(daemon, ct):
    meta = yaml.safe_load(daemon.lxc("config", "metadata", "show", ct).stdout)
    assert meta["architecture"]
    assert "templates" in meta and "properties" in meta
    meta["properties"]["description"] = "edited by the test"
    daemon.lxc("config", "metadata", "edit", ct, input=yaml.safe_dump(meta))
    again = yaml.safe_load(daemon.lxc("config", "metadata", "show", ct).stdout)
    assert again["properties"]["description"] == "edited by the test"
    # ETag and If-Match.
    r = daemon.api("GET", f"/1.0/instances/{ct}/metadata")
    etag = r.headers["etag"]
    body = r.json()["metadata"]
    assert daemon.api("PUT", f"/1.0/instances/{ct}/metadata", json=body,
                      headers={"If-Match": '"stale"'}).status_code == 412
    assert daemon.api("PUT", f"/1.0/instances/{ct}/metadata", json=body, headers={"If-Match": etag}).status_code == 200
    # PATCH merges top-level fields; bad types are a 400.
    r = daemon.api("PATCH", f"/1.0/containers/{ct}/metadata", json={"expiry_date": 1234})
    assert r.status_code == 200
    got = daemon.api("GET", f"/1.0/instances/{ct}/metadata").json()["metadata"]
    assert got["expiry_date"] == 1234 and got["properties"]["description"] == "edited by the test"
    assert daemon.api("PUT", f"/1.0/instances/{ct}/metadata", json={"creation_date": "x"}).status_code == 400
    assert daemon.api("GET", "/1.0/instances/no-such/metadata").status_code == 404


def test_templates_create_show_edit_list_delete(daemon, ct):
    name = "test.tpl"
    daemon.lxc("config", "template", "create", ct, name)
    assert name in daemon.lxc("config", "template", "list", ct).stdout
    assert daemon.lxc("config", "template", "show", ct, name).stdout == ""
    daemon.lxc("config", "template", "edit", ct, name, input="hello {{ container.name }}\n")
    assert daemon.lxc("config", "template", "show", ct, name).stdout.strip() == "hello {{ container.name }}"
    listing = daemon.api("GET", f"/1.0/instances/{ct}/metadata/templates").json()["metadata"]
    assert name in listing
    daemon.lxc("config", "template", "delete", ct, name)
    assert name not in daemon.lxc("config", "template", "list", ct).stdout
    assert daemon.lxc("config", "template", "delete", ct, name, check=False).returncode != 0
    r = daemon.api("GET", f"/1.0/instances/{ct}/metadata/templates", params={"path": "../metadata.yaml"})
    assert r.status_code == 400
    r = daemon.api("POST", f"/1.0/instances/{ct}/metadata/templates", params={"path": "a/b"}, content=b"x")
    assert r.status_code == 400
    r = daemon.api("GET", f"/1.0/instances/{ct}/metadata/templates", params={"path": "missing.tpl"})
    assert r.status_code == 404
