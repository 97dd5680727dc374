"""Pools of hosts and maintenance windows: what the remediation policy's per-pool guard rails group by.

A risk record names its GPU by host and index only, so a host's pool comes from its name: the first group of
the regular expression `policy_pool_pattern` searched in the host name (the whole match when it has no group).
With the simulator's names (``node-0000`` ... ``node-0199``), ``^(node-\\d{3})\\d$`` makes pools of ten hosts
(``node-000`` holds node-0000 to node-0009: a rack). Without a pattern every host is in pool ``fleet``; a host
the pattern does not match is in pool ``other``.

A maintenance window is planned work on a pool (or the whole fleet) during which the policy holds its
disruptive actions. `policy_maintenance_windows` lists them, separated by ``;``, each in UTC and optionally
after ``POOL@``:

* weekly: ``DAY HH:MM-HH:MM`` with DAY one of Mon Tue Wed Thu Fri Sat Sun, or ``daily``; an end at or before
  the start runs past midnight into the next day (``Sat 22:00-02:00`` ends Sunday 02:00); ``24:00`` ends at
  midnight;
* once: ``YYYY-MM-DDTHH:MMZ/YYYY-MM-DDTHH:MMZ`` (start included, end excluded).

Example: ``daily 02:00-03:00; node-001@Sat 22:00-02:00; 2025-07-01T00:00Z/2025-07-01T06:00Z``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

FLEET_POOL = "fleet"  # every host's pool when no pattern is set
OTHER_POOL = "other"  # hosts the pattern does not match
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
WINDOW_FORMS = "'DAY HH:MM-HH:MM' (DAY Mon..Sun or daily) or 'YYYY-MM-DDTHH:MMZ/YYYY-MM-DDTHH:MMZ', in UTC"

_WEEKLY = re.compile(r"^(?P<day>[A-Za-z]+)\s+(?P<start>\d{2}:\d{2})\s*-\s*(?P<end>\d{2}:\d{2})$")
_ONCE = re.compile(
    r"^(?P<start>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}Z)\s*/\s*(?P<end>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}Z)$"
)


class Pools:
    """The pool of each host name, from `pattern` (see the module docstring)."""

    def __init__(self, pattern: str = "") -> None:
        """ValueError naming the problem if `pattern` is not a regular expression with at most one group."""
        self.pattern = pattern
        self._regex: re.Pattern[str] | None = None
        if pattern:
            try:
                self._regex = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from exc
            if self._regex.groups > 1:
                raise ValueError(
                    f"{pattern!r} has {self._regex.groups} groups; give at most one: the pool name"
                )
        self._cache: dict[str, str] = {}

    def of(self, host: str) -> str:
        """The pool of `host`."""
        pool = self._cache.get(host)
        if pool is None:
            pool = FLEET_POOL
            if self._regex is not None:
                found = self._regex.search(host)
                pool = (found.group(self._regex.groups) or OTHER_POOL) if found else OTHER_POOL
            if len(self._cache) < 1_000_000:  # bounded by the fleet; a guard against unbounded host names
                self._cache[host] = pool
        return pool


@dataclass(frozen=True)
class MaintenanceWindow:
    """One window: weekly (`weekday` None = daily, minutes of the UTC day) or once (`start_ts`, `end_ts`)."""

    text: str
    pool: str | None = None  # None: fleet-wide
    weekday: int | None = None  # 0 = Monday
    start_min: int = 0
    end_min: int = 0
    start_ts: float | None = None
    end_ts: float | None = None

    def covers(self, pool: str, now: float) -> bool:
        """Whether the window holds for a host of `pool` at unix time `now`."""
        if self.pool is not None and self.pool != pool:
            return False
        if self.start_ts is not None and self.end_ts is not None:
            return self.start_ts <= now < self.end_ts
        t = datetime.fromtimestamp(now, UTC)
        minute, day = t.hour * 60 + t.minute, t.weekday()
        on = self.weekday is None or self.weekday == day
        if self.start_min < self.end_min:
            return on and self.start_min <= minute < self.end_min
        on_next = self.weekday is None or (self.weekday + 1) % 7 == day  # the part after midnight
        return (on and minute >= self.start_min) or (on_next and minute < self.end_min)


def parse_maintenance_windows(text: str) -> tuple[MaintenanceWindow, ...]:
    """The windows of a `policy_maintenance_windows` value; ValueError naming the entry that is wrong."""
    out = []
    for raw in text.split(";"):
        entry = raw.strip()
        if entry:
            out.append(_parse_window(entry))
    return tuple(out)


def _parse_window(entry: str) -> MaintenanceWindow:
    pool, at, spec = entry.partition("@")
    if not at:
        pool, spec = "", entry
    pool, spec = pool.strip(), spec.strip()
    if at and not pool:
        raise ValueError(f"window {entry!r}: the pool before '@' is empty")
    weekly, once = _WEEKLY.match(spec), _ONCE.match(spec)
    if weekly:
        day = weekly["day"].capitalize()
        if day not in DAYS and day != "Daily":
            raise ValueError(
                f"window {entry!r}: {weekly['day']!r} is not a day; give one of {', '.join(DAYS)} or daily"
            )
        start, end = _minute(entry, weekly["start"]), _minute(entry, weekly["end"])
        if start == end or start == 24 * 60:
            raise ValueError(f"window {entry!r}: start and end must differ, and the start be before 24:00")
        return MaintenanceWindow(entry, pool or None, None if day == "Daily" else DAYS.index(day), start, end)
    if once:
        start_ts, end_ts = _instant(entry, once["start"]), _instant(entry, once["end"])
        if end_ts <= start_ts:
            raise ValueError(f"window {entry!r}: the end must be after the start")
        return MaintenanceWindow(entry, pool or None, start_ts=start_ts, end_ts=end_ts)
    raise ValueError(f"window {entry!r}: expected {WINDOW_FORMS}, optionally after 'POOL@'")


def _minute(entry: str, hhmm: str) -> int:
    hours, minutes = int(hhmm[:2]), int(hhmm[3:])
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"window {entry!r}: {hhmm} is not a time of day (00:00 to 24:00)")
    return hours * 60 + minutes


def _instant(entry: str, text: str) -> float:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC).timestamp()
    except ValueError as exc:
        raise ValueError(f"window {entry!r}: {text} is not a date and time ({exc})") from exc


def active_window(windows: tuple[MaintenanceWindow, ...], pool: str, now: float) -> MaintenanceWindow | None:
    """The first of `windows` that holds for `pool` at `now`, if any."""
    for w in windows:
        if w.covers(pool, now):
            return w
    return None
