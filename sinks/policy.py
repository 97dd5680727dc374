"""Turns the stream's alarms into remediation events (checkpoint -> migrate -> reboot), with guard rails.

`RemediationPolicy` is a plain in-memory state machine: feed it decoded risk records with `observe` and
it returns `gpuwatch.remediation/1` events. It holds no thresholds: each risk record says whether its GPU
is in alarm (`alarm`, the model's alarm operating point), whether the drain operating point holds
(`drain`) and whether the GPU has already failed (`failed`), all decided by the stream from the model
artifact (docs/model.md), so the product acts on exactly what was evaluated. Side effects are injected:
`killswitch()` (is the global kill switch on?) and `audit(entries)` (where decisions go); `RedisKillSwitch`
and `RedisAuditLog` below are the Redis-backed ones the remediation sink uses. docs/redis.md describes the
rules for operators.

Time: escalation timers run on record time (`ts`), so replaying the same records yields the same events
with the same ids; `now` (wall clock) is only used to reject stale records and to expire drain holds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from gpuwatch.config import Settings

from ..schemas.codecs import remediation_id
from ..schemas.fields import REMEDIATION_SCHEMA
from . import redis_keys as k

log = logging.getLogger(__name__)

AuditSink = Callable[[list[dict[str, Any]]], None]


@dataclass(frozen=True)
class PolicyRules:
    """The knobs of the policy; times in seconds of record time."""

    episode_gap_s: float = 600.0  # an episode ends after this long without an alarm record
    checkpoint_grace_s: float = 60.0  # earliest migrate after checkpoint, so jobs can save their state
    reboot_after_s: float = 600.0  # reboot when the drain operating point still holds this long after migrate
    reboot_modes: tuple[str, ...] = ("memory", "interconnect", "sudden")  # a reboot cannot fix a fan or PSU
    cooldown_s: float = 3600.0  # a GPU acted on cannot start a new episode's actions for this long
    max_concurrent_drains: int = 2  # hosts draining (migrate) or rebooting at once, fleet-wide
    drain_hold_s: float = 3600.0  # a drain stops counting when its episode ends or after this long
    stale_after_s: float = 60.0  # records older than this (vs `now`) are never acted on

    def __post_init__(self) -> None:
        if self.max_concurrent_drains < 0:
            raise ValueError("max_concurrent_drains must be >= 0")
        if min(self.episode_gap_s, self.checkpoint_grace_s, self.reboot_after_s, self.cooldown_s) < 0:
            raise ValueError("policy times must be >= 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicyRules:
        """Rules from the `policy_*` and `stale_after_s` settings (the rest keep their defaults)."""
        return cls(
            episode_gap_s=settings.policy_episode_gap_s,
            checkpoint_grace_s=settings.policy_checkpoint_grace_s,
            reboot_after_s=settings.policy_reboot_after_s,
            cooldown_s=settings.policy_cooldown_s,
            max_concurrent_drains=settings.policy_max_concurrent_drains,
            drain_hold_s=settings.policy_drain_hold_s,
            stale_after_s=settings.stale_after_s,
        )


@dataclass
class _Episode:
    start_ts: float
    uuid: str
    last_alarm_ts: float
    action_ts: dict[str, float] = field(default_factory=dict)  # action -> record ts it was emitted at
    audited: set[tuple[str, str]] = field(default_factory=set)  # (action, reason) suppressions logged


@dataclass
class _Gpu:
    last_ts: float
    last_action_ts: float | None = None
    episode: _Episode | None = None
    repaired_failure: float | None = None  # failed_since of the failure a repair was asked for
    suppressed_failure: float | None = None  # ... of the failure whose repair the kill switch held (audited once)


class RemediationPolicy:
    """Decides remediation per GPU episode; `observe` returns the events to publish.

    An episode of a GPU opens at its first record in alarm and ends after `episode_gap_s` without one (or
    when the GPU's uuid changes: the card was replaced, or when it fails). Within an episode, at most one
    event per action, in order: checkpoint (the record is in alarm), migrate (the drain operating point
    holds, at least `checkpoint_grace_s` after the checkpoint), reboot (the drain operating point still
    holds `reboot_after_s` after migrate, modes in `reboot_modes` only). A failed GPU (`failed: true`) is no
    longer predicted: its episode ends and it gets one `repair` event per failure (drain it and ask for a
    repair) instead of the ladder. Guard rails, checked in this order: kill switch, per-GPU cooldown (first
    action of an episode), blast radius (`max_concurrent_drains` hosts draining or rebooting; repairs are
    not limited: the GPU is down already). Stale, duplicate and out-of-order records are ignored. Every
    decision (acted, suppressed, cleared) is passed to `audit`, suppressions once per episode.
    """

    def __init__(
        self,
        rules: PolicyRules | None = None,
        *,
        killswitch: Callable[[], bool] | None = None,
        audit: AuditSink | None = None,
        **overrides: Any,
    ) -> None:
        """`overrides` replace single rules: ``RemediationPolicy(episode_gap_s=60, max_concurrent_drains=1)``."""
        self.rules = dataclasses.replace(rules or PolicyRules(), **overrides)
        self._killswitch = killswitch or (lambda: False)
        self._audit = audit or (lambda entries: None)
        self._gpus: dict[str, _Gpu] = {}
        self._drains: dict[str, dict[str, float]] = {}  # host -> {member: wall time the drain began}
        self._stale_audited: set[str] = set()

    def tracks(self, host: str, gpu_index: int) -> bool:
        """Whether the policy holds state for this GPU (an episode, a cooldown or a repair): its next record
        matters even if it is not in alarm. A replay may skip the quiet records of every other GPU."""
        return k.member(host, gpu_index) in self._gpus

    @property
    def tracking(self) -> int:
        """How many GPUs the policy holds state for."""
        return len(self._gpus)

    def active_drains(self, now: float) -> list[str]:
        """Hosts that count against `max_concurrent_drains` at wall time `now`."""
        for host in list(self._drains):
            held = {m: t for m, t in self._drains[host].items() if now - t < self.rules.drain_hold_s}
            if held:
                self._drains[host] = held
            else:
                del self._drains[host]
        return sorted(self._drains)

    def observe(self, records: Sequence[Mapping[str, Any]], now: float) -> list[dict[str, Any]]:
        """Feeds decoded risk records (any GPUs, any order); returns the remediation events now due.

        `now` is the wall clock (unix seconds). The kill switch is read once per call.
        """
        kill = bool(self._killswitch())
        events: list[dict[str, Any]] = []
        audits: list[dict[str, Any]] = []
        for rec in records:
            self._observe_one(rec, now, kill, events, audits)
        if audits:
            self._audit(audits)
        return events

    def _observe_one(
        self,
        rec: Mapping[str, Any],
        now: float,
        kill: bool,
        events: list[dict[str, Any]],
        audits: list[dict[str, Any]],
    ) -> None:
        r = self.rules
        m = k.member(rec["host"], rec["gpu_index"])
        # A ts ahead of our clock (a node clock running fast) counts as now, as in Redis: kept, it would make the
        # GPU's next records look out of order until the clock caught up with it.
        ts = min(float(rec["ts"]), now)
        alarm, failed = bool(rec.get("alarm")), bool(rec.get("failed"))
        gpu = self._gpus.get(m)
        if gpu is not None and ts <= gpu.last_ts:
            return  # duplicate or out of order: the newer record already decided
        if now - ts > r.stale_after_s:
            if m not in self._stale_audited and (alarm or failed or (gpu and gpu.episode)):
                self._stale_audited.add(m)
                detail = f"record is {now - ts:.0f} s old (limit {r.stale_after_s:g} s)"
                audits.append(self._entry(rec, now, None, "suppressed", "stale", detail, gpu))
            return
        self._stale_audited.discard(m)
        if gpu is None:
            if not (alarm or failed):
                return
            gpu = self._gpus[m] = _Gpu(last_ts=ts)
        gpu.last_ts = ts
        if failed:
            self._failed(m, gpu, rec, now, kill, events, audits)
            return
        ep = gpu.episode
        if ep is not None and rec.get("uuid", "") != ep.uuid:
            self._end_episode(m, rec, now, "replaced", audits)
            ep = None
        if ep is not None and not alarm and ts - ep.last_alarm_ts >= r.episode_gap_s:
            self._end_episode(m, rec, now, "recovered", audits)
            ep = None
        if ep is None:
            if not alarm:
                if gpu.last_action_ts is None or ts - gpu.last_action_ts >= r.cooldown_s:
                    del self._gpus[m]  # nothing left to remember about this GPU
                return
            ep = gpu.episode = _Episode(start_ts=ts, uuid=str(rec.get("uuid", "")), last_alarm_ts=ts)
        if alarm:
            ep.last_alarm_ts = ts
        due = self._due(ep, rec, ts)
        if due is None:
            return
        action, detail = due
        blocked = self._guard(action, rec, gpu, ep, now, kill)
        if blocked is not None:
            if (action, blocked[0]) not in ep.audited:
                ep.audited.add((action, blocked[0]))
                audits.append(self._entry(rec, now, action, "suppressed", blocked[0], blocked[1], gpu))
            return
        self._emit(m, gpu, rec, now, action, detail, ep.start_ts, events, audits)
        ep.action_ts[action] = ts

    def _failed(
        self, m: str, gpu: _Gpu, rec: Mapping[str, Any], now: float, kill: bool,
        events: list[dict[str, Any]], audits: list[dict[str, Any]],
    ) -> None:  # fmt: skip
        """A failed GPU leaves the ladder: its episode ends, and one repair is asked for per failure."""
        if gpu.episode is not None:
            self._end_episode(m, rec, now, "failed", audits)
        since = float(rec.get("failed_since") or rec["ts"])
        if gpu.repaired_failure == since:
            return
        if kill:
            if gpu.suppressed_failure != since:  # audit the suppression once per failure
                gpu.suppressed_failure = since
                detail = f"kill switch {k.KILLSWITCH} is on"
                audits.append(self._entry(rec, now, "repair", "suppressed", "killswitch", detail, gpu))
            return
        gpu.repaired_failure = since
        detail = f"GPU failed at ts {since:.0f} ({rec.get('mode', 'none')}): drain and repair"
        self._emit(m, gpu, rec, now, "repair", detail, since, events, audits)

    def _emit(
        self, m: str, gpu: _Gpu, rec: Mapping[str, Any], now: float, action: str, detail: str, episode_ts: float,
        events: list[dict[str, Any]], audits: list[dict[str, Any]],
    ) -> None:  # fmt: skip
        ts = float(rec["ts"])
        uuid = str(rec.get("uuid", ""))
        event = {
            "schema": REMEDIATION_SCHEMA,
            "id": remediation_id(rec["host"], int(rec["gpu_index"]), uuid, action, episode_ts),
            "host": rec["host"],
            "gpu_index": int(rec["gpu_index"]),
            "uuid": uuid,
            "action": action,
            "reason": detail,
            "risk": float(rec["risk"]),
            "ts": ts,
        }
        gpu.last_action_ts = ts
        if action in ("migrate", "reboot"):
            self._drains.setdefault(rec["host"], {}).setdefault(m, now)
        events.append(event)
        audits.append(self._entry(rec, now, action, "acted", "due", detail, gpu, event["id"], episode_ts))

    def _due(self, ep: _Episode, rec: Mapping[str, Any], ts: float) -> tuple[str, str] | None:
        """The next action of the episode if its condition holds now, with a reason for humans."""
        r = self.rules
        alarm, drain = bool(rec.get("alarm")), bool(rec.get("drain"))
        mode = str(rec.get("mode", "none"))
        what = f"risk {float(rec['risk']):.3g}, mode {mode}, operating point {rec.get('op', '?')}"
        done = ep.action_ts
        if "checkpoint" not in done:
            return ("checkpoint", f"alarm: {what}") if alarm or drain else None
        if not drain:
            return None
        if "migrate" not in done:
            since = ts - done["checkpoint"]
            if since >= r.checkpoint_grace_s:
                return "migrate", f"drain operating point: {what}, {since:.0f} s after checkpoint"
            return None
        if "reboot" not in done:
            since = ts - done["migrate"]
            if since >= r.reboot_after_s:
                return "reboot", f"drain operating point still holds {since:.0f} s after migrate: {what}"
        return None

    def _guard(
        self, action: str, rec: Mapping[str, Any], gpu: _Gpu, ep: _Episode, now: float, kill: bool
    ) -> tuple[str, str] | None:
        """(reason, detail) if a guard rail forbids `action` now, else None."""
        r = self.rules
        if kill:
            return "killswitch", f"kill switch {k.KILLSWITCH} is on"
        first = not ep.action_ts
        if first and gpu.last_action_ts is not None and float(rec["ts"]) - gpu.last_action_ts < r.cooldown_s:
            ago = float(rec["ts"]) - gpu.last_action_ts
            return "cooldown", f"last action on this GPU {ago:.0f} s ago (cooldown {r.cooldown_s:g} s)"
        if action == "reboot" and str(rec.get("mode", "none")) not in r.reboot_modes:
            return "reboot_not_useful", f"a reboot does not fix mode {rec.get('mode')}"
        if action in ("migrate", "reboot"):
            draining = self.active_drains(now)
            if rec["host"] not in draining and len(draining) >= r.max_concurrent_drains:
                busy = ", ".join(draining)
                return (
                    "blast_radius",
                    f"{len(draining)} hosts already draining ({busy}); limit {r.max_concurrent_drains}",
                )
        return None

    def _end_episode(
        self, m: str, rec: Mapping[str, Any], now: float, why: str, audits: list[dict[str, Any]]
    ) -> None:
        gpu = self._gpus[m]
        ep = gpu.episode
        gpu.episode = None
        host = str(rec["host"])
        if host in self._drains:
            self._drains[host].pop(m, None)
            if not self._drains[host]:
                del self._drains[host]
        if ep is not None and (ep.action_ts or ep.audited):
            detail = f"episode from ts {ep.start_ts:.0f} ended ({why}); actions: {', '.join(ep.action_ts) or 'none'}"
            audits.append(self._entry(rec, now, None, "cleared", why, detail, gpu, episode_ts=ep.start_ts))

    def _entry(
        self,
        rec: Mapping[str, Any],
        now: float,
        action: str | None,
        decision: str,
        reason: str,
        detail: str,
        gpu: _Gpu | None,
        event_id: str | None = None,
        episode_ts: float | None = None,
    ) -> dict[str, Any]:
        if episode_ts is None and gpu is not None and gpu.episode is not None:
            episode_ts = gpu.episode.start_ts
        return {
            "decision": decision,  # acted, suppressed or cleared
            "action": action,
            "reason": reason,
            "detail": detail,
            "id": event_id,
            "host": rec["host"],
            "gpu_index": int(rec["gpu_index"]),
            "uuid": rec.get("uuid", ""),
            "risk": float(rec["risk"]),
            "mode": rec.get("mode", "none"),
            "ts": float(rec["ts"]),
            "episode_ts": episode_ts,
            "now": now,
        }


class RedisKillSwitch:
    """Kill switch read from the Redis key `gpuwatch:killswitch` (on while the key exists).

    Fails closed: while Redis cannot be read it reports "on", so the policy never acts blind.
    """

    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client
        self._failing = False

    def __call__(self) -> bool:
        try:
            on = bool(self._redis.exists(k.KILLSWITCH))
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("cannot read the kill switch (%s); taking no action until Redis answers", exc)
            self._failing = True
            return True
        self._failing = False
        return on


def set_killswitch(redis_client: redis.Redis, on: bool, note: str = "") -> None:
    """Turns the global kill switch on (stores `note`: who and why) or off."""
    if on:
        redis_client.set(k.KILLSWITCH, note or "on")
    else:
        redis_client.delete(k.KILLSWITCH)


class RedisAuditLog:
    """Appends audit entries to the Redis stream `gpuwatch:audit` (field ``json``), capped near `maxlen`.

    Acted decisions are also logged at INFO. If Redis is down, entries are logged and dropped.
    """

    def __init__(self, redis_client: redis.Redis, *, maxlen: int = 100_000) -> None:
        self._redis = redis_client
        self._maxlen = maxlen

    def __call__(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            if e["decision"] == "acted":
                log.info("remediation %s %s GPU %s: %s", e["action"], e["host"], e["gpu_index"], e["detail"])
        pipe = self._redis.pipeline(transaction=False)
        for e in entries:
            pipe.xadd(k.AUDIT, {"json": orjson.dumps(e)}, maxlen=self._maxlen, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("audit log: %d entries not written to Redis (%s): %s", len(entries), exc, entries)


def read_audit(redis_client: redis.Redis, count: int = 100) -> list[dict[str, Any]]:
    """The newest `count` audit entries from Redis, newest first."""
    out: list[dict[str, Any]] = []
    for _, fields in redis_client.xrevrange(k.AUDIT, count=count) or []:
        raw = (fields or {}).get(b"json") or (fields or {}).get("json")
        if raw:
            out.append(orjson.loads(raw))
    return out
