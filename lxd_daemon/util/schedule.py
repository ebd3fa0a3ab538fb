"""Snapshot schedules, expiries and name patterns (instances and custom volumes).

Pure functions, no I/O. The syntax is LXD's:

- `snapshots.schedule`: a 5-field cron expression (`<minute> <hour> <day-of-month> <month>
  <day-of-week>`), or aliases (`@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`,
  `@annually`, `@yearly`, `@startup`, `@never`), several of them joined by ", " (comma and space:
  a bare comma belongs to a cron field). Aliases fire at a minute (and hour) derived from the
  subject's id, so that many instances do not all snapshot at the same minute.
- `snapshots.expiry`: space-separated `<n><unit>` fields, unit `M` minutes, `H` hours, `d` days,
  `w` weeks, `m` months, `y` years, each unit at most once ("1M 2H 3d").
- `snapshots.pattern`: a template rendered with `creation_date` (`{{ creation_date|date:'2006-01-02' }}`,
  Go layout tokens), then one `%d` replaced by the next free index (default pattern `snap%d`).
"""

from __future__ import annotations

import calendar
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

ALIASES: dict[str, str] = {
    "@hourly": "{m} * * * *",
    "@daily": "{m} {h} * * *",
    "@midnight": "{m} 0 * * *",
    "@weekly": "{m} {h} * * 0",
    "@monthly": "{m} {h} 1 * *",
    "@annually": "{m} {h} 1 1 *",
    "@yearly": "{m} {h} 1 1 *",
}
STARTUP = "@startup"
NEVER = "@never"
DEFAULT_PATTERN = "snap%d"

_CRON_FORM = "Schedule must be of the form: <minute> <hour> <day-of-month> <month> <day-of-week>"


def _triggers(spec: str) -> list[str]:
    spec = spec.strip().lower()
    if not spec:
        return []
    return [t.strip() for t in spec.split(", ") if t.strip()]


def _check_cron(expr: str) -> None:
    if len(expr.split(" ")) != 5:
        raise ValueError(f"{_CRON_FORM} (got {expr!r})")
    if "@" in expr:
        raise ValueError(f"Unknown schedule alias in {expr!r}")
    from croniter import croniter  # imported when a schedule is used (2.7 MB resident)

    try:
        ok = croniter.is_valid(expr)
    except Exception as e:  # croniter raises assorted types on odd input
        raise ValueError(f"Error parsing schedule {expr!r}: {e}") from None
    if not ok:
        raise ValueError(f"Error parsing schedule {expr!r}")


def validate_schedule(spec: str) -> None:
    """Raise ValueError naming the bad part; "" (no schedule) is valid."""
    for trig in _triggers(spec):
        if trig in ALIASES or trig in (STARTUP, NEVER):
            continue
        if trig.startswith("@"):
            hint = "; separate several triggers with a comma and a space" if "," in trig else ""
            raise ValueError(f"Unknown schedule alias {trig!r} (known: "
                             f"{', '.join([*ALIASES, STARTUP, NEVER])}){hint}")
        _check_cron(trig)


def _obfuscated(subject_id: int) -> tuple[int, int]:
    """A stable minute and hour for a subject, so aliases spread over the hour/day."""
    if not subject_id:
        return 0, 0
    digest = hashlib.sha256(str(int(subject_id)).encode()).digest()
    return digest[0] % 60, digest[1] % 24


def cron_specs(spec: str, subject_id: int = 0) -> list[str]:
    """The cron expressions a schedule stands for (aliases expanded; @startup/@never dropped)."""
    minute, hour = _obfuscated(subject_id)
    out: list[str] = []
    for trig in _triggers(spec):
        if trig in (STARTUP, NEVER):
            continue
        alias = ALIASES.get(trig)
        out.append(alias.format(m=minute, h=hour) if alias else trig)
    return out


def due(spec: str, at: datetime, subject_id: int = 0) -> bool:
    """Whether the schedule fires in the minute containing `at` (seconds ignored).

    Naive datetimes are taken as UTC. @startup is never due by time. An invalid spec is never due."""
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    minute = at.replace(second=0, microsecond=0)
    for expr in cron_specs(spec, subject_id):
        try:
            _check_cron(expr)
            from croniter import croniter

            if croniter.match(expr, minute):
                return True
        except (ValueError, KeyError):
            continue
    return False


