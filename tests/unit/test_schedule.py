"""lxd_daemon/util/schedule.py: LXD's snapshots.schedule / .expiry / .pattern syntax."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from lxd_daemon.util import schedule as s


@pytest.mark.parametrize("spec", [
    "", "@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@annually", "@yearly",
    "@startup", "@never", "@HOURLY", "*/5 * * * *", "0 6 * * 1-5", "0 0,12 * * *",
    "@hourly, @startup", "0 6 * * *, @startup", "0 0 1 jan *", "15 3 * * sun",
])
def test_valid_schedules(spec):
    s.validate_schedule(spec)


@pytest.mark.parametrize("spec,needle", [
    ("@fortnightly", "Unknown schedule alias"),
    ("* * * *", "must be of the form"),
    ("* * * * * *", "must be of the form"),
    ("61 * * * *", "Error parsing"),
    ("a b c d e", "Error parsing"),
    ("@hourly,@daily", "comma and a space"),  # LXD separates triggers with ", "
    ("0 6 * * *, bogus", "must be of the form"),
])
def test_invalid_schedules(spec, needle):
    with pytest.raises(ValueError, match=needle):
        s.validate_schedule(spec)


def test_due_cron_and_seconds_ignored():
    at = datetime(2026, 3, 4, 6, 0, 42)
    assert s.due("0 6 * * *", at)
    assert not s.due("0 6 * * *", at + timedelta(minutes=1))
    assert s.due("*/5 * * * *", datetime(2026, 3, 4, 7, 15, 59))
    assert not s.due("*/5 * * * *", datetime(2026, 3, 4, 7, 16))
    # two triggers: either fires
    assert s.due("0 1 * * *, 30 2 * * *", datetime(2026, 3, 4, 2, 30))
    # timezone-aware input is taken in UTC
    tz = timezone(timedelta(hours=2))
    assert s.due("0 6 * * *", datetime(2026, 3, 4, 8, 0, tzinfo=tz))


def test_due_aliases_fire_once_per_period():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for subject in (0, 7, 12345):
        hourly = sum(s.due("@hourly", start + timedelta(minutes=i), subject) for i in range(24 * 60))
        daily = sum(s.due("@daily", start + timedelta(minutes=i), subject) for i in range(24 * 60))
        assert hourly == 24
        assert daily == 1
    assert s.due("@daily", datetime(2026, 5, 5, 0, 0), 0)
    assert s.due("@midnight", datetime(2026, 5, 5, 0, 0), 0)
    assert s.due("@weekly", datetime(2026, 5, 3, 0, 0), 0)  # a Sunday
    assert not s.due("@weekly", datetime(2026, 5, 4, 0, 0), 0)
    assert s.due("@monthly", datetime(2026, 5, 1, 0, 0), 0)
    assert s.due("@yearly", datetime(2027, 1, 1, 0, 0), 0)


def test_startup_and_never():
    assert s.has_startup("@startup")
    assert s.has_startup("@hourly, @startup")
    assert not s.has_startup("@hourly")
    assert not s.has_startup("")
    at = datetime(2026, 1, 1, 0, 0)
    assert not s.due("@startup", at)
    assert not s.due("@never", at)
    assert not s.due("", at)
    assert not s.due("garbage", at)


def test_expiry():
    ref = datetime(2026, 1, 31, 10, 0, tzinfo=UTC)
    assert s.expiry_at("", ref) is None
    assert s.expiry_at("1M", ref) == ref + timedelta(minutes=1)
    assert s.expiry_at("2H 3d", ref) == ref + timedelta(hours=2, days=3)
    assert s.expiry_at("1w", ref) == ref + timedelta(days=7)
    # Go AddDate normalisation: Jan 31 + 1 month = Mar 3 (2026 is not a leap year)
    assert s.expiry_at("1m", ref) == datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
    assert s.expiry_at("1y", ref) == datetime(2027, 1, 31, 10, 0, tzinfo=UTC)
    assert s.expiry_at("13m", ref) == datetime(2027, 3, 3, 10, 0, tzinfo=UTC)
    assert s.parse_expiry("1M 2H 3d 4w 5m 6y") == s.Expiry(1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize("spec", ["1", "d", "1x", "1d 2d", "1 d", "-1d", "1d,2H", "1.5d"])
def test_bad_expiry(spec):
    with pytest.raises(ValueError, match="Invalid expiry"):
        s.validate_expiry(spec)


def test_pattern_index():
    now = datetime(2026, 12, 4, 23, 5, 9, tzinfo=UTC)
    assert s.render_pattern("snap%d", set(), now) == "snap0"
    assert s.render_pattern("", {"snap0"}, now) == "snap1"
    # LXD takes one past the highest index, not the lowest free one
    assert s.render_pattern("snap%d", {"snap1", "other", "snapx"}, now) == "snap2"
    assert s.render_pattern("b-%d-x", {"b-4-x", "b-9-y"}, now) == "b-5-x"
    assert s.render_pattern("fixed", {"a"}, now) == "fixed"
    with pytest.raises(ValueError, match="only once"):
        s.render_pattern("%d-%d", set(), now)


def test_pattern_dates():
    now = datetime(2026, 2, 4, 3, 5, 9, 120000, tzinfo=UTC)
    p = "{{ creation_date|date:'2006-01-02_15-04-05' }}"
    assert s.render_pattern(p, set(), now) == "2026-02-04_03-05-09"
    assert s.render_pattern('auto-{{creation_date|date:"Jan 2 06 3PM .000"}}-%d', set(), now) == \
        "auto-Feb 4 26 3AM .120-0"
    assert s.render_pattern("{{ creation_date|date:'Monday January _2 MST -07:00' }}", set(), now) == \
        "Wednesday February  4 UTC +00:00"
    assert s.render_template("{{ creation_date }}", now) == "2026-02-04 03:05:09.12 +0000 UTC"
    with pytest.raises(ValueError, match="Unsupported"):
        s.validate_pattern("{{ name }}")
    with pytest.raises(ValueError, match="Unsupported"):
        s.validate_pattern("{% if x %}a{% endif %}")
    s.validate_pattern("snap-{{ creation_date|date:'20060102' }}-%d")
