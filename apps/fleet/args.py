"""The arguments of `gpuwatch fleet` (kept apart so that building the command line imports nothing heavy)."""

from __future__ import annotations

import argparse


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history", metavar="PATH",
                   help="failures to learn from: a gpuwatch archive (folder or URL: its label store), a `gpuwatch "
                        "simulate` folder, or a JSONL file of failure labels or of the controller's outcomes "
                        "(gpuwatch.outcome/1)")  # fmt: skip
    p.add_argument("--since", help="start of the history's window (unix seconds or ISO date); required with a JSONL "
                                   "file, an archive's first sample otherwise")  # fmt: skip
    p.add_argument("--until", help="end of the history's window (default: now for a JSONL file, an archive's last "
                                   "sample, a simulation's end)")  # fmt: skip
    p.add_argument("--inventory", metavar="FILE.json",
                   help='the fleet of a JSONL or archive history: {"host": {"gpus": 8, "model": "h100-sxm"}, ...} '
                        "(default: the GPUs with live risk in Redis)")  # fmt: skip
    p.add_argument("--no-live", action="store_true", help="do not read live risk from Redis (redis_url)")
    p.add_argument("--days", type=float, default=7.0, help="the long forecast's window in days (default 7)")
    p.add_argument(
        "--job-gpus", type=int, help="job size for the interruption figure (default: policy_job_gpus)"
    )
    p.add_argument(
        "--checkpoint-s",
        type=float,
        help="the job's checkpoint interval, s (default: policy_job_checkpoint_interval_s)",
    )
    p.add_argument(
        "--service-level",
        type=float,
        default=0.95,
        help="probability that the spares cover every GPU in repair (default 0.95)",
    )
    p.add_argument(
        "--turnaround-days",
        type=float,
        help="mean days a failed GPU is out (default: the history's repairs, else the StepFun trace's)",
    )
    p.add_argument("--level", type=float, default=0.90, help="two-sided interval level (default 0.90)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the view as JSON here")
    p.add_argument(
        "--report", metavar="PATH.html", help="also write an HTML page with plots (needs matplotlib)"
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="keep running: recompute every --every s and export gpuwatch_fleet_* on fleet_metrics_port",
    )
    p.add_argument(
        "--every", type=float, default=300.0, help="with --serve: seconds between two views (default 300)"
    )
