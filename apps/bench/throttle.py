"""`gpuwatch bench throttle`: does throttling pay? Closed-loop runs of simulated thermal and power precursors,
drain-only against throttle-first (training/throttle_eval.py), at the real failure rate; a table and JSON."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gpuwatch.apps.bench.table import emit
from gpuwatch.config import THROTTLE_KINDS, Settings
from gpuwatch.costs import CostModel
from gpuwatch.training.throttle_eval import ThrottleSpec, evaluate_throttle, table_rows


def bad_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line with the fix; None: nothing."""
    if min(args.gpus, args.healthy_gpu_days, args.false_alarms_per_1000 or 0) < 0 or args.halt_cut <= 0:
        return "--gpus (failures), --healthy-gpu-days and --false-alarms-per-1000 must be >= 0, --halt-cut > 0"
    if args.throttle_kind not in THROTTLE_KINDS:
        return f"--throttle-kind {args.throttle_kind}: give one of {', '.join(THROTTLE_KINDS)}"
    return None


def run_throttle_bench(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Runs the evaluation with the cost model of `settings` and the throttle of its `policy_throttle_*` settings
    (a `policy_throttle_s` of 0, throttling off, evaluates a 1800 s throttle), of the kind `--throttle-kind`
    names ("power", the default: a power limit of `policy_throttle_frac`; "clocks": an SM clock lock at
    `policy_throttle_clock_frac`), whatever `policy_throttle_kind` says."""
    if bad := bad_args(args):
        raise SystemExit(f"gpuwatch bench throttle: {bad}")
    kind = args.throttle_kind
    spec = ThrottleSpec(
        failures=max(2, args.gpus or 24),
        healthy_gpu_days=args.healthy_gpu_days,
        seed=args.seed,
        halt_cut=args.halt_cut,
        throttle_s=settings.policy_throttle_s or 1800.0,
        throttle_kind=kind,
        throttle_frac=settings.policy_throttle_frac,
        throttle_clock_frac=settings.policy_throttle_clock_frac,
        throttle_grace_s=settings.policy_throttle_grace_s,
    )
    costs = CostModel.from_settings(settings)
    out = evaluate_throttle(spec, costs, real_failures_per_gpu_day=settings.fleet_failure_rate_per_gpu_day,
                            false_alarms_per_1000_gpu_days=args.false_alarms_per_1000,
                            progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))  # fmt: skip
    title = f"gpuwatch bench throttle --throttle-kind {kind} (closed loop: simulator -> model -> policy -> simulator)"
    emit(title, table_rows(out), out, args.json_path)
    return out
