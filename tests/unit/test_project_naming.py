"""Storage names of instances (projects/naming.py) and what the device context derives from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.instances.models import Record
from lxd_daemon.projects.naming import query, split, storage_name


@pytest.mark.parametrize(("project", "name", "key"), [
    ("default", "c1", "c1"),
    ("p1", "c1", "p1_c1"),
    ("my-proj", "web-01", "my-proj_web-01"),
])
def test_storage_name_round_trip(project, name, key):
    assert storage_name(project, name) == key
    assert split(key) == (project, name)


def test_query():
    assert query("default") == ""
    assert query("p1") == "?project=p1"


def test_record_key():
    rec = Record(1, "c1", "x86_64", False, False, "", "", "", {}, {}, ["default"], project="p1")
    assert rec.key == "p1_c1"
    rec.project = "default"
    assert rec.key == "c1"


def test_device_context_names():
    def ctx(key: str, **kw) -> DeviceContext:
        return DeviceContext(instance=key, idmap=IdmapSet(()), privileged=True, devices_dir=Path("/x"), **kw)

    c = ctx("p1_c1")
    assert (c.project, c.instance_name, c.dns_name) == ("p1", "c1", "c1.p1")
    c = ctx("c1")
    assert (c.project, c.instance_name, c.dns_name) == ("default", "c1", "c1")
    assert ctx("p1_c1", project="p1").project == "p1"
