"""Turns the stream's alarms into remediation events ([throttle ->] checkpoint -> migrate -> reboot), with guard rails.

`RemediationPolicy` is a plain in-memory state machine: feed it decoded risk records with `observe` and
it returns `gpuwatch.remediation/1` events. It holds no thresholds: each risk record says whether its GPU
is in alarm (`alarm`, the model's alarm operating point), whether the drain operating point holds
(`drain`) and whether the GPU has already failed (`failed`), all decided by the stream from the model
artifact (docs/model.md), so the product acts on exactly what was evaluated. Side effects are injected:
`killswitch()` (is the global kill switch on?) and `audit(entries)` (where decisions go); `RedisKillSwitch`
and `RedisAuditLog` below are the Redis-backed ones the remediation sink uses. docs/redis.md describes the
rules for operators.

Fleet-level guard rails (circuit breaker, escalation to a human, incident, per-pool limits, maintenance windows)
keep their shared state in a `GuardState` (`sinks/guard_state.py`): Redis in the sink, so every replica and a
restarted sink see the same breaker; memory elsewhere. docs/remediation.md describes them for operators.

Time: escalation timers run on record time (`ts`), so replaying the same records yields the same events
with the same ids; `now` (wall clock) is used to reject stale records, to expire drain holds, and for the
fleet-level guard rails' windows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis

from gpuwatch.config import THROTTLE_KINDS, Settings
from gpuwatch.costs import CostModel
from gpuwatch.metrics import POLICY_GUARDS
from gpuwatch.pools import MaintenanceWindow, Pools, active_window, parse_maintenance_windows

from ..schemas import redis_keys as k
from ..schemas.codecs import DecodeError, decode_audit, encode_audit, remediation_id
from ..schemas.fields import Action
from ..schemas.records import AuditDecision, AuditEntry, Remediation, Risk
from .guard_state import ADMITTED, OPEN, TRIPPED, GuardState, GuardView, MemoryGuardState

log = logging.getLogger(__name__)

AuditSink = Callable[[list[AuditEntry]], None]
TripSink = Callable[[str], None]

# Actions that take a node out of service; a checkpoint only asks a job to save its state.
DISRUPTIVE = ("migrate", "reboot", "repair")
GUARDS = POLICY_GUARDS  # guard rails whose trips are counted and alert (deploy/prometheus/alerts.yml)
FLEET_KEEP_S = 86400.0  # the fleet: hosts the policy saw a risk record of within a day
HOST_SEEN_EVERY_S = 60.0  # how often a host's "seen" time is written to the guard state


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
    # Fleet-level guard rails, off unless set (settings turn them on: `from_settings`); windows on the wall clock.
    breaker_share: float = 0.0  # share of the fleet's hosts disruptive actions may reach in the window; 0 off
    breaker_window_s: float = 3600.0
    breaker_min_hosts: int = 3  # hosts that may always be acted on within the window, however small the fleet
    escalate_after: int = 0  # a host remediated this often within escalate_window_s goes to a human; 0 off
    escalate_window_s: float = 604800.0
    max_unhealthy_hosts: int = 0  # above this many unhealthy hosts the policy stops acting; 0 off
    pool_pattern: str = ""  # host name -> pool (gpuwatch.pools)
    pool_max_drains: int = 0  # hosts of one pool draining or rebooting at once; 0: no per-pool limit
    maintenance: tuple[MaintenanceWindow, ...] = ()  # disruptive actions held on a pool's hosts meanwhile
    # Throttle first (thermal and power modes): lower the power limit to throttle_frac of the default (kind
    # "power") or lock the SM clock at most throttle_clock_frac of the maximum (kind "clocks") for throttle_s;
    # checkpoint when the alarm still holds throttle_grace_s later. 0 s: never throttle.
    throttle_s: float = 0.0
    throttle_frac: float = 0.7
    throttle_kind: str = "power"
    throttle_clock_frac: float = 0.7
    throttle_grace_s: float = 300.0
    throttle_modes: tuple[str, ...] = ("thermal", "power")  # what a lower power limit can relieve

    def __post_init__(self) -> None:
        limits = (
            self.max_concurrent_drains,
            self.escalate_after,
            self.max_unhealthy_hosts,
            self.pool_max_drains,
        )
        if min(limits) < 0:
            raise ValueError("policy limits must be >= 0")
        if min(self.episode_gap_s, self.checkpoint_grace_s, self.reboot_after_s, self.cooldown_s,
               self.throttle_s, self.throttle_grace_s) < 0:  # fmt: skip
            raise ValueError("policy times must be >= 0")
        if not (0.0 < self.throttle_frac <= 1.0 and 0.0 < self.throttle_clock_frac <= 1.0):
            raise ValueError("throttle_frac and throttle_clock_frac must be in (0, 1]")
        if self.throttle_kind not in THROTTLE_KINDS:
            raise ValueError(f"throttle_kind must be one of {', '.join(THROTTLE_KINDS)}")
        if not 0.0 <= self.breaker_share <= 1.0 or self.breaker_min_hosts < 1:
            raise ValueError("breaker_share must be in [0, 1] and breaker_min_hosts >= 1")
        if min(self.breaker_window_s, self.escalate_window_s) <= 0:
            raise ValueError("guard rail windows must be > 0")
        Pools(self.pool_pattern)  # ValueError if it is no pattern

    @classmethod
    def from_settings(cls, settings: Settings, *, fleet_guards: bool = True) -> PolicyRules:
        """Rules from the `policy_*` and `stale_after_s` settings (the rest keep their defaults).

        `fleet_guards=False` leaves the fleet-level guard rails (breaker, escalation, incident, pools, maintenance)
        off, as the offline replays of simulated fleets do: those fleets fail about a thousand times as often as
        a real one by construction, so the guard rails would trip on that, and the replay measures the model.
        Throttling (`policy_throttle_s`) is left off, with a warning, when the cost model does not favour it
        (`CostModel.throttle_favoured`).
        """
        costs = CostModel.from_settings(settings)
        throttle_s = settings.policy_throttle_s
        if throttle_s > 0 and not costs.throttle_favoured():
            log.warning("policy_throttle_s is %g s, but a throttle that long costs %.0f GPU-hours, no less than the "
                        "drain it may spare (%.0f): the policy does not throttle", throttle_s,
                        costs.throttle_cost(throttle_s), costs.action_cost("migrate", real=True))  # fmt: skip
            throttle_s = 0.0
        rules = cls(
            episode_gap_s=settings.policy_episode_gap_s,
            checkpoint_grace_s=settings.policy_checkpoint_grace_s,
            reboot_after_s=settings.policy_reboot_after_s,
            cooldown_s=settings.policy_cooldown_s,
            max_concurrent_drains=settings.policy_max_concurrent_drains,
            drain_hold_s=settings.policy_drain_hold_s,
            stale_after_s=settings.stale_after_s,
            throttle_s=throttle_s,
            throttle_frac=settings.policy_throttle_frac,
            throttle_kind=settings.policy_throttle_kind,
            throttle_clock_frac=settings.policy_throttle_clock_frac,
            throttle_grace_s=settings.policy_throttle_grace_s,
        )
        if not fleet_guards:
            return rules
        return dataclasses.replace(
            rules,
            breaker_share=settings.policy_breaker_share,
            breaker_window_s=settings.policy_breaker_window_s,
            breaker_min_hosts=settings.policy_breaker_min_hosts,
            escalate_after=settings.policy_escalate_after,
            escalate_window_s=settings.policy_escalate_window_s,
            max_unhealthy_hosts=settings.policy_max_unhealthy_hosts,
            pool_pattern=settings.policy_pool_pattern,
            pool_max_drains=settings.policy_pool_max_drains,
            maintenance=parse_maintenance_windows(settings.policy_maintenance_windows),
        )

    def breaker_limit(self, fleet_hosts: int) -> int:
        """Hosts that disruptive actions may reach within the breaker's window, in a fleet of `fleet_hosts`."""
        return max(self.breaker_min_hosts, math.floor(self.breaker_share * fleet_hosts + 1e-9))


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
    repair_audited: set[tuple[float, str]] = field(default_factory=set)  # (failed_since, reason) audited
    restored_ts: float | None = None  # record ts a throttle of this GPU was undone because its risk fell


