"""Issue 8, "Done when": Ansible (Debian's `ansible`, community.general) drives the daemon: the
`lxd_container` module creates, starts, stops and deletes a container over the unix socket, the
`lxd` inventory plugin lists it (it reads /1.0/networks too), and the `lxd` connection plugin runs
a raw command in it (through the stock `lxc exec`, which finds the daemon through LXD_DIR).
Each is a real ansible / ansible-playbook / ansible-inventory process; the module takes a few
seconds in all."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest

from tests.helpers import ensure_containers_ready, run_prefix

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                       reason="Debian's ansible is not installed (scripts/install-deps.sh installs it)"),
]


@pytest.fixture
def ansible(daemon, tmp_path):
    """Run an ansible command against the shared daemon, in a scratch directory of its own."""
    ensure_containers_ready(daemon)
    env = {**daemon.env, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_REMOTE_TEMP": str(tmp_path / "rtmp"),
           "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3", "ANSIBLE_RETRY_FILES_ENABLED": "0",
           "ANSIBLE_INVENTORY_ENABLED": "community.general.lxd,host_list,yaml",
           "ANSIBLE_HOME": str(tmp_path / "home"), "ANSIBLE_STDOUT_CALLBACK": "json"}
    inventory = tmp_path / "inv.lxd.yml"  # the plugin takes files named *lxd.yml only
    inventory.write_text(f"plugin: community.general.lxd\nurl: unix:{daemon.socket}\n")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        if check and r.returncode != 0:
            raise AssertionError(f"{args[0]} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}")
        return r

    run.dir = tmp_path
    run.inventory = inventory
    return run


def playbook(run, name: str, state: str) -> dict:
    """Run the lxd_container module once; the task's result."""
    (run.dir / "play.yml").write_text(textwrap.dedent(f"""\
        - hosts: localhost
          connection: local
          gather_facts: false
          tasks:
            - community.general.lxd_container:
                name: {name}
                url: "unix:{{{{ lookup('env', 'LXD_DIR') }}}}/unix.socket"
                state: {state}
                source: {{type: image, alias: busybox}}
                timeout: 60
        """))
    r = run("ansible-playbook", "-i", "localhost,", "play.yml")
    out = json.loads(r.stdout)
    return out["plays"][0]["tasks"][0]["hosts"]["localhost"]


def status(daemon, name: str) -> str | None:
    r = daemon.api("GET", f"/1.0/instances/{name}")
    return r.json()["metadata"]["status"] if r.status_code == 200 else None


def test_lxd_container_module(daemon, ansible):
    name = f"{run_prefix()}-ans"
    try:
        res = playbook(ansible, name, "started")
        assert res["changed"] and not res.get("failed"), res
        assert status(daemon, name) == "Running"
        assert playbook(ansible, name, "started")["changed"] is False  # idempotent
        res = playbook(ansible, name, "stopped")
        assert res["changed"] and res["old_state"] == "started", res
        assert status(daemon, name) == "Stopped"
        playbook(ansible, name, "started")
        assert status(daemon, name) == "Running"
        res = playbook(ansible, name, "restarted")  # on a running one (LXD refuses a stopped one too)
        assert res["changed"], res
        assert status(daemon, name) == "Running"
        res = playbook(ansible, name, "absent")
        assert res["changed"], res
        assert status(daemon, name) is None
    finally:
        daemon.lxc("delete", "-f", name, check=False)


@pytest.fixture
def running(daemon):
    name = f"{run_prefix()}-ans"
    daemon.lxc("launch", ensure_containers_ready(daemon), name)
    yield name
    daemon.lxc("delete", "-f", name, check=False)


def test_inventory_plugin_lists_the_container(daemon, ansible, running):
    r = ansible("ansible-inventory", "-i", str(ansible.inventory), "--list")
    inv = json.loads(r.stdout)
    hostvars = inv["_meta"]["hostvars"]
    assert running in hostvars, r.stdout
    assert hostvars[running]["ansible_lxd_state"] == "running"
    assert hostvars[running]["ansible_lxd_os"] == "busybox"
    assert hostvars[running]["ansible_lxd_profile"] == ["default"]


def test_connection_plugin_runs_a_raw_command(daemon, ansible, running):
    # The inventory gives a container without an address `ansible_connection: local`: the
    # connection plugin is chosen on the command line (extra vars win over inventory vars).
    r = ansible("ansible", "-i", str(ansible.inventory), running, "-e", "ansible_connection=community.general.lxd",
                "-m", "raw", "-a", "echo from-ansible > /root/mark; cat /etc/hostname")
    assert f"{running} | CHANGED | rc=0" in r.stdout and r.stdout.rstrip().endswith(running), r.stdout
    assert daemon.lxc("exec", running, "--", "cat", "/root/mark").stdout == "from-ansible\n"
