"""StorageService pool-config validation: common keys, each driver's own keys with their
validators, and the driver's defaults; `GET /1.0`'s driver list from each driver's available()."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.storage import service as svcmod
from lxd_daemon.storage.drivers.dir import DirDriver
from lxd_daemon.storage.volume import DriverInfo


def _positive(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise ValueError("must be positive")
    return n


class FakeDriver(DirDriver):
    info = DriverInfo(name="fake", version="9.1", remote=True)
    pool_keys = {"fake.level": _positive}

    @classmethod
    def available(cls):
        return True, "9.1.2"

    @classmethod
    def validate_pool_config(cls, config):
        return {**config, "fake.level": config.get("fake.level", "3")}


class MissingDriver(DirDriver):
    info = DriverInfo(name="missing", version="1")

    @classmethod
    def available(cls):
        return False, "tool not installed"


@pytest.fixture
def drivers(monkeypatch):
    table = {"dir": DirDriver, "fake": FakeDriver, "missing": MissingDriver}
    monkeypatch.setattr(svcmod, "DRIVERS", table)
    return table


def test_driver_keys_validated_and_defaults_filled(drivers):
    v = svcmod.StorageService._validate_config
    assert v("fake", {"source": "/x"}) == {"source": "/x", "fake.level": "3"}
    assert v("fake", {"fake.level": "5", "volume.size": "1GiB"})["fake.level"] == "5"
    with pytest.raises(BadRequest, match="fake.level"):
        v("fake", {"fake.level": "-1"})
    with pytest.raises(BadRequest, match="fake.level"):
        v("dir", {"fake.level": "1"})  # another driver's key
    with pytest.raises(BadRequest, match="nonsense"):
        v("dir", {"nonsense": "1"})
    with pytest.raises(BadRequest, match="source"):
        v("dir", {"source": "relative/path"})


def test_supported_drivers_come_from_available(drivers):
    server = SimpleNamespace(invalidate=lambda: None)
    fake_services = SimpleNamespace(server=server, db=None, lxd_dir=__import__("pathlib").Path("/nonexistent"))
    s = svcmod.StorageService(fake_services)
    s.drivers_available = {name: cls.available() for name, cls in drivers.items()}
    s._advertise_driver()
    assert server.storage_supported_drivers == [
        {"Name": "dir", "Version": "1", "Remote": False},
        {"Name": "fake", "Version": "9.1.2", "Remote": True},
    ]