class RemediationPolicy:
    """Decides remediation per GPU episode; `observe` returns the events to publish.

    An episode of a GPU opens at its first record in alarm and ends after `episode_gap_s` without one (or
    when the GPU's uuid changes: the card was replaced, or when it fails). Within an episode, at most one
    event per action, in order: checkpoint (the record is in alarm), migrate (the drain operating point
    holds, at least `checkpoint_grace_s` after the checkpoint), reboot (the drain operating point still
    holds `reboot_after_s` after migrate, modes in `reboot_modes` only). With `throttle_s` > 0, an episode whose
    first alarm record names a mode in `throttle_modes` (thermal, power: the model's mode head) starts with a
    `throttle` instead (power limit to `throttle_frac` of the default, or with `throttle_kind` "clocks" the SM
    clock locked at most `throttle_clock_frac` of the maximum, for `throttle_s`); the ladder follows when
    the alarm still holds `throttle_grace_s` later. When such an episode ends because the risk fell (no
    migration), a `restore` event puts the limit back; it starts no cooldown and passes no guard rail (it only
    undoes gpuwatch's own throttle, which the agent undoes at `throttle_s` anyway). A GPU in alarm again within
    `cooldown_s` of its restore relapsed: no second throttle, and the ladder starts at once, cooldown or not.
    A failed GPU (`failed: true`) is no
    longer predicted: its episode ends and it gets one `repair` event per failure (drain it and ask for a
    repair) instead of the ladder. Guard rails, checked in this order: kill switch; incident (more than
    `max_unhealthy_hosts` unhealthy hosts: no action at all); for disruptive actions (`DISRUPTIVE`) the
    circuit breaker, maintenance windows and escalated hosts; per-GPU cooldown (first action of an episode);
    blast radius (`max_concurrent_drains` hosts draining or rebooting, and `pool_max_drains` per pool; repairs
    are not limited: the GPU is down already); last, escalation (a host remediated `escalate_after` times
    within `escalate_window_s` goes to a human instead) and the breaker's admission (disruptive actions may
    reach `breaker_limit` hosts within `breaker_window_s`; the one beyond opens the breaker). Stale, duplicate
    and out-of-order records are ignored. Every decision (acted, suppressed, cleared, tripped) is passed to
    `audit`, suppressions once per episode; each trip of a guard in `GUARDS` also to `on_trip(guard)`.
    """

    def __init__(
        self,
        rules: PolicyRules | None = None,
        *,
        killswitch: Callable[[], bool] | None = None,
        audit: AuditSink | None = None,
        guards: GuardState | None = None,
        on_trip: TripSink | None = None,
        **overrides: Any,
    ) -> None:
        """`overrides` replace single rules: ``RemediationPolicy(episode_gap_s=60, max_concurrent_drains=1)``.

        `guards` holds the fleet-level guard rails' state (default: in memory, this policy's alone)."""
        self.rules = dataclasses.replace(rules or PolicyRules(), **overrides)
        self._killswitch = killswitch or (lambda: False)
        self._audit = audit or (lambda entries: None)
        self._guards: GuardState = guards if guards is not None else MemoryGuardState()
        self._on_trip = on_trip or (lambda guard: None)
        self._gpus: dict[str, _Gpu] = {}
        self._drains: dict[str, dict[str, float]] = {}  # host -> {member: wall time the drain began}
        self._stale_audited: set[str] = set()
        r = self.rules
        self._pools = Pools(r.pool_pattern)
        self._fleet_guards = r.breaker_share > 0 or r.escalate_after > 0 or r.max_unhealthy_hosts > 0
        self._view = GuardView()  # the guard state as read at the start of the current batch
        self._host_seen: dict[str, float] = {}  # host -> wall time it was last written to the guard state
        self._bad: dict[str, set[int]] = {}  # host -> its GPUs in alarm or freshly failed (incident)
        self.trips: Counter[str] = Counter()  # guard -> trips by this policy

    @property
    def guard_view(self) -> GuardView:
        """The fleet-level guard rails' state after the last `observe` (breaker, escalations, incident, counts)."""
        return self._view

    def pool_of(self, host: str) -> str:
        """The pool of `host` (`pool_pattern`)."""
        return self._pools.of(host)

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

    def observe(self, records: Sequence[Risk], now: float) -> list[Remediation]:
        """Feeds decoded risk records (any GPUs, any order); returns the remediation events now due.

        `now` is the wall clock (unix seconds). The kill switch and the guard rails' state are read once per call.
        """
        kill = bool(self._killswitch())
        events: list[Remediation] = []
        audits: list[AuditEntry] = []
        if self._fleet_guards:
            self._sync_guards(records, now, audits)
        for rec in records:
            self._observe_one(rec, now, kill, events, audits)
        if audits:
            self._audit(audits)
        return events

    def _observe_one(
        self,
        rec: Risk,
        now: float,
        kill: bool,
        events: list[Remediation],
        audits: list[AuditEntry],
    ) -> None:
        r = self.rules
        m = k.member(rec.host, rec.gpu_index)
        # A ts ahead of our clock (a node clock running fast) counts as now, as in Redis: kept, it would make the
        # GPU's next records look out of order until the clock caught up with it.
        ts = min(rec.ts, now)
        alarm, failed = rec.alarm, rec.failed
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
        if ep is not None and rec.uuid != ep.uuid:
            self._end_episode(m, rec, now, "replaced", audits)
            ep = None
        if ep is not None and not alarm and ts - ep.last_alarm_ts >= r.episode_gap_s:
            throttled = "throttle" in ep.action_ts and "migrate" not in ep.action_ts
            self._end_episode(m, rec, now, "recovered", audits)
            if throttled:  # risk fell: the agent undoes the throttle (it would at the throttle's end anyway)
                back = "clocks unlocked" if r.throttle_kind == "clocks" else "power limit back"
                detail = f"risk fell ({rec.risk:.3g}, no alarm for {ts - ep.last_alarm_ts:.0f} s): {back}"
                self._emit(m, gpu, rec, now, "restore", detail, ep.start_ts, events, audits, acting=False)
                gpu.restored_ts = ts
            ep = None
        if ep is None:
            if not alarm:
                if gpu.last_action_ts is None or ts - gpu.last_action_ts >= r.cooldown_s:
                    del self._gpus[m]  # nothing left to remember about this GPU
                return
            ep = gpu.episode = _Episode(start_ts=ts, uuid=rec.uuid, last_alarm_ts=ts)
        if alarm:
            ep.last_alarm_ts = ts
        due = self._due(ep, rec, ts, gpu)
        if due is None:
            return
        action, detail = due
        blocked = self._guard(action, rec, gpu, ep, now, kill) or self._admit(action, rec, now, action == "migrate",
                                                                             gpu, audits)  # fmt: skip
        if blocked is not None:
            if (action, blocked[0]) not in ep.audited:
                ep.audited.add((action, blocked[0]))
                audits.append(self._entry(rec, now, action, "suppressed", blocked[0], blocked[1], gpu))
                if blocked[0] == "pool_limit":
                    self._trip("pool_limit")
            return
        self._emit(m, gpu, rec, now, action, detail, ep.start_ts, events, audits)
        self._remediated(action == "migrate", rec, events[-1].id, now)
        ep.action_ts[action] = ts

    def _failed(
        self, m: str, gpu: _Gpu, rec: Risk, now: float, kill: bool,
        events: list[Remediation], audits: list[AuditEntry],
    ) -> None:  # fmt: skip
        """A failed GPU leaves the ladder: its episode ends, and one repair is asked for per failure."""
        migrated = gpu.episode is not None and "migrate" in gpu.episode.action_ts  # the host drained already
        if gpu.episode is not None:
            self._end_episode(m, rec, now, "failed", audits)
        since = rec.failed_since if isinstance(rec.failed_since, float) else rec.ts
        if gpu.repaired_failure == since:
            return
        blocked = self._fleet_guard("repair", rec.host, now, kill) or self._admit(
            "repair", rec, now, not migrated, gpu, audits
        )
        if blocked is not None:
            if (since, blocked[0]) not in gpu.repair_audited:  # audit each reason once per failure
                gpu.repair_audited.add((since, blocked[0]))
                audits.append(self._entry(rec, now, "repair", "suppressed", blocked[0], blocked[1], gpu))
            return
        gpu.repaired_failure = since
        detail = f"GPU failed at ts {since:.0f} ({rec.mode}): drain and repair"
        self._emit(m, gpu, rec, now, "repair", detail, since, events, audits)
        self._remediated(not migrated, rec, events[-1].id, now)

    def _emit(
        self, m: str, gpu: _Gpu, rec: Risk, now: float, action: Action, detail: str, episode_ts: float,
        events: list[Remediation], audits: list[AuditEntry], *, acting: bool = True,
    ) -> None:  # fmt: skip
        """Appends the event and its audit entry; `acting=False` (a restore, which only undoes gpuwatch's own
        throttle) starts no cooldown."""
        params: dict[str, Any] = {}
        if action == "throttle":
            r = self.rules
            if r.throttle_kind == "clocks":
                params = {"sm_clock_frac": r.throttle_clock_frac, "duration_s": r.throttle_s}
            else:
                params = {"power_limit_frac": r.throttle_frac, "duration_s": r.throttle_s}
        event = Remediation(id=remediation_id(rec.host, rec.gpu_index, rec.uuid, action, episode_ts), host=rec.host,
                            gpu_index=rec.gpu_index, uuid=rec.uuid, action=action, reason=detail, risk=rec.risk,
                            ts=rec.ts, **params)  # fmt: skip
        if acting:
            gpu.last_action_ts = rec.ts
        if action in ("migrate", "reboot"):
            self._drains.setdefault(rec.host, {}).setdefault(m, now)
        events.append(event)
        audits.append(self._entry(rec, now, action, "acted", "due", detail, gpu, event.id, episode_ts))

    def _due(self, ep: _Episode, rec: Risk, ts: float, gpu: _Gpu) -> tuple[Action, str] | None:
        """The next action of the episode if its condition holds now, with a reason for humans."""
        r = self.rules
        alarm, drain = rec.alarm, rec.drain
        mode = rec.mode
        what = f"risk {rec.risk:.3g}, mode {mode}, operating point {rec.op or '?'}{_why(rec)}"
        done = ep.action_ts
        if "checkpoint" not in done:
            if not (alarm or drain):
                return None
            if "throttle" in done:
                since = ts - done["throttle"]
                if since < r.throttle_grace_s:
                    return None
                return "checkpoint", f"alarm still holds {since:.0f} s after throttle: {what}"
            if self._throttles(rec, gpu):
                limit = (f"SM clock locked at most {r.throttle_clock_frac:.0%} of maximum" if r.throttle_kind == "clocks"
                         else f"power limit to {r.throttle_frac:.0%} of default")  # fmt: skip
                return "throttle", f"alarm: {what}: {limit} for {r.throttle_s:g} s"
            return "checkpoint", f"alarm: {what}"
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

    def _throttles(self, rec: Risk, gpu: _Gpu) -> bool:
        """Whether an episode of this GPU starts with a throttle: throttling is on, the mode is one a lower power
        limit relieves, and the GPU is not relapsing after a throttle that was undone within the cooldown."""
        r = self.rules
        return r.throttle_s > 0 and rec.mode in r.throttle_modes and not self._relapsed(rec, gpu)

    def _relapsed(self, rec: Risk, gpu: _Gpu) -> bool:
        """In alarm again within the cooldown after its throttle was undone: the throttle did not hold."""
        return gpu.restored_ts is not None and rec.ts - gpu.restored_ts < self.rules.cooldown_s

    def _guard(
        self, action: str, rec: Risk, gpu: _Gpu, ep: _Episode, now: float, kill: bool
    ) -> tuple[str, str] | None:
        """(reason, detail) if a guard rail forbids `action` now, else None."""
        r = self.rules
        fleet = self._fleet_guard(action, rec.host, now, kill)
        if fleet is not None:
            return fleet
        first = not ep.action_ts
        # A relapse after a throttle goes down the ladder at once: the cooldown would let it fail unwarned.
        if first and not self._relapsed(rec, gpu) and gpu.last_action_ts is not None \
                and rec.ts - gpu.last_action_ts < r.cooldown_s:  # fmt: skip
            ago = rec.ts - gpu.last_action_ts
            return "cooldown", f"last action on this GPU {ago:.0f} s ago (cooldown {r.cooldown_s:g} s)"
        if action == "reboot" and rec.mode not in r.reboot_modes:
            return "reboot_not_useful", f"a reboot does not fix mode {rec.mode}"
        if action in ("migrate", "reboot"):
            draining = self.active_drains(now)
            if rec.host not in draining and len(draining) >= r.max_concurrent_drains:
                busy = ", ".join(draining)
                return (
                    "blast_radius",
                    f"{len(draining)} hosts already draining ({busy}); limit {r.max_concurrent_drains}",
                )
            if r.pool_max_drains:
                pool = self._pools.of(rec.host)
                same = [h for h in draining if self._pools.of(h) == pool]
                if rec.host not in same and len(same) >= r.pool_max_drains:
                    busy = ", ".join(same)
                    return "pool_limit", f"{len(same)} hosts of pool {pool} already draining ({busy}); " \
                                         f"limit {r.pool_max_drains} per pool"  # fmt: skip
        return None

    def _fleet_guard(self, action: str, host: str, now: float, kill: bool) -> tuple[str, str] | None:
        """(reason, detail) if the kill switch or a fleet-level guard rail holds `action` on `host` now."""
        r, v = self.rules, self._view
        if kill:
            return "killswitch", f"kill switch {k.KILLSWITCH} is on"
        if r.max_unhealthy_hosts and v.incident is not None:
            return "incident", (
                f"{v.unhealthy_hosts} hosts unhealthy, more than policy_max_unhealthy_hosts "
                f"({r.max_unhealthy_hosts}): an incident, not a GPU fault; no action until fewer"
            )
        if action not in DISRUPTIVE:
            return None
        if not v.available:
            return "guard_state", "the guard rails' state cannot be read (Redis); no disruptive action blind"
        if r.breaker_share and v.breaker is not None:
            return "breaker", (
                f"circuit breaker open since {float(v.breaker.get('now') or 0):.0f} "
                "(`gpuwatch policy status`); `gpuwatch policy reset-breaker` closes it"
            )
        if r.maintenance:
            pool = self._pools.of(host)
            window = active_window(r.maintenance, pool, now)
            if window is not None:
                return "maintenance", f"maintenance window {window.text!r} holds for pool {pool}"
        if r.escalate_after and host in v.escalated:
            return "escalated", (
                f"host {host} is escalated to a human; `gpuwatch policy clear-escalation {host}` "
                "once it is dealt with"
            )
        return None

    def _admit(
        self, action: str, rec: Risk, now: float, starts_remediation: bool, gpu: _Gpu,
        audits: list[AuditEntry],
    ) -> tuple[str, str] | None:  # fmt: skip
        """The last checks of a disruptive action, which count what they let through: escalation of a host
        remediated too often (when `starts_remediation`), then the breaker's admission. (reason, detail) if held."""
        r = self.rules
        if action not in DISRUPTIVE:
            return None
        host = rec.host
        if r.escalate_after and starts_remediation:
            times = self._guards.remediations(host, now - r.escalate_window_s)
            done = remediation_count(times, r.drain_hold_s)
            # Another GPU of a host being remediated now is part of the same remediation.
            ongoing = bool(times) and now - times[-1] < r.drain_hold_s
            if not ongoing and done >= r.escalate_after:
                detail = (
                    f"host {host} was remediated {done} times within {r.escalate_window_s / 86400:g} days "
                    f"(policy_escalate_after {r.escalate_after}): {action} held for a human; "
                    f"`gpuwatch policy clear-escalation {host}` once it is dealt with"
                )
                entry = self._entry(rec, now, action, "tripped", "escalation", detail, gpu)
                record = msgspec.to_builtins(entry)  # the guard's state: the trip's audit entry as stored
                if self._guards.escalate(host, record):
                    audits.append(entry)
                    self._trip("escalation")
                self._view.escalated[host] = record
                return "escalated", detail
        if r.breaker_share:
            fleet = self._view.fleet_hosts
            limit = r.breaker_limit(fleet)
            detail = (
                f"circuit breaker opened: disruptive actions reached {limit} hosts within "
                f"{r.breaker_window_s:g} s, the limit ({r.breaker_share:.3g} of {fleet} hosts, at least "
                f"{r.breaker_min_hosts}); {action} on {host} would have been one more. No disruptive action "
                "until `gpuwatch policy reset-breaker`"
            )
            trip = msgspec.structs.replace(self._entry(rec, now, action, "tripped", "breaker", detail, gpu),
                                           limit=limit, fleet_hosts=fleet, window_s=r.breaker_window_s)  # fmt: skip
            record = msgspec.to_builtins(trip)
            answer = self._guards.admit(host, now, r.breaker_window_s, limit, record)
            if answer == TRIPPED:
                audits.append(trip)
                self._trip("breaker")
            if answer in (TRIPPED, OPEN):
                opened_elsewhere = {"now": now, "detail": "opened by another remediation sink"}
                self._view.breaker = self._view.breaker or (record if answer == TRIPPED else opened_elsewhere)
                return self._fleet_guard(action, host, now, False)
            if answer != ADMITTED:
                self._view.available = False
                return self._fleet_guard(action, host, now, False)
        return None

    def _remediated(self, starts: bool, rec: Risk, event_id: str, now: float) -> None:
        """Counts a remediation of the record's host (a migrate, or a repair its GPU had no migrate for)."""
        if starts and self.rules.escalate_after:
            self._guards.add_remediation(rec.host, event_id, now, self.rules.escalate_window_s)

    def _trip(self, guard: str) -> None:
        self.trips[guard] += 1
        self._on_trip(guard)

    def _sync_guards(
        self, records: Sequence[Risk], now: float, audits: list[AuditEntry]
    ) -> None:
        """Tells the guard state which hosts this batch saw and which are unhealthy; reads it back; opens or
        closes the incident. A host is unhealthy while one of its GPUs is in alarm or failed within the
        breaker's window (an old failure waiting for repair is not news)."""
        r = self.rules
        seen: dict[str, float] = {}
        touched: set[str] = set()
        for rec in records:
            host = rec.host
            if now - self._host_seen.get(host, -math.inf) >= HOST_SEEN_EVERY_S:
                self._host_seen[host] = seen[host] = now
            if not r.max_unhealthy_hosts or now - min(rec.ts, now) > r.stale_after_s:
                continue
            failed_since = rec.failed_since if isinstance(rec.failed_since, float) else rec.ts
            bad = rec.alarm or (
                rec.failed and now - failed_since <= r.breaker_window_s
            )
            gpus = self._bad.get(host)
            if bad:
                self._bad.setdefault(host, set()).add(rec.gpu_index)
                touched.add(host)
            elif gpus and rec.gpu_index in gpus:
                gpus.discard(rec.gpu_index)
                touched.add(host)
        unhealthy = {h: now for h in touched if self._bad.get(h)}
        healthy = [h for h in touched if not self._bad.get(h)]
        for host in healthy:
            self._bad.pop(host, None)
        view = self._guards.sync(seen, unhealthy, healthy, now, FLEET_KEEP_S, r.stale_after_s)
        self._view = view
        if not r.max_unhealthy_hosts or not view.available:
            return
        incident = view.unhealthy_hosts > r.max_unhealthy_hosts
        if incident and view.incident is None:
            detail = (
                f"{view.unhealthy_hosts} hosts unhealthy, more than policy_max_unhealthy_hosts "
                f"({r.max_unhealthy_hosts}) of {view.fleet_hosts}: an incident, not a GPU fault; the policy "
                "takes no action until they are fewer"
            )
            entry = _fleet_entry(now, "tripped", "incident", detail, unhealthy_hosts=view.unhealthy_hosts)
            record = msgspec.to_builtins(entry)
            if self._guards.set_incident(record):
                audits.append(entry)
                self._trip("incident")
            view.incident = record
        elif not incident and view.incident is not None:
            if self._guards.set_incident(None):
                detail = (
                    f"{view.unhealthy_hosts} hosts unhealthy, at most policy_max_unhealthy_hosts "
                    f"({r.max_unhealthy_hosts}): the policy acts again"
                )
                audits.append(
                    _fleet_entry(now, "cleared", "incident", detail, unhealthy_hosts=view.unhealthy_hosts)
                )
            view.incident = None

    def _end_episode(
        self, m: str, rec: Risk, now: float, why: str, audits: list[AuditEntry]
    ) -> None:
        gpu = self._gpus[m]
        ep = gpu.episode
        gpu.episode = None
        host = rec.host
        if host in self._drains:
            self._drains[host].pop(m, None)
            if not self._drains[host]:
                del self._drains[host]
        if ep is not None and (ep.action_ts or ep.audited):
            detail = f"episode from ts {ep.start_ts:.0f} ended ({why}); actions: {', '.join(ep.action_ts) or 'none'}"
            audits.append(self._entry(rec, now, None, "cleared", why, detail, gpu, episode_ts=ep.start_ts))

    def _entry(
        self,
        rec: Risk,
        now: float,
        action: str | None,
        decision: AuditDecision,
        reason: str,
        detail: str,
        gpu: _Gpu | None,
        event_id: str | None = None,
        episode_ts: float | None = None,
    ) -> AuditEntry:
        if episode_ts is None and gpu is not None and gpu.episode is not None:
            episode_ts = gpu.episode.start_ts
        return AuditEntry(
            decision=decision, action=action, reason=reason, detail=detail, id=event_id, host=rec.host,
            gpu_index=rec.gpu_index, uuid=rec.uuid, risk=rec.risk, mode=rec.mode, ts=rec.ts, episode_ts=episode_ts,
            now=now, why=[r.text for r in rec.why] if isinstance(rec.why, list) else [],
        )  # fmt: skip


