"""`gpuwatch fleet`: print the fleet reliability view, write it as JSON or HTML, or export it to Prometheus."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from gpuwatch.config import Settings, redact_url

from .history import (
    FailureHistory,
    HistoryError,
    parse_time,
    read_archive,
    read_history_file,
    read_inventory,
    read_simulation,
)
from .view import FleetOptions, LiveRisk, fleet_view, format_view

log = logging.getLogger(__name__)
PROG = "gpuwatch fleet"


class FleetInputError(ValueError):
    """An input of `gpuwatch fleet` cannot be used; the message names it and the fix."""


class LiveUnavailable(FleetInputError):
    """Redis cannot be read or holds no risk yet: `--serve` waits for it, a single view gives up."""


def options(args: argparse.Namespace, settings: Settings) -> FleetOptions:
    """The planner's options from the command line, checked; FleetInputError names a bad one."""
    job = settings.policy_job_gpus if args.job_gpus is None else args.job_gpus
    ckpt = settings.policy_job_checkpoint_interval_s if args.checkpoint_s is None else args.checkpoint_s
    checks = (
        (0 < args.level < 1, f"--level {args.level:g} is not between 0 and 1; give e.g. 0.9"),
        (0 < args.service_level < 1, f"--service-level {args.service_level:g} is not between 0 and 1; give e.g. 0.95"),
        (args.days > 0, f"--days {args.days:g} must be positive"),
        (job >= 1, f"--job-gpus {job} must be at least 1"),
        (ckpt > 0, f"--checkpoint-s {ckpt:g} must be positive"),
        (args.turnaround_days is None or args.turnaround_days >= 0, "--turnaround-days cannot be negative"),
        (args.every > 0, f"--every {args.every:g} must be positive"),
    )  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise FleetInputError(message)
    return FleetOptions(
        base_rate_per_gpu_day=settings.fleet_failure_rate_per_gpu_day, level=args.level,
        long_window_days=args.days, job_gpus=job, checkpoint_interval_s=ckpt, service_level=args.service_level,
        turnaround_days=args.turnaround_days,
    )  # fmt: skip


def read_live(settings: Settings) -> LiveRisk | None:
    """Every GPU's newest risk from Redis (None when Redis holds none); FleetInputError when it cannot be read."""
    import redis

    from gpuwatch.sinks.risk_client import RiskClient

    try:
        with RiskClient(settings.redis_url, stale_after_s=settings.stale_after_s) as client:
            records = client.fleet()
            horizon = client.horizon_s() if records else None
    except redis.RedisError as exc:
        raise LiveUnavailable(f"cannot read live risk from {redact_url(settings.redis_url)} ({exc}); check "
                              "redis_url and that Redis is up, or pass --no-live") from None  # fmt: skip
    if not records:
        return None
    return LiveRisk.from_records(records, horizon or 3600.0)


def read_history(args: argparse.Namespace, live: LiveRisk | None) -> FailureHistory | None:
    """The history named by --history (None without one); HistoryError names what is wrong."""
    if not args.history:
        return None
    from gpuwatch.archive.reader import is_archive

    if is_archive(args.history):
        gpus, models = _fleet(args, live)
        return read_archive(
            args.history, gpus=gpus, gpu_model=models,
            start_ts=parse_time(args.since, "--since") if args.since else None,
            end_ts=parse_time(args.until, "--until") if args.until else None,
        )  # fmt: skip
    path = Path(args.history)
    if path.is_dir():
        history = read_simulation(path)
        if args.since or args.until:
            start = parse_time(args.since, "--since") if args.since else history.start_ts
            end = parse_time(args.until, "--until") if args.until else history.end_ts
            history = history.window(max(start, history.start_ts), min(end, history.end_ts))
        return history
    if not args.since:
        raise HistoryError(f"--history {path} is a JSONL file: give --since, the time it starts covering "
                           "(unix seconds or ISO date)")  # fmt: skip
    start = parse_time(args.since, "--since")
    end = parse_time(args.until, "--until") if args.until else time.time()
    gpus, models = _fleet(args, live)
    return read_history_file(path, gpus=gpus, start_ts=start, end_ts=end, gpu_model=models)


def _fleet(
    args: argparse.Namespace, live: LiveRisk | None
) -> tuple[tuple[tuple[str, int], ...], dict[str, str]]:
    """The fleet of a history that does not name it: --inventory, else the GPUs with live risk."""
    if args.inventory:
        return read_inventory(args.inventory)
    return (live.gpus if live is not None else ()), {}


def compute(args: argparse.Namespace, settings: Settings, opts: FleetOptions) -> dict[str, Any]:
    """One fleet view from the inputs the arguments name."""
    use_live = not args.no_live and bool(settings.redis_url)
    live = read_live(settings) if use_live else None
    history = read_history(args, live)
    if history is None and live is None:
        hint = ("give --history (a `gpuwatch simulate` folder, labels or outcomes JSONL) or set redis_url for live "
                "risk")  # fmt: skip
        if use_live:
            raise LiveUnavailable(
                f"nothing to learn from: Redis holds no risk yet and no --history was given; {hint}"
            )
        raise FleetInputError(f"nothing to learn from: {hint}")
    view = fleet_view(history, live, opts)
    view["computed_at"] = time.time()
    return view


def _write(view: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_bytes(
            orjson.dumps(view, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
    if args.report:
        from gpuwatch.apps.report import render_fleet_report

        render_fleet_report(view, args.report)


def serve(args: argparse.Namespace, settings: Settings, opts: FleetOptions) -> int:
    """Recompute the view every --every s and export it until SIGTERM or SIGINT. Bad inputs stop it before the
    first view; Redis away or still empty is waited for; a later failure keeps the last view exported (and its
    gpuwatch_fleet_last_update_timestamp_seconds ages)."""
    from gpuwatch.metrics import export_fleet_view, start_metrics_server

    if not settings.fleet_metrics_port:
        raise FleetInputError(
            "--serve needs fleet_metrics_port (GPUWATCH_FLEET_METRICS_PORT), the port to export on"
        )
    server = start_metrics_server(settings.fleet_metrics_port, settings.metrics_host, "fleet")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    exported = False
    try:
        while True:
            try:
                view = compute(args, settings, opts)
            except LiveUnavailable as exc:
                log.warning("fleet view not updated, retrying in %g s: %s", args.every, exc)
            except (FleetInputError, HistoryError) as exc:
                if not exported:
                    raise
                log.warning("fleet view not updated, keeping the last one: %s", exc)
            else:
                export_fleet_view(view, view["computed_at"])
                _write(view, args)
                exported = True
            if stop.wait(args.every):
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.shutdown()
    return 0


def fleet_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        opts = options(args, settings)
        if args.report:
            from gpuwatch.apps.report import ReportUnavailable, require_matplotlib

            try:
                require_matplotlib()  # say so now, not after reading the inputs
            except ReportUnavailable as exc:
                raise FleetInputError(str(exc)) from None
        if args.serve:
            return serve(args, settings, opts)
        view = compute(args, settings, opts)
        _write(view, args)
    except (FleetInputError, HistoryError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    print(format_view(view))
    return 0
