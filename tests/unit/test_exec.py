"""Exec environment and working directory defaults (LXD's rules)."""

from __future__ import annotations

from lxd_daemon.instances.exec import DEFAULT_PATH, build_environment, default_cwd
from lxd_daemon.wire.exec import InstanceExecPost


def test_defaults_for_root():
    env = build_environment({}, None, 0)
    assert env == {"PATH": DEFAULT_PATH, "HOME": "/root", "USER": "root", "LANG": "C.UTF-8"}
    assert default_cwd(env, "") == "/root"


def test_instance_keys_then_request_on_top():
    config = {"environment.FOO": "conf", "environment.BAR": "conf", "limits.cpu": "1"}
    env = build_environment(config, {"FOO": "req", "PATH": "/bin"}, 0)
    assert env["FOO"] == "req" and env["BAR"] == "conf" and env["PATH"] == "/bin"
    assert "limits.cpu" not in env and "cpu" not in env


def test_non_root_user_gets_no_home():
    env = build_environment({}, {}, 1000)
    assert "HOME" not in env and "USER" not in env
    assert default_cwd(env, "") == "/"
    assert default_cwd(env, "/tmp") == "/tmp"


def test_request_model_uses_lxd_field_names():
    req = InstanceExecPost.model_validate({"command": ["sh"], "wait-for-websocket": True, "record-output": True,
                                           "interactive": True, "width": 80, "height": 24, "user": 5,
                                           "group": 6, "cwd": "/x", "environment": {"A": "b"}})
    assert req.wait_for_websocket and req.record_output and req.interactive
    assert (req.width, req.height, req.user, req.group, req.cwd) == (80, 24, 5, 6, "/x")


def test_seccomp_profile_parsing_for_the_fast_attach():
    from lxd_daemon.runtime.attach import SCMP_ACT_ERRNO, SCMP_ACT_KILL, parse_seccomp_profile

    text = "2\ndenylist\n[all]\nkexec_load errno 38\nopen_by_handle_at errno 38  # comment\nptrace kill\nbpf\n"
    assert parse_seccomp_profile(text) == [("kexec_load", SCMP_ACT_ERRNO | 38), ("open_by_handle_at", SCMP_ACT_ERRNO | 38),
                                           ("ptrace", SCMP_ACT_KILL), ("bpf", SCMP_ACT_KILL)]
    # Anything else goes to liblxc's attach.
    for other in ("1\nkexec_load\n", "2\nallowlist\n[all]\nread\n", "2\ndenylist\nreject_force_umount\n",
                  "2\ndenylist\n[arm64]\nkexec_load\n", "2\ndenylist\nmount errno 1 [0,1,SCMP_CMP_EQ]\n"):
        assert parse_seccomp_profile(other) is None, other
