"""Turns sustained GPU risk into remediation events (checkpoint -> migrate -> reboot), with guard rails.

`RemediationPolicy` is a plain in-memory state machine: feed it decoded risk records with `observe` and
it returns `gpuwatch.remediation/1` events. Side effects are injected: `killswitch()` (is the global kill
switch on?) and `audit(entries)` (where decisions go); `RedisKillSwitch` and `RedisAuditLog` below are
the Redis-backed ones the remediation sink uses. docs/redis.md describes the rules for operators.

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
    """The knobs of the policy; times in seconds of record time, risks in 0..1."""

    threshold: float = 0.85  # an episode opens when risk >= threshold
    for_s: float = 300.0  # ... and checkpoint is due once it has lasted this long with risk >= threshold
    clear_below: float = 0.7  # the episode ends (hysteresis) only when risk < clear_below
    migrate_after_s: float = 300.0  # migrate when risk is still >= threshold this long after checkpoint
    checkpoint_grace_s: float = 60.0  # earliest migrate after checkpoint, so jobs can save their state
    migrate_risk: float = 0.95  # ... and from then on migrate at once when risk >= this
    fast_modes: tuple[str, ...] = ("memory", "interconnect")  # modes that migrate at once ...
    fast_mode_risk: float = 0.9  # ... when risk >= this (after the grace)
    reboot_after_s: float = 600.0  # reboot when risk is still >= threshold this long after migrate
    reboot_modes: tuple[str, ...] = ("memory", "interconnect", "sudden")  # a reboot cannot fix a fan or PSU
    cooldown_s: float = 3600.0  # a GPU acted on cannot start a new episode's actions for this long
    max_concurrent_drains: int = 2  # hosts draining (migrate) or rebooting at once, fleet-wide
    drain_hold_s: float = 3600.0  # a drain stops counting when its episode clears or after this long
    stale_after_s: float = 60.0  # records older than this (vs `now`) are never acted on
    # Cost weighing (see `weigh`): act only when risk x job GPUs x hours a failure would cost x price >= action cost
    cost_per_gpu_hour: float = 2.5  # price of a GPU-hour; the action costs are in the same currency
    job_gpus: int = 8  # GPUs of the job a failing GPU takes down
    job_checkpoint_interval_s: float = 3600.0  # jobs checkpoint this often on their own
    failure_overhead_s: float = 1800.0  # an unplanned failure also costs this (detect, requeue, reload)
    cost_checkpoint: float = 1.0  # jobs pause to write a checkpoint
    cost_migrate: float = 5.0  # a planned restart elsewhere and a drained host

    def __post_init__(self) -> None:
        if not 0 <= self.clear_below <= self.threshold <= 1:
            raise ValueError("policy rules need 0 <= clear_below <= threshold <= 1")
        if self.max_concurrent_drains < 0:
            raise ValueError("max_concurrent_drains must be >= 0")
        costs = (
            self.cost_per_gpu_hour,
            self.job_gpus,
            self.job_checkpoint_interval_s,
            self.failure_overhead_s,
            self.cost_checkpoint,
            self.cost_migrate,
        )
        if min(costs) < 0:
            raise ValueError("policy costs, job size and times must be >= 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicyRules:
        """Rules from the `risk_*`, `policy_*` and `stale_after_s` settings (the rest keep their defaults)."""
        return cls(
            threshold=settings.risk_threshold,
            for_s=settings.risk_for_s,
            clear_below=settings.risk_clear_below,
            migrate_after_s=settings.policy_migrate_after_s,
            checkpoint_grace_s=settings.policy_checkpoint_grace_s,
            migrate_risk=settings.policy_migrate_risk,
            reboot_after_s=settings.policy_reboot_after_s,
            cooldown_s=settings.policy_cooldown_s,
            max_concurrent_drains=settings.policy_max_concurrent_drains,
            drain_hold_s=settings.policy_drain_hold_s,
            stale_after_s=settings.stale_after_s,
            cost_per_gpu_hour=settings.policy_cost_per_gpu_hour,
            job_gpus=settings.policy_job_gpus,
            job_checkpoint_interval_s=settings.policy_job_checkpoint_interval_s,
            failure_overhead_s=settings.policy_failure_overhead_s,
            cost_checkpoint=settings.policy_cost_checkpoint,
            cost_migrate=settings.policy_cost_migrate,
        )


def weigh(
    rules: PolicyRules, action: str, risk: float, since_checkpoint_s: float | None
) -> tuple[float, float] | None:
    """(expected loss, cost) of `action`, or None for actions that are not weighed (reboot).

    expected loss = risk x job_gpus x hours a failure would cost the job x cost_per_gpu_hour, where the
    hours are the work since its last checkpoint: for checkpoint, half the job's own checkpoint interval
    (on average); for migrate, the time since gpuwatch's checkpoint (at most one interval) plus
    `failure_overhead_s`, which a planned migration avoids. A reboot follows a drain: no job is at stake.
    """
    if action == "checkpoint":
        lost_s, cost = rules.job_checkpoint_interval_s / 2, rules.cost_checkpoint
    elif action == "migrate":
        since = rules.job_checkpoint_interval_s / 2 if since_checkpoint_s is None else since_checkpoint_s
        lost_s = min(max(since, 0.0), rules.job_checkpoint_interval_s) + rules.failure_overhead_s
        cost = rules.cost_migrate
    else:
        return None
    return risk * rules.job_gpus * lost_s / 3600 * rules.cost_per_gpu_hour, cost


@dataclass
class _Episode:
    start_ts: float
    uuid: str
    action_ts: dict[str, float] = field(default_factory=dict)  # action -> record ts it was emitted at
    audited: set[tuple[str, str]] = field(default_factory=set)  # (action, reason) suppressions logged


@dataclass
class _Gpu:
    last_ts: float
    last_action_ts: float | None = None
    episode: _Episode | None = None


class RemediationPolicy:
    """Decides remediation per GPU episode; `observe` returns the events to publish.

    An episode of a GPU opens at the first record with risk >= threshold and ends when risk drops below
    `clear_below` (or the GPU's uuid changes: the card was replaced). Within an episode, at most one event
    per action, in order: checkpoint (risk >= threshold for `for_s`), migrate (still high
    `migrate_after_s` later, or very high / a fast mode after `checkpoint_grace_s`), reboot (still high
    `reboot_after_s` after migrate, modes in `reboot_modes` only). Guard rails, checked in this order:
    kill switch, per-GPU cooldown (first action of an episode), cost (`weigh`: checkpoint and migrate
    only when the expected loss of a failure exceeds the action's cost), blast radius
    (`max_concurrent_drains` hosts draining or rebooting). Stale, duplicate and out-of-order records are ignored.
    Every decision (acted, suppressed, cleared) is passed to `audit`, suppressions once per episode.
    """

    def __init__(
        self,
        rules: PolicyRules | None = None,
        *,
        killswitch: Callable[[], bool] | None = None,
        audit: AuditSink | None = None,
        **overrides: Any,
    ) -> None:
        """`overrides` replace single rules: ``RemediationPolicy(for_s=60, max_concurrent_drains=1)``."""
        self.rules = dataclasses.replace(rules or PolicyRules(), **overrides)
        self._killswitch = killswitch or (lambda: False)
        self._audit = audit or (lambda entries: None)
        self._gpus: dict[str, _Gpu] = {}
        self._drains: dict[str, dict[str, float]] = {}  # host -> {member: wall time the drain began}
        self._stale_audited: set[str] = set()

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
        ts, risk = float(rec["ts"]), float(rec["risk"])
        gpu = self._gpus.get(m)
        if gpu is not None and ts <= gpu.last_ts:
            return  # duplicate or out of order: the newer record already decided
        if now - ts > r.stale_after_s:
            if m not in self._stale_audited and (risk >= r.threshold or (gpu and gpu.episode)):
                self._stale_audited.add(m)
                detail = f"record is {now - ts:.0f} s old (limit {r.stale_after_s:g} s)"
                audits.append(self._entry(rec, now, None, "suppressed", "stale", detail, gpu))
            return
        self._stale_audited.discard(m)
        if gpu is None:
            if risk < r.threshold:
                return
            gpu = self._gpus[m] = _Gpu(last_ts=ts)
        gpu.last_ts = ts
        ep = gpu.episode
        if ep is not None and (risk < r.clear_below or rec.get("uuid", "") != ep.uuid):
            why = "recovered" if risk < r.clear_below else "replaced"
            self._end_episode(m, rec, now, why, audits)
            ep = None
        if ep is None:
            if risk < r.threshold:
                if gpu.last_action_ts is None or ts - gpu.last_action_ts >= r.cooldown_s:
                    del self._gpus[m]  # nothing left to remember about this GPU
                return
            ep = gpu.episode = _Episode(start_ts=ts, uuid=str(rec.get("uuid", "")))
        due = self._due(ep, ts, risk, str(rec.get("mode", "none")))
        if due is None:
            return
        action, detail = due
        weighed = weigh(
            r, action, risk, ts - ep.action_ts["checkpoint"] if "checkpoint" in ep.action_ts else None
        )
        if weighed is not None:
            detail += f", expected loss {weighed[0]:.2f} vs cost {weighed[1]:g}"
        blocked = self._guard(action, rec, gpu, ep, now, kill, weighed)
        if blocked is not None:
            if (action, blocked[0]) not in ep.audited:
                ep.audited.add((action, blocked[0]))
                audits.append(self._entry(rec, now, action, "suppressed", blocked[0], blocked[1], gpu))
            return
        event = {
            "schema": REMEDIATION_SCHEMA,
            "id": remediation_id(rec["host"], int(rec["gpu_index"]), ep.uuid, action, ep.start_ts),
            "host": rec["host"],
            "gpu_index": int(rec["gpu_index"]),
            "uuid": ep.uuid,
            "action": action,
            "reason": detail,
            "risk": risk,
            "ts": ts,
        }
        ep.action_ts[action] = ts
        gpu.last_action_ts = ts
        if action in ("migrate", "reboot"):
            self._drains.setdefault(rec["host"], {}).setdefault(m, now)
        events.append(event)
        audits.append(self._entry(rec, now, action, "acted", "due", detail, gpu, event["id"]))

    def _due(self, ep: _Episode, ts: float, risk: float, mode: str) -> tuple[str, str] | None:
        """The next action of the episode if its condition holds now, with a reason for humans."""
        r = self.rules
        if risk < r.threshold:
            return None
        what = f"risk {risk:.2f} >= {r.threshold:g}, mode {mode}"
        done = ep.action_ts
        if "checkpoint" not in done:
            lasted = ts - ep.start_ts
            return ("checkpoint", f"{what}, high for {lasted:.0f} s") if lasted >= r.for_s else None
        if "migrate" not in done:
            since = ts - done["checkpoint"]
            if since >= r.migrate_after_s:
                return "migrate", f"{what}, still high {since:.0f} s after checkpoint"
            urgent = risk >= r.migrate_risk or (mode in r.fast_modes and risk >= r.fast_mode_risk)
            if urgent and since >= r.checkpoint_grace_s:
                return "migrate", f"{what}, too high to wait ({since:.0f} s after checkpoint)"
            return None
        if "reboot" not in done:
            since = ts - done["migrate"]
            if since >= r.reboot_after_s:
                return "reboot", f"{what}, still high {since:.0f} s after migrate"
        return None

    def _guard(
        self,
        action: str,
        rec: Mapping[str, Any],
        gpu: _Gpu,
        ep: _Episode,
        now: float,
        kill: bool,
        weighed: tuple[float, float] | None = None,
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
        if weighed is not None and weighed[0] < weighed[1]:
            return (
                "not_worth_it",
                f"expected loss {weighed[0]:.2f} (risk {float(rec['risk']):.2f} x {r.job_gpus} GPUs at "
                f"{r.cost_per_gpu_hour:g}/GPU-h) < {action} cost {weighed[1]:g}",
            )
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
