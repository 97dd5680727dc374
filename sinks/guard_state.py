"""Where the remediation policy keeps the state of its fleet-level guard rails, and the operator's side of it.

The circuit breaker, the hosts acted on within its window, each host's recent remediations, escalations to a
human, the fleet's hosts and the unhealthy ones must survive a sink restart and be the same for every
remediation sink replica (each reads only some partitions, so only some hosts). `RedisGuardState` keeps them in
Redis (keys in `redis_keys`, docs/redis.md) and makes the one decision two replicas could race on, admitting a
disruptive action under the breaker's limit, in one script. `MemoryGuardState` is the same state in a dict, for
tests, drills and offline replays. Both implement `GuardState`; the policy decides, the state only counts.

`read_guards` is what `gpuwatch policy status` reads; `sinks/policy_admin.py` holds the operator commands.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import redis

from ..schemas import redis_keys as k

log = logging.getLogger(__name__)

# What `admit` answers: the action may go; the breaker was open already; this action opened it; no state.
ADMITTED, OPEN, TRIPPED, UNAVAILABLE = "ok", "open", "tripped", "unavailable"


@dataclass
class GuardView:
    """The shared state the policy reads once per batch (`GuardState.sync`)."""

    breaker: dict[str, Any] | None = None  # the open breaker's trip record
    escalated: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> its escalation record
    incident: dict[str, Any] | None = None  # the incident's trip record while one holds
    fleet_hosts: int = 0
    unhealthy_hosts: int = 0
    available: bool = True  # False: the state could not be read (the policy then takes no disruptive action)


class GuardState(Protocol):
    """The guard rails' shared state; wall-clock times in unix seconds."""

    def sync(
        self, seen: Mapping[str, float], unhealthy: Mapping[str, float], healthy: Iterable[str], now: float,
        fleet_keep_s: float, unhealthy_keep_s: float,
    ) -> GuardView:  # fmt: skip
        """Records the hosts `seen` and those now `unhealthy` (host -> time), forgets `healthy` ones and those
        not seen for `fleet_keep_s` / not unhealthy for `unhealthy_keep_s`, and returns the view."""
        ...

    def admit(self, host: str, now: float, window_s: float, limit: int, trip: Mapping[str, Any]) -> str:
        """At once: OPEN if the breaker is open; ADMITTED (and `host` counted at `now`) if `host` was acted on
        within `window_s` or fewer than `limit` hosts were; else opens the breaker with `trip`: TRIPPED."""
        ...

    def remediations(self, host: str, since: float) -> list[float]:
        """When the remediations of `host` recorded at or after `since` were, oldest first."""
        ...

    def add_remediation(self, host: str, event_id: str, now: float, keep_s: float) -> None:
        """Records a remediation of `host` (kept `keep_s`)."""
        ...

    def escalate(self, host: str, entry: Mapping[str, Any]) -> bool:
        """Opens an escalation of `host`; True if it was not open already."""
        ...

    def set_incident(self, entry: Mapping[str, Any] | None) -> bool:
        """Opens (`entry`) or closes (None) the incident; True if that changed it."""
        ...


