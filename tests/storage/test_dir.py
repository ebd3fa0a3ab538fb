"""The dir driver for real, on a directory of the test's own (conformance suite)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lxd_daemon.storage.drivers.dir import DirDriver
from tests.storage.conformance import DriverConformance

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="copies keep owners and device nodes: needs root")


class TestDirConformance(DriverConformance):
    def make_driver(self, tmp_path: Path) -> DirDriver:
        return DirDriver(self.pool_name, tmp_path / "var" / "storage-pools" / self.pool_name, {})