def has_startup(spec: str) -> bool:
    return STARTUP in _triggers(spec)


# -- expiry -----------------------------------------------------------------------------------

_EXPIRY_FIELD = re.compile(r"(\d+)(S|M|H|d|w|m|y)")


@dataclass(frozen=True)
class Expiry:
    minutes: int = 0
    hours: int = 0
    days: int = 0
    weeks: int = 0
    months: int = 0
    years: int = 0
    seconds: int = 0

    def is_zero(self) -> bool:
        return not any((self.minutes, self.hours, self.days, self.weeks, self.months, self.years, self.seconds))

    def after(self, ref: datetime) -> datetime:
        """ref + this expiry, months/years normalised as Go's AddDate does (Jan 31 + 1m = Mar 3)."""
        month0 = ref.month - 1 + self.months
        year = ref.year + self.years + month0 // 12
        month = month0 % 12 + 1
        first = ref.replace(year=year, month=month, day=1)
        out = first + timedelta(days=ref.day - 1 + self.days + 7 * self.weeks)
        return out + timedelta(hours=self.hours, minutes=self.minutes, seconds=self.seconds)


_UNIT_FIELDS = {"S": "seconds", "M": "minutes", "H": "hours", "d": "days", "w": "weeks", "m": "months", "y": "years"}


def parse_expiry(spec: str) -> Expiry:
    """Parse "30S 1M 2H 3d 4w 5m 6y" (LXD's expiry expression); raise ValueError on anything else.
    "" -> zero Expiry."""
    expr = spec.strip()
    if not expr:
        return Expiry()
    values: dict[str, int] = {}
    for field in expr.split(" "):
        m = _EXPIRY_FIELD.fullmatch(field)
        if not m:
            raise ValueError(f"Invalid expiry expression {spec!r}: {field!r} is not <number><unit> "
                             f"with unit S (seconds), M (minutes), H (hours), d, w, m (months) or y")
        unit = _UNIT_FIELDS[m.group(2)]
        if values.get(unit):
            raise ValueError(f"Invalid expiry expression {spec!r}: unit {m.group(2)!r} given twice")
        values[unit] = int(m.group(1))
    return Expiry(**values)


def validate_expiry(spec: str) -> None:
    parse_expiry(spec)


def expiry_at(spec: str, start: datetime) -> datetime | None:
    """When something created at `start` expires under `spec`; None for no expiry."""
    exp = parse_expiry(spec)
    if exp.is_zero():
        return None
    return exp.after(start)


# -- pattern ----------------------------------------------------------------------------------

# Go reference-time layout tokens, longest first so that "2006" wins over "2" and "January" over "Jan".
_GO_TOKENS: list[tuple[str, object]] = [
    ("January", lambda d: calendar.month_name[d.month]),
    ("Monday", lambda d: calendar.day_name[d.weekday()]),
    ("2006", lambda d: f"{d.year:04d}"),
    ("-07:00", lambda d: _tz(d, ":")),
    ("-0700", lambda d: _tz(d, "")),
    ("Z07:00", lambda d: "Z" if _is_utc(d) else _tz(d, ":")),
    ("Z0700", lambda d: "Z" if _is_utc(d) else _tz(d, "")),
    ("-07", lambda d: _tz(d, "")[:3]),
    (".000000000", lambda d: f".{d.microsecond * 1000:09d}"),
    (".000000", lambda d: f".{d.microsecond:06d}"),
    (".000", lambda d: f".{d.microsecond // 1000:03d}"),
    ("Jan", lambda d: calendar.month_abbr[d.month]),
    ("Mon", lambda d: calendar.day_abbr[d.weekday()]),
    ("MST", lambda d: d.tzname() or "UTC"),
    ("002", lambda d: f"{d.timetuple().tm_yday:03d}"),
    ("_2", lambda d: f"{d.day:2d}"),
    ("06", lambda d: f"{d.year % 100:02d}"),
    ("01", lambda d: f"{d.month:02d}"),
    ("02", lambda d: f"{d.day:02d}"),
    ("15", lambda d: f"{d.hour:02d}"),
    ("03", lambda d: f"{(d.hour % 12) or 12:02d}"),
    ("04", lambda d: f"{d.minute:02d}"),
    ("05", lambda d: f"{d.second:02d}"),
    ("PM", lambda d: "PM" if d.hour >= 12 else "AM"),
    ("pm", lambda d: "pm" if d.hour >= 12 else "am"),
    ("1", lambda d: str(d.month)),
    ("2", lambda d: str(d.day)),
    ("3", lambda d: str((d.hour % 12) or 12)),
    ("4", lambda d: str(d.minute)),
    ("5", lambda d: str(d.second)),
]


