"""The disk part of an instance's state (lxd_daemon/instances/disk_usage.py): which devices are
measured, and the listing cache (measured once, then refreshed in the background after TTL)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from lxd_daemon.instances import disk_usage
from lxd_daemon.instances.disk_usage import DiskUsage, volume_disks


def test_volume_disks_are_the_root_and_pool_disks_sorted():
    devices = {
        "root": {"type": "disk", "path": "/", "pool": "default"},
        "data": {"type": "disk", "path": "/data", "pool": "p2", "source": "vol"},
        "host": {"type": "disk", "path": "/mnt", "source": "/srv"},
        "eth0": {"type": "nic", "nictype": "p2p"},
        "aaa": {"type": "disk", "path": "/a", "pool": "default", "source": "v2"},
    }
    assert [n for n, _ in volume_disks(devices)] == ["aaa", "data", "root"]
    assert volume_disks({}) == []


class FakeDriver:
    def __init__(self):
        self.calls = 0

    async def volume_usage(self, vol):
        self.calls += 1
        return 1000 * self.calls


class FakeService:
    """The few members of the instances service that DiskUsage uses."""

    def __init__(self):
        self.driver = FakeDriver()
        pool = SimpleNamespace(name="default", driver=self.driver)
        custom = SimpleNamespace(usage=self._custom_usage)
        volumes = SimpleNamespace(instance_volume=lambda pool, name, project: (pool.name, name, project))
        self.services = SimpleNamespace(storage=SimpleNamespace(volumes=volumes, custom=custom))
        self.records = {"c1": object()}
        self.devices = {"root": {"type": "disk", "path": "/", "pool": "default"},
                        "data": {"type": "disk", "path": "/d", "pool": "default", "source": "v"},
                        "snap": {"type": "disk", "path": "/s", "pool": "default", "source": "v/s0"},
                        "gone": {"type": "disk", "path": "/g", "pool": "default", "source": "missing"}}
        self._pool = pool
        self.tasks = []

    async def _custom_usage(self, pool, name, project):
        if name == "missing":
            raise LookupError("no such volume")
        return {"used": 7, "total": -1}

    def ident(self, key):
        return "default", key

    def expanded(self, key):
        return {}, self.devices

    def _root_pool(self, devices, key):
        return self._pool

    def _spawn(self, coro):
        self.tasks.append(asyncio.get_running_loop().create_task(coro))


def test_measure_leaves_out_what_cannot_be_measured():
    svc = FakeService()
    got = asyncio.run(DiskUsage(svc).measure("c1"))
    assert got == {"root": {"usage": 1000}, "data": {"usage": 7}}  # not a snapshot, not a missing volume
    assert asyncio.run(DiskUsage(svc).measure("nosuch")) == {}


def test_listing_reuses_figures_and_refreshes_them_in_the_background(monkeypatch):
    svc = FakeService()
    du = DiskUsage(svc)
    now = [100.0]
    monkeypatch.setattr(disk_usage, "_now", lambda: now[0])

    async def run():
        [first] = await du.listed(["c1"])  # nothing known: measured now
        assert first["root"] == {"usage": 1000} and svc.driver.calls == 1
        assert (await du.listed(["c1"]))[0]["root"] == {"usage": 1000} and svc.driver.calls == 1
        now[0] += disk_usage.TTL + 1
        [stale] = await du.listed(["c1"])  # old figures served, one refresh started
        assert stale["root"] == {"usage": 1000}
        await du.listed(["c1"])
        assert len(svc.tasks) == 1  # one refresher, whatever the number of stale listings
        await asyncio.gather(*svc.tasks)
        assert (await du.listed(["c1"]))[0]["root"] == {"usage": 2000} and svc.driver.calls == 2
        du.forget_others({})
        assert du._cache == {}

    asyncio.run(run())


def test_a_slow_first_measurement_does_not_hold_the_listing(monkeypatch):
    svc = FakeService()
    slow = asyncio.Event()
    measured = svc.driver.volume_usage

    async def volume_usage(vol):
        await slow.wait()
        return await measured(vol)

    svc.driver.volume_usage = volume_usage
    du = DiskUsage(svc)

    async def run():
        assert await du.listed(["c1"]) == [{}]  # not known by COLD_WAIT: listed without figures
        slow.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if du._cache:
                break
        assert (await du.listed(["c1"]))[0]["root"] == {"usage": 1000}  # measured in the background
        assert svc.driver.calls == 1

    asyncio.run(run())


def test_many_unknown_instances_are_measured_in_the_background():
    svc = FakeService()
    keys = [f"c{i}" for i in range(disk_usage.COLD_INLINE + 1)]
    svc.records = dict.fromkeys(keys, object())
    du = DiskUsage(svc)

    async def run():
        assert await du.listed(keys) == [{}] * len(keys)  # the listing does not wait for them
        assert svc.driver.calls == 0 and len(svc.tasks) == 1
        await asyncio.gather(*svc.tasks)  # the refresher: one instance at a time
        assert svc.driver.calls == len(keys)
        assert all("root" in d for d in await du.listed(keys))

    asyncio.run(run())