class MemoryGuardState:
    """`GuardState` in memory: one process, gone with it."""

    def __init__(self) -> None:
        self.breaker: dict[str, Any] | None = None
        self.disrupted: dict[str, float] = {}
        self.remediated: dict[str, dict[str, float]] = {}
        self.escalations: dict[str, dict[str, Any]] = {}
        self.hosts: dict[str, float] = {}
        self.unhealthy: dict[str, float] = {}
        self.incident: dict[str, Any] | None = None

    def sync(
        self, seen: Mapping[str, float], unhealthy: Mapping[str, float], healthy: Iterable[str], now: float,
        fleet_keep_s: float, unhealthy_keep_s: float,
    ) -> GuardView:  # fmt: skip
        self.hosts.update(seen)
        self.unhealthy.update(unhealthy)
        for host in healthy:
            self.unhealthy.pop(host, None)
        self.hosts = {h: t for h, t in self.hosts.items() if t >= now - fleet_keep_s}
        self.unhealthy = {h: t for h, t in self.unhealthy.items() if t >= now - unhealthy_keep_s}
        return GuardView(
            self.breaker, dict(self.escalations), self.incident, len(self.hosts), len(self.unhealthy)
        )

    def admit(self, host: str, now: float, window_s: float, limit: int, trip: Mapping[str, Any]) -> str:
        if self.breaker is not None:
            return OPEN
        self.disrupted = {h: t for h, t in self.disrupted.items() if t >= now - window_s}
        if host in self.disrupted or len(self.disrupted) < limit:
            self.disrupted[host] = max(now, self.disrupted.get(host, now))
            return ADMITTED
        self.breaker = dict(trip)
        return TRIPPED

    def remediations(self, host: str, since: float) -> list[float]:
        return sorted(t for t in self.remediated.get(host, {}).values() if t >= since)

    def add_remediation(self, host: str, event_id: str, now: float, keep_s: float) -> None:
        kept = {i: t for i, t in self.remediated.get(host, {}).items() if t >= now - keep_s}
        kept[event_id] = now
        self.remediated[host] = kept

    def escalate(self, host: str, entry: Mapping[str, Any]) -> bool:
        if host in self.escalations:
            return False
        self.escalations[host] = dict(entry)
        return True

    def set_incident(self, entry: Mapping[str, Any] | None) -> bool:
        changed = (entry is None) != (self.incident is None)
        self.incident = None if entry is None else dict(entry)
        return changed


# KEYS: breaker, disrupted. ARGV: host, now, window_s, limit, trip JSON. Atomic, so two replicas never both take
# the last slot under the limit.
_ADMIT = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return '{OPEN}' end
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[3])))
if redis.call('ZSCORE', KEYS[2], ARGV[1]) or redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[2], 'GT', now, ARGV[1])
  return '{ADMITTED}'
