"""The store on SQLAlchemy Core: the daemon never loads sqlalchemy.orm (6 MiB resident, ~37 ms of
start-up), and the writes that used ORM objects keep their behaviour."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import lxd_daemon.daemon
from lxd_daemon.db import Database, migrate
from lxd_daemon.events import EventHub
from lxd_daemon.server.config import ServerConfig
from lxd_daemon.server.service import ServerService, load_config

REPO = Path(__file__).resolve().parents[2]


def startup_modules() -> list[str]:
    """Every lxd_daemon module daemon.py imports (at the top or inside its functions: _serve's
    imports, say), the entry point's and the subsystems it wires."""
    tree = ast.parse(Path(lxd_daemon.daemon.__file__).read_text())
    found = {"lxd_daemon.cli", "lxd_daemon.daemon", *lxd_daemon.daemon.SUBSYSTEMS}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lxd_daemon"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names  # `from package import module`
                         if importlib.util.find_spec(node.module).submodule_search_locations
                         and importlib.util.find_spec(f"{node.module}.{a.name}") is not None)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lxd_daemon"))
    return sorted(found)


PROBE = """
import asyncio, importlib, sys
from pathlib import Path
for name in sys.argv[2:]:
    importlib.import_module(name)
# The queries of start-up and of the routes that used ORM objects, on a migrated database.
from lxd_daemon.db import Database
from lxd_daemon.events import EventHub
from lxd_daemon.images.service import ImageService
from lxd_daemon.ops import OperationManager
from lxd_daemon.server.service import load_config
db = Database(Path(sys.argv[1]) / "lxd.db")
db.run_sync(load_config)
events = EventHub()
svc = ImageService(lxd_dir=Path(sys.argv[1]), db=db, events=events, ops=OperationManager(events), server=None)
async def main():
    await svc.list(project="default")
    await svc.list_aliases(project="default")
    await svc.load_index()
asyncio.run(main())
db.close()
print(sorted(m for m in sys.modules if m == "sqlalchemy.orm" or m.startswith("sqlalchemy.orm.")))
"""


def test_daemon_start_up_never_loads_the_orm(tmp_path):
    modules = startup_modules()
    assert "lxd_daemon.server.service" in modules and "lxd_daemon.images.subsystem" in modules
    migrate.upgrade(tmp_path / "lxd.db")  # Alembic (and the ORM with it) only in this process
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), *modules], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


@pytest.fixture
def db(tmp_path):
    migrate.upgrade(tmp_path / "lxd.db")
    db = Database(tmp_path / "lxd.db")
    yield db
    db.close()


def test_server_config_keys_are_added_changed_and_removed(db):
    async def main():
        events = EventHub()
        events.bind_loop(asyncio.get_running_loop())
        server = ServerService(db=db, events=events, config=ServerConfig(await db.run(load_config)),
                               certificate_pem=PEM, driver_version="6.0.0")
        await server.update_config({"images.compression_algorithm": "xz", "core.shutdown_timeout": "9"},
                                   replace=False)
        assert await db.run(load_config) == {"images.compression_algorithm": "xz", "core.shutdown_timeout": "9"}
        await server.update_config({"images.compression_algorithm": "bzip2"}, replace=False)
        assert await db.run(load_config) == {"images.compression_algorithm": "bzip2", "core.shutdown_timeout": "9"}
        await server.update_config({"core.shutdown_timeout": "9"}, replace=True)  # PUT drops the rest
        assert await db.run(load_config) == {"core.shutdown_timeout": "9"}
        await server.update_config({"core.shutdown_timeout": ""}, replace=False)
        assert await db.run(load_config) == {}
        assert server.config.get("core.shutdown_timeout") == "5"  # back to the default

        async def refuse(old, new):
            raise RuntimeError("host work failed")

        server.appliers["images.compression_algorithm"] = refuse
        with pytest.raises(RuntimeError):
            await server.update_config({"images.compression_algorithm": "xz"}, replace=False)
        assert await db.run(load_config) == {}

    asyncio.run(main())


def test_a_failed_callback_rolls_the_transaction_back(db):
    from sqlalchemy import text

    def write(conn):
        conn.execute(text("INSERT INTO config (key, value) VALUES ('k', 'v')"))
        raise ValueError("boom")

    with pytest.raises(ValueError):
        db.run_sync(write)
    assert db.run_sync(load_config) == {}
    db.run_sync(lambda conn: conn.execute(text("INSERT INTO config (key, value) VALUES ('k', 'v')")))
    assert db.run_sync(load_config) == {"k": "v"}
