"""`gpuwatch policy drill`: correlated high risk fed to the real remediation policy, to see where its guard rails trip.

Each scenario is a stream of risk records, ten seconds apart, for a simulated fleet with the simulator's host
names (``node-0000`` ...); every GPU of every host reports at least once a minute, so the policy sees the whole
fleet. The records are built here, not scored by the model: what is drilled is the policy's response to a burst
the model has already called (alarm, drain, failed), with the rules of the settings (maintenance windows left
out: the drill's clock is arbitrary).

* ``rack-cooling``: a rack's cooling fails. Every GPU of `rack_hosts` consecutive hosts runs hot at once (the
  drain operating point, mode thermal) and, host after host, shuts down (failed).
* ``driver-rollout``: a bad driver rolls out to every third host, one host a minute; two minutes after its
  upgrade every GPU of the host falls off the bus (failed, mode sudden).
* ``independent``: the control. Three GPUs on three hosts far apart fail on their own, hours apart, as on any
  day: no guard rail may trip.

The figure: how many hosts disruptive actions (migrate, reboot, repair) reached before the breaker opened, next
to the breaker's limit (`policy_breaker_share` of the fleet, at least `policy_breaker_min_hosts`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from msgspec import UNSET

from ..schemas.records import AuditEntry, Remediation, Risk
from .guard_state import GuardState, MemoryGuardState
from .policy import DISRUPTIVE, PolicyRules, RemediationPolicy

T0 = 1_750_000_000.0  # the drill's clock starts here (record time = wall time: fresh records)
STEP_S = 10.0
SCENARIOS = ("rack-cooling", "driver-rollout", "independent")

# What a GPU reports at a moment of a scenario: None (nothing special: quiet), or (level, mode, failed_since).
GpuState = tuple[str, str, float] | None


def host_name(i: int) -> str:
    """The simulator's host names."""
    return f"node-{i:04d}"


def risk_record(host: str, gpu: int, ts: float, state: GpuState) -> Risk:
    """A `gpuwatch.risk/1` record as the stream would publish it for a GPU in `state`."""
    level, mode, failed_since = state or ("quiet", "none", 0.0)
    failed = level == "failed"
    return Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts,
                risk=1.0 if failed else {"quiet": 1e-5, "drain": 0.05}[level], horizon_s=3600.0,
                mode=mode, model="drill", scored_at=ts, alarm=level == "drain", drain=level == "drain",  # type: ignore[arg-type]
                failed=failed, op="drill", failed_since=failed_since if failed else UNSET)  # fmt: skip


def _rack_cooling(rack: list[int], gpus: int) -> Callable[[int, int, float], GpuState]:
    start = 60.0
    members = set(rack)

    def state(h: int, g: int, t: float) -> GpuState:
        if h not in members or t < start:
            return None
        fails_at = start + 600.0 + 120.0 * rack.index(h) + 5.0 * g  # the rack heats up host after host
        return ("failed", "thermal", T0 + fails_at) if t >= fails_at else ("drain", "thermal", 0.0)

    return state


def _driver_rollout(fleet: int, gpus: int) -> Callable[[int, int, float], GpuState]:
    order = {h: n for n, h in enumerate(range(0, fleet, 3))}  # every third host, one a minute

    def state(h: int, g: int, t: float) -> GpuState:
        n = order.get(h)
        if n is None:
            return None
        fails_at = 60.0 * n + 120.0
        return ("failed", "sudden", T0 + fails_at) if t >= fails_at else None

    return state


