"""`lxd activateifneeded`'s decision and `lxd sql`'s table, on a database migrated by the real migrations."""

from __future__ import annotations

import json
import sqlite3

import pytest

from lxd_daemon.cli_tools import _needs_autostart, _table, activateifneeded
from lxd_daemon.db import migrate


@pytest.fixture(scope="module")
def schema_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "lxd.db"
    migrate.upgrade(path)
    return path


@pytest.fixture
def con(schema_db, tmp_path):
    copy = tmp_path / "lxd.db"
    src = sqlite3.connect(schema_db)
    dst = sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    yield dst
    dst.close()


def add_instance(con, iid: int, config: dict, profiles: list[tuple[int, dict]] = ()) -> None:
    con.execute("INSERT INTO instances (id, name, created_at) VALUES (?, ?, '')", (iid, f"c{iid}"))
    for key, value in config.items():
        con.execute("INSERT INTO instances_config (instance_id, key, value) VALUES (?, ?, ?)", (iid, key, value))
    for order, (pid, pconfig) in enumerate(profiles):
        con.execute("INSERT OR IGNORE INTO profiles (id, name, config) VALUES (?, ?, ?)",
                    (pid, f"p{pid}", json.dumps(pconfig)))
        con.execute("INSERT INTO instances_profiles (instance_id, profile_id, apply_order) VALUES (?, ?, ?)",
                    (iid, pid, order))
    con.commit()


def test_no_instances_needs_nothing(con):
    assert not _needs_autostart(con)


def test_autostart_true_in_instance_config(con):
    add_instance(con, 1, {"boot.autostart": "true"})
    assert _needs_autostart(con)


def test_autostart_from_a_profile_and_overridden_by_the_instance(con):
    add_instance(con, 1, {}, [(10, {"boot.autostart": "true"})])
    assert _needs_autostart(con)
    con.execute("INSERT INTO instances_config VALUES (1, 'boot.autostart', 'false')")
    con.commit()
    assert not _needs_autostart(con)


def test_last_state_running_counts_only_without_an_explicit_setting(con):
    add_instance(con, 1, {"volatile.last_state.power": "RUNNING"})
    assert _needs_autostart(con)
    con.execute("INSERT INTO instances_config VALUES (1, 'boot.autostart', 'false')")
    con.commit()
    assert not _needs_autostart(con)


def test_stopped_instances_need_nothing(con):
    add_instance(con, 1, {"volatile.last_state.power": "STOPPED"})
    add_instance(con, 2, {"boot.autostart": "no"})
    assert not _needs_autostart(con)


def test_an_old_schema_without_instances_needs_nothing(tmp_path):
    con = sqlite3.connect(tmp_path / "empty.db")
    try:
        assert not _needs_autostart(con)
    finally:
        con.close()


def test_activateifneeded_reports_a_daemon_it_cannot_wake(tmp_path, con, capsys):
    """When there is work but nothing answers on the socket, it fails loudly."""
    lxd_dir = tmp_path / "var"
    (lxd_dir / "database").mkdir(parents=True)
    add_instance(con, 1, {"boot.autostart": "1"})
    dst = sqlite3.connect(lxd_dir / "database" / "lxd.db")
    con.backup(dst)
    dst.close()
    assert activateifneeded(lxd_dir) == 1
    assert "failed to activate" in capsys.readouterr().err


def test_sql_table_rendering():
    out = _table(["key", "value"], [("a", 1), ("longer.key", None)])
    lines = out.splitlines()
    assert lines[1] == "| key        | value |"
    assert lines[3] == "| a          | 1     |"
    assert lines[4] == "| longer.key |       |"
    assert lines[0] == lines[2] == lines[-1] == "+------------+-------+"
