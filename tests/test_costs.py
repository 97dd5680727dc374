"""The cost model in GPU-hours (gpuwatch/costs.py), worked out by hand for the defaults."""

from __future__ import annotations

import pytest

from gpuwatch.config import Settings
from gpuwatch.costs import CostModel, precision_at

C = CostModel()  # 1024-GPU jobs checkpointing hourly; a failure costs 30 min of overhead; 2 min checkpoints


def test_an_unwarned_failure_costs_half_an_interval_and_the_overhead_on_every_gpu_of_the_job() -> None:
    assert C.failure_loss() == pytest.approx(1024 * (0.5 + 0.5))


def test_actions_cost_the_job_its_pause_and_a_healthy_node_its_time_out_of_service() -> None:
    assert C.action_cost("checkpoint", real=True) == pytest.approx(1024 * 2 / 60)
    assert C.action_cost("migrate", real=True) == pytest.approx(1024 * 10 / 60)
    assert C.action_cost("migrate", real=False) == pytest.approx(1024 * 10 / 60 + 32)
    assert (C.action_cost("reboot", real=True), C.action_cost("reboot", real=False)) == (0.0, 4.0)
    assert C.action_cost("repair", real=False) == 0.0


def test_a_checkpoint_saves_the_work_it_protects_and_a_migration_avoids_the_failure() -> None:
    assert C.saved(None, None) == 0.0
    assert C.saved(10 * 60, None) == pytest.approx(1024 * 20 / 60)  # 10 min before: 20 of the 30 min kept
    assert C.saved(45 * 60, None) == 0.0  # too early to help: the job would have checkpointed on its own
    assert C.saved(60, None) == 0.0  # not written before the failure (a checkpoint takes 2 min)
    # checkpoint 30 min ahead, migrate 29 min ahead: only the minute between them is lost
    assert C.saved(30 * 60, 29 * 60) == pytest.approx(C.failure_loss() - 1024 / 60)
    assert C.saved(None, 10 * 60) == pytest.approx(C.failure_loss() - 1024 * 0.5)


def test_expected_value_of_an_action_at_a_precision() -> None:
    assert C.expected_saving("checkpoint", 0.1) == pytest.approx(0.1 * 1024 * 0.5)
    assert C.expected_cost("migrate", 0.25) == pytest.approx(1024 * 10 / 60 + 0.75 * 32)


def test_precision_at_a_real_failure_rate() -> None:
    # 80 % of failures caught, 1 false episode per 1,000 healthy GPU-days, 1.94e-4 failures per GPU-day
    assert precision_at(0.8, 1e-3, 1.94e-4) == pytest.approx(0.8 * 1.94e-4 / (0.8 * 1.94e-4 + 1e-3))
    assert precision_at(0.0, 0.0, 1e-4) == 0.0


def test_costs_come_from_settings_and_are_checked() -> None:
    c = CostModel.from_settings(Settings(policy_job_gpus=64, policy_checkpoint_cost_s=30.0))
    assert (c.job_gpus, c.checkpoint_cost_s) == (64, 30.0)
    with pytest.raises(ValueError):
        CostModel(job_gpus=-1)