def _independent(fleet: int, gpus: int) -> Callable[[int, int, float], GpuState]:
    cases = {
        (fleet // 6, 1): 600.0,
        (fleet // 2, 4): 2400.0,
        ((5 * fleet) // 6, 6): 4800.0,
    }  # (host, gpu): fails at

    def state(h: int, g: int, t: float) -> GpuState:
        fails_at = cases.get((h, g))
        if fails_at is None or t < fails_at - 900.0:
            return None  # the drain operating point holds for 15 minutes before the failure
        return ("failed", "memory", T0 + fails_at) if t >= fails_at else ("drain", "memory", 0.0)

    return state


def scenario_states(
    name: str, fleet_hosts: int, rack_hosts: int, gpus_per_host: int
) -> tuple[Callable[[int, int, float], GpuState], list[int]]:
    """The scenario's GPU states over time, and the hosts it hits."""
    if name == "rack-cooling":
        rack = list(range(min(10, fleet_hosts - rack_hosts), min(10, fleet_hosts - rack_hosts) + rack_hosts))
        return _rack_cooling(rack, gpus_per_host), rack
    if name == "driver-rollout":
        return _driver_rollout(fleet_hosts, gpus_per_host), list(range(0, fleet_hosts, 3))
    if name == "independent":
        hosts = [fleet_hosts // 6, fleet_hosts // 2, (5 * fleet_hosts) // 6]
        return _independent(fleet_hosts, gpus_per_host), hosts
    raise ValueError(f"unknown scenario {name!r}; give one of {', '.join(SCENARIOS)}")


def _batches(
    state: Callable[[int, int, float], GpuState], fleet_hosts: int, gpus: int, duration_s: float
) -> Iterator[tuple[float, list[Risk]]]:
    """(now, records) every STEP_S: every GPU not in a quiet state, and every GPU of the fleet once a minute."""
    steps = int(duration_s // STEP_S) + 1
    for i in range(steps):
        t = i * STEP_S
        everyone = i % 6 == 0
        batch = []
        for h in range(fleet_hosts):
            for g in range(gpus):
                s = state(h, g, t)
                if s is not None or everyone:
                    batch.append(risk_record(host_name(h), g, T0 + t, s))
        yield T0 + t, batch


def run_scenario(
    name: str, rules: PolicyRules, *, fleet_hosts: int = 100, rack_hosts: int = 10, gpus_per_host: int = 8,
    duration_s: float = 7200.0, guards: GuardState | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Feeds the scenario to a fresh policy with `rules` (maintenance windows dropped); returns what it did."""
    if fleet_hosts < 1 or gpus_per_host < 1 or not 1 <= rack_hosts <= fleet_hosts:
        raise ValueError("need fleet_hosts >= 1, gpus_per_host >= 1 and 1 <= rack_hosts <= fleet_hosts")
    state, hit = scenario_states(name, fleet_hosts, rack_hosts, gpus_per_host)
    audit: list[AuditEntry] = []
    policy = RemediationPolicy(
        dataclasses.replace(rules, maintenance=()), audit=audit.extend, guards=guards or MemoryGuardState()
    )
    events: list[Remediation] = []
    opened_at: float | None = None
    disrupted_before: set[str] = set()
    for now, batch in _batches(state, fleet_hosts, gpus_per_host, duration_s):
        for event in policy.observe(batch, now):
            events.append(event)
            if event.action in DISRUPTIVE and opened_at is None:
                disrupted_before.add(event.host)
        if opened_at is None and any(a.decision == "tripped" and a.reason == "breaker" for a in audit):
            opened_at = now - T0
    disrupted = {e.host for e in events if e.action in DISRUPTIVE}
    tripped = Counter(a.reason for a in audit if a.decision == "tripped")
    suppressed = Counter(a.reason for a in audit if a.decision == "suppressed")
    limit = rules.breaker_limit(fleet_hosts)
    return {
        "scenario": name,
        "fleet_hosts": fleet_hosts,
        "hosts_hit": len(hit),
        "breaker_share": rules.breaker_share,
        "share_of_fleet_hosts": rules.breaker_share * fleet_hosts,
        "breaker_limit_hosts": limit,
        "breaker_opened_at_s": opened_at,
        "hosts_disrupted_before_breaker": len(disrupted_before),
        "hosts_disrupted": len(disrupted),
        "events": dict(Counter(e.action for e in events)),
        "tripped": dict(tripped),
        "suppressed": dict(suppressed),
        "escalated_hosts": len(policy.guard_view.escalated),
        "within_limit": len(disrupted) <= limit,
    }


def run_drill(
    rules: PolicyRules, *, fleet_hosts: int = 100, rack_hosts: int = 10, gpus_per_host: int = 8,
    duration_s: float = 7200.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every scenario, each on a fresh policy."""
    return [
        run_scenario(
            name,
            rules,
            fleet_hosts=fleet_hosts,
            rack_hosts=rack_hosts,
            gpus_per_host=gpus_per_host,
            duration_s=duration_s,
        )  # fmt: skip
        for name in SCENARIOS
    ]


def drill_table(results: list[dict[str, Any]]) -> str:
    """The drill's results as a plain-text table, one column per scenario."""

    def opened(r: dict[str, Any]) -> str:
        return "never" if r["breaker_opened_at_s"] is None else f"{r['breaker_opened_at_s']:.0f} s"

    rows: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
        ("fleet hosts", lambda r: r["fleet_hosts"]),
        ("hosts hit by the event", lambda r: r["hosts_hit"]),
        ("breaker limit (hosts)", lambda r: f"{r['breaker_limit_hosts']} ({r['share_of_fleet_hosts']:g} = share)"),
        ("breaker opened after", opened),
        ("hosts disrupted before it opened", lambda r: r["hosts_disrupted_before_breaker"]),
        ("hosts disrupted in all", lambda r: r["hosts_disrupted"]),
        ("events", lambda r: ", ".join(f"{a} {n}" for a, n in sorted(r["events"].items())) or "none"),
        ("trips", lambda r: ", ".join(f"{g} {n}" for g, n in sorted(r["tripped"].items())) or "none"),
        ("held (audited once per GPU episode)",
         lambda r: ", ".join(f"{g} {n}" for g, n in sorted(r["suppressed"].items())) or "none"),
    ]  # fmt: skip
    cells = [[label] + [str(get(r)) for r in results] for label, get in rows]
    header = ["", *(r["scenario"] for r in results)]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
