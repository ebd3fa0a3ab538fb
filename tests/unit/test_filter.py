import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.filter import parse_filter

INST = {
    "name": "web1",
    "status": "Running",
    "ephemeral": False,
    "config": {"image.os": "Debian", "limits.cpu": "2"},
    "expanded_devices": {"eth0": {"nictype": "bridged"}},
    "state": {"pid": 42},
}


@pytest.mark.parametrize(
    "expr,expected",
    [
        ("", True),
        ("status eq running", True),
        ("status eq Stopped", False),
        ("status ne stopped", True),
        ("not status eq running", False),
        ("name eq web.*", True),
        ("name eq eb", False),
        ("name eq ^we", True),
        ("config.image.os eq debian", True),
        ("config.limits.cpu eq 2", True),
        ("expanded_devices.eth0.nictype eq bridged", True),
        ("ephemeral eq false", True),
        ("ephemeral eq true", False),
        ("state.pid eq 42", True),
        ("status eq running and name eq web1", True),
        ("status eq stopped and name eq web1", False),
        ("status eq stopped or name eq web1", True),
        ("status eq stopped and name eq web1 or ephemeral eq false", True),
        ("missing.field eq x", False),
        ("missing.field ne x", True),
        ("name eq 'web1'", True),
    ],
)
def test_filter_matches_like_lxd(expr, expected):
    assert parse_filter(expr).match(INST) is expected


@pytest.mark.parametrize("expr", ["status", "status eq", "status gt 1", "status eq running and", "a eq b xor c eq d"])
def test_bad_filters_are_400(expr):
    with pytest.raises(BadRequest):
        parse_filter(expr)