def _why(rec: Risk) -> str:
    """", why: <the record's first reason>" for a risk record that says why (`Risk.why`), else ""."""
    return f", why: {rec.why[0].text}" if isinstance(rec.why, list) and rec.why else ""


def remediation_count(times: Sequence[float], hold_s: float) -> int:
    """Remediations of a host from the times its GPUs were remediated (sorted): one remediation goes on while
    the next GPU's comes less than `hold_s` (the drain hold) after the previous one (a drained node, or a rack
    event, takes several GPUs at once: that is one remediation of the node, not eight)."""
    count, last = 0, -math.inf
    for t in times:
        if t - last >= hold_s:
            count += 1
        last = t
    return count


def _fleet_entry(now: float, decision: AuditDecision, reason: str, detail: str, **extra: Any) -> AuditEntry:
    """An audit entry about the fleet, not one GPU (an incident, an operator's reset): the GPU fields are null."""
    fields: dict[str, Any] = {"action": None, "id": None, "host": None, "gpu_index": None, "uuid": None, "risk": None,
                              "mode": None, "ts": None, "episode_ts": None}  # fmt: skip
    return AuditEntry(decision=decision, reason=reason, detail=detail, now=now, **{**fields, **extra})


def operator_entry(now: float, reason: str, detail: str, host: str | None = None) -> AuditEntry:
    """The audit entry of an operator's command (`gpuwatch policy reset-breaker`, `clear-escalation`)."""
    return _fleet_entry(now, "reset", reason, detail, host=host)


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

    def __call__(self, entries: list[AuditEntry]) -> None:
        for e in entries:
            if e.decision == "acted":
                log.info("remediation %s %s GPU %s: %s", e.action, e.host, e.gpu_index, e.detail)
        pipe = self._redis.pipeline(transaction=False)
        for e in entries:
            pipe.xadd(k.AUDIT, {"json": encode_audit(e)}, maxlen=self._maxlen, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("audit log: %d entries not written to Redis (%s): %s", len(entries), exc, entries)


def read_audit(redis_client: redis.Redis, count: int = 100) -> list[AuditEntry]:
    """The newest `count` audit entries from Redis, newest first (`gpuwatch.audit/1`). An entry that is not one
    (written by another tool, or by hand) is left out and logged with its stream id and the reason."""
    out: list[AuditEntry] = []
    for entry_id, fields in redis_client.xrevrange(k.AUDIT, count=count) or []:
        raw = (fields or {}).get(b"json") or (fields or {}).get("json")
        try:
            out.append(decode_audit(raw))
        except DecodeError as exc:
            log.warning("audit entry %r is not a gpuwatch.audit/1 record (%s); left out", entry_id, exc)
    return out
