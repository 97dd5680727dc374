"""The policy weighs each action's cost against the expected loss from a failure (no servers)."""

from __future__ import annotations

from typing import Any

import pytest

from gpuwatch.config import Settings
from gpuwatch.sinks.policy import PolicyRules, RemediationPolicy, weigh

T0 = 1_750_000_000.0


def run(policy: RemediationPolicy, end: float, risk: float, mode: str = "sudden") -> list[tuple[str, float]]:
    """Feeds one GPU's records every 10 s from 0 to `end` (fresh data); returns (action, t) of the events."""
    out = []
    for t in range(0, int(end) + 1, 10):
        rec = {"host": "node-0001", "gpu_index": 3, "uuid": "GPU-1", "ts": T0 + t, "risk": risk, "mode": mode}
        out += [(e["action"], e["ts"] - T0) for e in policy.observe([rec], now=T0 + t)]
    return out


def audited(**rules: Any) -> tuple[RemediationPolicy, list[dict[str, Any]]]:
    audit: list[dict[str, Any]] = []
    return RemediationPolicy(audit=audit.extend, **rules), audit


def test_expected_loss_is_risk_times_job_gpus_times_hours_lost_times_price() -> None:
    r = PolicyRules()  # 8 GPUs, 2.5 per GPU-hour, jobs checkpoint hourly, a failure costs 30 min more
    loss, cost = weigh(r, "checkpoint", 0.9, None)  # type: ignore[misc]
    assert (loss, cost) == (pytest.approx(0.9 * 8 * 0.5 * 2.5), 1.0)  # half an interval of work on average
    loss, cost = weigh(r, "migrate", 0.9, 300.0)  # type: ignore[misc]
    assert (loss, cost) == (pytest.approx(0.9 * 8 * (300 + 1800) / 3600 * 2.5), 5.0)
    capped, _ = weigh(r, "migrate", 0.9, 10 * 3600.0)  # type: ignore[misc]
    assert capped == pytest.approx(0.9 * 8 * (3600 + 1800) / 3600 * 2.5)  # never more than one interval
    assert weigh(r, "reboot", 0.99, 600.0) is None  # the host is drained: no job at stake


def test_a_small_job_is_checkpointed_but_not_worth_draining_a_host_for() -> None:
    policy, audit = audited(job_gpus=1)  # at most 0.9 x 1 x 1.5 h x 2.5 = 3.4 < migrate cost 5
    assert run(policy, 4000, 0.9) == [("checkpoint", 300)]
    suppressed = [a for a in audit if a["decision"] == "suppressed"]
    assert [(a["action"], a["reason"]) for a in suppressed] == [("migrate", "not_worth_it")]  # audited once
    assert "< migrate cost 5" in suppressed[0]["detail"] and "x 1 GPUs" in suppressed[0]["detail"]


def test_migrate_waits_until_the_work_at_stake_outweighs_its_cost() -> None:
    # 0.9 x 2 GPUs x 2.5 = 4.5 per hour at stake: 5 needs 4000 s = 2200 s since checkpoint + 1800 s overhead
    policy, audit = audited(job_gpus=2)
    assert run(policy, 2600, 0.9) == [("checkpoint", 300), ("migrate", 2500)]
    assert [(a["decision"], a["reason"]) for a in audit] == [
        ("acted", "due"),
        ("suppressed", "not_worth_it"),
        ("acted", "due"),
    ]


def test_cheap_gpus_are_not_worth_acting_on_and_a_free_action_always_is() -> None:
    policy, audit = audited(cost_per_gpu_hour=0.1)  # 0.9 x 8 x 0.5 h x 0.1 = 0.36 < checkpoint cost 1
    assert run(policy, 1000, 0.9) == []
    assert [(a["action"], a["reason"]) for a in audit] == [("checkpoint", "not_worth_it")]
    policy, _ = audited(cost_per_gpu_hour=0.1, cost_checkpoint=0.0, cost_migrate=0.0)
    assert run(policy, 1000, 0.9) == [("checkpoint", 300), ("migrate", 600)]


def test_acted_events_carry_the_figures_and_the_rules_come_from_settings() -> None:
    policy, _ = audited()
    events = []
    for t in range(0, 301, 10):
        rec = {"host": "h", "gpu_index": 0, "uuid": "GPU-1", "ts": T0 + t, "risk": 0.9, "mode": "memory"}
        events += policy.observe([rec], now=T0 + t)
    assert events[0]["reason"].endswith("expected loss 9.00 vs cost 1")

    rules = PolicyRules.from_settings(
        Settings(
            policy_cost_per_gpu_hour=4.0,
            policy_job_gpus=64,
            policy_job_checkpoint_interval_s=1800.0,
            policy_failure_overhead_s=600.0,
            policy_cost_checkpoint=3.0,
            policy_cost_migrate=40.0,
        )
    )
    assert (rules.cost_per_gpu_hour, rules.job_gpus, rules.job_checkpoint_interval_s) == (4.0, 64, 1800.0)
    assert (rules.failure_overhead_s, rules.cost_checkpoint, rules.cost_migrate) == (600.0, 3.0, 40.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        PolicyRules(cost_migrate=-1.0)