end
redis.call('SET', KEYS[1], ARGV[5])
return '{TRIPPED}'
"""


class RedisGuardState:
    """`GuardState` in Redis, shared by every remediation sink replica and kept across restarts.

    Fails closed: when Redis cannot be read, `sync` says so (`available` False) and `admit` answers UNAVAILABLE,
    so the policy takes no disruptive action blind (the kill switch, read from the same Redis, fails closed too).
    """

    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client
        self._admit = redis_client.register_script(_ADMIT)
        self._failing = False

    def _failed(self, what: str, exc: Exception) -> None:
        if not self._failing:
            log.warning("cannot %s the guard rails' state in Redis (%s); no disruptive action until it answers",
                        what, exc)  # fmt: skip
        self._failing = True

    def sync(
        self, seen: Mapping[str, float], unhealthy: Mapping[str, float], healthy: Iterable[str], now: float,
        fleet_keep_s: float, unhealthy_keep_s: float,
    ) -> GuardView:  # fmt: skip
        healthy = list(healthy)
        pipe = self._redis.pipeline(transaction=False)
        if seen:
            pipe.zadd(k.POLICY_HOSTS, dict(seen))
        if unhealthy:
            pipe.zadd(k.POLICY_UNHEALTHY, dict(unhealthy))
        if healthy:
            pipe.zrem(k.POLICY_UNHEALTHY, *healthy)
        pipe.zremrangebyscore(k.POLICY_HOSTS, "-inf", f"({now - fleet_keep_s}")
        pipe.zremrangebyscore(k.POLICY_UNHEALTHY, "-inf", f"({now - unhealthy_keep_s}")
        pipe.zcard(k.POLICY_HOSTS)
        pipe.zcard(k.POLICY_UNHEALTHY)
        pipe.get(k.POLICY_BREAKER)
        pipe.hgetall(k.POLICY_ESCALATIONS)
        pipe.get(k.POLICY_INCIDENT)
        try:
            *_, hosts, sick, breaker, escalations, incident = pipe.execute()
        except redis.RedisError as exc:
            self._failed("read", exc)
            return GuardView(available=False)
        self._failing = False
        return GuardView(
            breaker=parse_record(breaker),
            escalated={_text(h): parse_record(v) or {} for h, v in (escalations or {}).items()},
            incident=parse_record(incident),
            fleet_hosts=int(hosts),
            unhealthy_hosts=int(sick),
        )

    def admit(self, host: str, now: float, window_s: float, limit: int, trip: Mapping[str, Any]) -> str:
        try:
            answer = self._admit(keys=[k.POLICY_BREAKER, k.POLICY_DISRUPTED],
                                 args=[host, now, window_s, limit, orjson.dumps(trip)])  # fmt: skip
        except redis.RedisError as exc:
            self._failed("update", exc)
            return UNAVAILABLE
        return _text(answer)

    def remediations(self, host: str, since: float) -> list[float]:
        try:
            found: Any = self._redis.zrangebyscore(k.remediated_key(host), since, "+inf", withscores=True)
        except redis.RedisError as exc:
            self._failed("read", exc)
            return []
        return [float(t) for _, t in found]

    def add_remediation(self, host: str, event_id: str, now: float, keep_s: float) -> None:
        key = k.remediated_key(host)
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(key, {event_id: now})
        pipe.zremrangebyscore(key, "-inf", f"({now - keep_s}")
        pipe.expire(key, max(1, int(keep_s) + 1))
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._failed("update", exc)

    def escalate(self, host: str, entry: Mapping[str, Any]) -> bool:
        try:
            return bool(self._redis.hsetnx(k.POLICY_ESCALATIONS, host, orjson.dumps(entry)))
        except redis.RedisError as exc:
            self._failed("update", exc)
            return False

    def set_incident(self, entry: Mapping[str, Any] | None) -> bool:
        try:
            if entry is None:
                return bool(self._redis.delete(k.POLICY_INCIDENT))
            return bool(self._redis.set(k.POLICY_INCIDENT, orjson.dumps(entry), nx=True))
        except redis.RedisError as exc:
            self._failed("update", exc)
            return False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_record(value: Any) -> dict[str, Any] | None:
    """A JSON object stored by the policy (or by hand) as a dict; None for a missing key."""
    if value is None:
        return None
    try:
        out = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {"detail": _text(value)}  # written by hand: still open, whatever it says
    return out if isinstance(out, dict) else {"detail": out}


# ------------------------------------------------------------------------------ the operator's side


def read_guards(redis_client: redis.Redis, now: float, window_s: float, fleet_keep_s: float,
                unhealthy_keep_s: float) -> dict[str, Any]:  # fmt: skip
    """The guard rails' state as `gpuwatch policy status` shows it: breaker, the hosts acted on within `window_s`
    (host -> when), escalations, incident, fleet and unhealthy host counts, the kill switch note."""
    pipe = redis_client.pipeline(transaction=False)
    pipe.get(k.POLICY_BREAKER)
    pipe.zrangebyscore(k.POLICY_DISRUPTED, now - window_s, "+inf", withscores=True)
    pipe.hgetall(k.POLICY_ESCALATIONS)
    pipe.get(k.POLICY_INCIDENT)
    pipe.zcount(k.POLICY_HOSTS, now - fleet_keep_s, "+inf")
    pipe.zcount(k.POLICY_UNHEALTHY, now - unhealthy_keep_s, "+inf")
    pipe.get(k.KILLSWITCH)
    breaker, disrupted, escalations, incident, hosts, sick, kill = pipe.execute()
    return {
        "breaker": parse_record(breaker),
        "disrupted": {_text(h): float(t) for h, t in disrupted or []},
        "escalations": {_text(h): parse_record(v) or {} for h, v in (escalations or {}).items()},
        "incident": parse_record(incident),
        "fleet_hosts": int(hosts),
        "unhealthy_hosts": int(sick),
        "killswitch": None if kill is None else _text(kill),
    }
