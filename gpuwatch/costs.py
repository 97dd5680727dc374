"""The cost model, in GPU-hours: what a failure costs the job on a GPU, what each remediation costs and saves.

One place for the policy's expected-cost rule, the choice of operating points on validation data and the
evaluation's net GPU-hours saved, so that all three weigh the same things. The figures are settings
(`policy_job_gpus`, `policy_*_cost_*`, ...); docs/remediation.md explains each.

A failure with no warning costs the job `job_gpus x (half its own checkpoint interval + failure overhead)`:
the work since its last checkpoint (half an interval on average) and the time to notice, time out,
requeue and reload. A checkpoint gpuwatch asks for `lead` seconds before the failure leaves only
`min(lead, interval / 2)` of work to lose. A migration before the failure avoids the failure: the job
restarts elsewhere from its last checkpoint, so it loses the work since then and the planned restart.
A throttle (a lower power limit on the failing GPU) slows the whole job while it holds, since a synchronous
job runs at its slowest GPU's pace: `job_gpus x throttle_slowdown x hours held`, whether the alarm was real
or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpuwatch.config import Settings

H = 3600.0


@dataclass(frozen=True)
class CostModel:
    """The inputs of the cost model; every method returns GPU-hours."""

    job_gpus: int = 1024
    job_checkpoint_interval_s: float = 3600.0
    failure_overhead_s: float = 1800.0
    checkpoint_cost_s: float = 120.0
    migrate_cost_s: float = 600.0
    drain_cost_gpu_h: float = 32.0
    reboot_cost_gpu_h: float = 4.0
    throttle_slowdown: float = 0.15  # share of the job's throughput lost while one of its GPUs is throttled
    throttle_s: float = 0.0  # how long a throttle holds at most (0: the policy does not throttle)

    def __post_init__(self) -> None:
        if min(self.job_gpus, self.job_checkpoint_interval_s, self.failure_overhead_s, self.checkpoint_cost_s,
               self.migrate_cost_s, self.drain_cost_gpu_h, self.reboot_cost_gpu_h, self.throttle_s) < 0:  # fmt: skip
            raise ValueError("cost model figures must be >= 0")
        if not 0.0 <= self.throttle_slowdown <= 1.0:
            raise ValueError("throttle_slowdown must be in [0, 1]")

    @classmethod
    def from_settings(cls, settings: Settings) -> CostModel:
        return cls(
            job_gpus=settings.policy_job_gpus,
            job_checkpoint_interval_s=settings.policy_job_checkpoint_interval_s,
            failure_overhead_s=settings.policy_failure_overhead_s,
            checkpoint_cost_s=settings.policy_checkpoint_cost_s,
            migrate_cost_s=settings.policy_migrate_cost_s,
            drain_cost_gpu_h=settings.policy_drain_cost_gpu_h,
            reboot_cost_gpu_h=settings.policy_reboot_cost_gpu_h,
            throttle_slowdown=settings.policy_throttle_slowdown,
            throttle_s=settings.policy_throttle_s,
        )

    def failure_loss(self) -> float:
        """What a failure nobody saw coming costs the job."""
        return self.job_gpus * (self.job_checkpoint_interval_s / 2 + self.failure_overhead_s) / H

    def action_cost(self, action: str, *, real: bool) -> float:
        """What one action costs. A drain or reboot of a node about to fail costs nothing extra (it would be
        out for repair anyway); of a healthy node (`real=False`) it costs the node's inspection or reboot time."""
        if action == "checkpoint":
            return self.job_gpus * self.checkpoint_cost_s / H
        if action == "migrate":
            return self.job_gpus * self.migrate_cost_s / H + (0.0 if real else self.drain_cost_gpu_h)
        if action == "reboot":
            return 0.0 if real else self.reboot_cost_gpu_h
        if action == "throttle":
            return self.throttle_cost(self.throttle_s)
        return 0.0  # repair: a failed GPU is drained and repaired whatever gpuwatch does; restore costs nothing

    def throttle_cost(self, held_s: float) -> float:
        """What a throttle that held `held_s` seconds cost the job (real alarm or not: the job ran slower)."""
        return self.job_gpus * self.throttle_slowdown * max(held_s, 0.0) / H

    def throttle_favoured(self) -> bool:
        """Whether the policy may throttle before the ladder: a throttle held its full time must cost less than
        the drain it may spare (a migration of a GPU about to fail), else it cannot pay even when it works."""
        return self.throttle_s > 0 and self.throttle_cost(self.throttle_s) < self.action_cost("migrate", real=True)

    def saved(self, checkpoint_lead_s: float | None, migrate_lead_s: float | None) -> float:
        """How much less the failure costs thanks to a checkpoint and/or a migration `*_lead_s` seconds before it
        (None: not done before the failure). Action costs are not subtracted here (see `action_cost`)."""
        half = self.job_checkpoint_interval_s / 2
        if migrate_lead_s is not None and migrate_lead_s > 0:
            # Work since the last checkpoint is lost at the migration instead of at the failure.
            since = half if checkpoint_lead_s is None else min(max(checkpoint_lead_s - migrate_lead_s, 0.0), half)
            return self.failure_loss() - self.job_gpus * since / H
        if checkpoint_lead_s is not None and checkpoint_lead_s > self.checkpoint_cost_s:
            return self.job_gpus * max(0.0, half - checkpoint_lead_s) / H
        return 0.0

    def expected_saving(self, action: str, precision: float, since_checkpoint_s: float | None = None) -> float:
        """Expected GPU-hours an action saves when a share `precision` of such alarms precede a real failure.

        checkpoint: protects half an interval of work; migrate: avoids the failure (its overhead and the work
        since the last checkpoint, `since_checkpoint_s` when gpuwatch asked for one)."""
        half = self.job_checkpoint_interval_s / 2
        if action == "checkpoint":
            return precision * self.job_gpus * half / H
        if action == "migrate":
            since = half if since_checkpoint_s is None else min(max(since_checkpoint_s, 0.0), half)
            return precision * self.job_gpus * (half + self.failure_overhead_s - since) / H
        return 0.0

    def expected_cost(self, action: str, precision: float) -> float:
        """Expected cost of an action whose alarms are real a share `precision` of the time."""
        return precision * self.action_cost(action, real=True) + (1 - precision) * self.action_cost(action, real=False)


def precision_at(recall: float, false_per_gpu_day: float, failures_per_gpu_day: float) -> float:
    """Share of an operating point's alarm episodes that precede a real failure on a fleet failing at
    `failures_per_gpu_day` (precursor failures only), given its recall and false episodes per healthy GPU-day."""
    true_rate = max(recall, 0.0) * max(failures_per_gpu_day, 0.0)
    total = true_rate + max(false_per_gpu_day, 0.0)
    return true_rate / total if total > 0 else 0.0