def _is_utc(d: datetime) -> bool:
    off = d.utcoffset()
    return off is None or off == timedelta(0)


def _tz(d: datetime, sep: str) -> str:
    off = d.utcoffset() or timedelta(0)
    total = int(off.total_seconds() // 60)
    sign = "-" if total < 0 else "+"
    total = abs(total)
    return f"{sign}{total // 60:02d}{sep}{total % 60:02d}"


def go_time_format(d: datetime, layout: str) -> str:
    """Format `d` with a Go time layout ("2006-01-02_15-04-05")."""
    out: list[str] = []
    i = 0
    while i < len(layout):
        for token, fn in _GO_TOKENS:
            if layout.startswith(token, i):
                out.append(fn(d))  # type: ignore[operator]
                i += len(token)
                break
        else:
            out.append(layout[i])
            i += 1
    return "".join(out)


def _go_default(d: datetime) -> str:
    """Go's time.Time String(): "2006-01-02 15:04:05.999999999 -0700 MST"."""
    frac = f".{d.microsecond:06d}".rstrip("0").rstrip(".") if d.microsecond else ""
    return d.strftime("%Y-%m-%d %H:%M:%S") + frac + " " + _tz(d, "") + " " + (d.tzname() or "UTC")


_EXPR = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.S)
_DATE_FILTER = re.compile(r"""creation_date\s*\|\s*date\s*:\s*(?:"([^"]*)"|'([^']*)')""")


def render_template(pattern: str, now: datetime) -> str:
    """Render the pongo2 subset LXD users put in snapshots.pattern: `{{ creation_date }}` and
    `{{ creation_date|date:"<Go layout>" }}`. Anything else raises ValueError."""
    if "{%" in pattern:
        raise ValueError(f"Unsupported template tag in snapshot pattern {pattern!r}")

    def sub(m: re.Match[str]) -> str:
        expr = m.group(1)
        if expr == "creation_date":
            return _go_default(now)
        f = _DATE_FILTER.fullmatch(expr)
        if f:
            return go_time_format(now, f.group(1) if f.group(1) is not None else f.group(2))
        raise ValueError(f"Unsupported expression {{{{ {expr} }}}} in snapshot pattern "
                         "(supported: creation_date, creation_date|date:\"<layout>\")")

    return _EXPR.sub(sub, pattern)


def validate_pattern(pattern: str) -> None:
    rendered = render_template(pattern, datetime(2006, 1, 2, 15, 4, 5, tzinfo=UTC))
    if rendered.count("%d") > 1:
        raise ValueError("Snapshot pattern may contain '%d' only once")


def render_pattern(pattern: str, existing: set[str] | list[str], now: datetime) -> str:
    """The name for a new snapshot. `%d` becomes one past the highest index already used by a
    name of the same shape (LXD's rule: "snap0 snap1" -> "snap2", also after snap0 is deleted);
    without `%d` the rendered name itself (the caller checks it does not exist yet)."""
    rendered = render_template(pattern or DEFAULT_PATTERN, now)
    count = rendered.count("%d")
    if count > 1:
        raise ValueError("Snapshot pattern may contain '%d' only once")
    if count == 0:
        return rendered
    head, tail = rendered.split("%d", 1)
    shape = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    nxt = 0
    for name in existing:
        m = shape.fullmatch(name)
        if m:
            nxt = max(nxt, int(m.group(1)) + 1)
    return head + str(nxt) + tail
