"""The `gpuwatch` command. Each subcommand imports only what it needs, so the agent starts fast."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gpuwatch.config import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(getattr(args, "config", None), **overrides)


def cmd_demo(args: argparse.Namespace) -> int:
    from gpuwatch.apps.demo import DemoOptions, run_demo

    opts = DemoOptions(
        gpus=args.gpus,
        duration_s=args.duration,
        history_min=args.history_min,
        failures=args.failures,
        seed=args.seed,
        summary_json=Path(args.summary_json) if args.summary_json else None,
        report=Path(args.report) if args.report else None,
    )
    if opts.report is not None:
        from gpuwatch.apps.report import ReportUnavailable, require_matplotlib

        try:
            require_matplotlib()  # say so now, not after the run
        except ReportUnavailable as exc:
            print(f"gpuwatch demo: {exc}", file=sys.stderr)
            return 2
    return run_demo(_settings(args), opts)


def cmd_stream(args: argparse.Namespace) -> int:
    from gpuwatch.streams.app import run_worker

    settings = _settings(args)
    if not settings.kafka_bootstrap:
        raise ConfigError("gpuwatch stream needs GPUWATCH_KAFKA_BOOTSTRAP (or kafka_bootstrap in the config file)")
    run_worker(settings, loglevel=args.loglevel, decode_only=args.decode_only)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from gpuwatch.simulator.fleet import simulate_to_dir

    out = Path(args.out)

    def progress(frac: float) -> None:
        sys.stderr.write(f"\rsimulating {args.hosts}x{args.gpus_per_host} GPUs for {args.days} days: {frac:6.1%}")
        sys.stderr.flush()

    overrides = {"rate_scale": args.rate_scale, "repair_time_scale": args.repair_time_scale}
    stats = simulate_to_dir(
        args.hosts, args.gpus_per_host, args.days, out, seed=args.seed, interval_s=args.interval,
        config_overrides=overrides, progress=progress,
    )
    sys.stderr.write("\n")
    print(
        f"wrote {stats['gpu_samples']:,} GPU-samples and {stats['failures']} failures to {out} "
        f"in {stats['seconds']:.1f} s ({stats['gpu_samples_per_s']:,.0f} GPU-samples/s)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gpuwatch.training.cli import train_command

    return train_command(args, _settings(args))


def cmd_federated(args: argparse.Namespace) -> int:
    from gpuwatch.training.federated import FederatedError, join_command, serve_command, simulate_command

    run = {"serve": serve_command, "join": join_command, "simulate": simulate_command}[args.federated_command]
    try:
        return run(args) if run is join_command else run(args, _settings(args))
    except FederatedError as exc:
        print(f"gpuwatch federated {args.federated_command}: {exc}", file=sys.stderr)
        return 2


def cmd_score(args: argparse.Namespace) -> int:
    from gpuwatch.memory import spare_startup_heap_from_gc
    from gpuwatch.training.score import score_command

    spare_startup_heap_from_gc()  # as the stream worker does: the same decode-heavy loop
    return score_command(args, _settings(args))


def cmd_eval(args: argparse.Namespace) -> int:
    from gpuwatch.training.eval_cli import eval_command

    if not args.report:
        return eval_command(args, _settings(args))
    from gpuwatch.apps.report import ReportUnavailable, render_eval_report, require_matplotlib

    try:
        require_matplotlib()  # now, not after an hour of scoring
    except ReportUnavailable as exc:
        print(f"gpuwatch eval: --report {args.report}: {exc}", file=sys.stderr)
        return 2
    return eval_command(args, _settings(args), render=lambda out: render_eval_report(out, args.report))


def cmd_realrate(args: argparse.Namespace) -> int:
    from gpuwatch.training.real_rate import realrate_command

    return realrate_command(args, _settings(args))


def cmd_sink(args: argparse.Namespace) -> int:
    from gpuwatch.sinks.service import run_sinks

    return run_sinks(_settings(args))


def cmd_controller(args: argparse.Namespace) -> int:
    from gpuwatch.controller.worker import run_controller
    from gpuwatch.metrics import start_metrics_server

    settings = _settings(args)
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise ConfigError("gpuwatch controller needs GPUWATCH_KAFKA_BOOTSTRAP and GPUWATCH_REDIS_URL")
    start_metrics_server(settings.controller_metrics_port, settings.metrics_host, "controller")
    run_controller(settings)
    return 0


def cmd_risk(args: argparse.Namespace) -> int:
    import msgspec

    from gpuwatch.sinks.risk_client import RiskClient

    host, colon, gpu = args.target.rpartition(":")  # as Redis members: a host name may hold a colon
    if not colon:
        host, gpu = args.target, ""
    if not host or (colon and not gpu.isdigit()):
        print(f"gpuwatch risk: {args.target!r} is not HOST or HOST:GPU; give e.g. node-0003 or node-0003:5 "
              "(GPU: an index 0, 1, ...)", file=sys.stderr)  # fmt: skip
        return 2
    settings = _settings(args)
    if not settings.redis_url:
        raise ConfigError("gpuwatch risk needs GPUWATCH_REDIS_URL")
    import redis

    from gpuwatch.config import redact_url

    with RiskClient(settings.redis_url, stale_after_s=settings.stale_after_s) as client:
        try:
            answer = client.risk(host, int(gpu)) if colon else client.host_risk(host)
        except redis.RedisError as exc:
            print(f"gpuwatch risk: cannot read {redact_url(settings.redis_url)} ({exc}); check redis_url and "
                  "that Redis is up", file=sys.stderr)  # fmt: skip
            return 1
    if answer is None:
        print(f"no risk recorded for {args.target}", file=sys.stderr)
        return 1
    print(msgspec.json.format(msgspec.json.encode(answer), indent=2).decode())
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from gpuwatch.sinks.top import run_top

    settings = _settings(args)
    if not settings.redis_url:
        raise ConfigError("gpuwatch top needs GPUWATCH_REDIS_URL")
    return run_top(settings, n=args.n, once=args.once, interval_s=args.interval)


def cmd_fleet(args: argparse.Namespace) -> int:
    from gpuwatch.apps.fleet.cli import fleet_command

    return fleet_command(args, _settings(args))


def cmd_policy(args: argparse.Namespace) -> int:
    from gpuwatch.sinks.policy_admin import policy_command

    return policy_command(args, _settings(args))


def cmd_agent(args: argparse.Namespace) -> int:
    from gpuwatch.producers.agent import run_agent
    from gpuwatch.producers.nvml import NvmlUnavailable
    from gpuwatch.producers.spool import SpoolError

    settings = _settings(
        args, agent_interval_s=args.interval, agent_spool_dir=args.spool_dir, agent_metrics_port=args.metrics_port
    )
    nvml = None
    if args.fake_nvml:
        from gpuwatch.simulator.fake_nvml import FakeNvml

        nvml = FakeNvml(args.fake_nvml, live=True)
    try:
        return run_agent(settings, simulate_hosts=args.hosts if args.simulate else 0, nvml=nvml)
    except (NvmlUnavailable, SpoolError) as exc:
        print(f"gpuwatch agent: {exc}", file=sys.stderr)
        return 3


def cmd_archive(args: argparse.Namespace) -> int:
    from gpuwatch.archive.cli import archive_command

    return archive_command(args, _settings(args))


def cmd_label(args: argparse.Namespace) -> int:
    from gpuwatch.archive.cli import label_command

    return label_command(args, _settings(args))


def cmd_labels(args: argparse.Namespace) -> int:
    from gpuwatch.archive.cli import labels_command

    return labels_command(args, _settings(args))


def cmd_model(args: argparse.Namespace) -> int:
    from gpuwatch.apps.model_cli import model_command

    return model_command(args, _settings(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from gpuwatch.apps.bench.cli import bench_command

    if args.what == "throttle":
        from gpuwatch.apps.bench.throttle import bad_args, run_throttle_bench

        if bad := bad_args(args):
            print(f"gpuwatch bench throttle: {bad}", file=sys.stderr)
            return 2
        run_throttle_bench(args, _settings(args))
        return 0
    return bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuwatch", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (default: $GPUWATCH_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole pipeline on an embedded stack with a simulated fleet")
    p.add_argument("--gpus", type=int, default=64, help="simulated GPUs (8 per host)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of live telemetry")
    p.add_argument("--history-min", type=float, default=30.0, help="minutes of history replayed before going live")
    p.add_argument("--failures", type=int, default=3, help="failures injected with precursors")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--summary-json", help="also write the summary as JSON here")
    p.add_argument("--report", metavar="PATH.html",
                   help="write an HTML report: risk over time of the GPUs that failed, remediations, fleet risk "
                        "(needs matplotlib: pip install 'gpuwatch[report]')")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("stream", help="run a stream worker (samples -> risk)")
    p.add_argument("--loglevel", default="warning")
    p.add_argument("--decode-only", action="store_true",
                   help="benchmark ceiling: consume and orjson-decode only (no scoring, nothing produced)")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("simulate", help="fast-forward a simulated fleet to JSONL samples + labels")
    p.add_argument("--hosts", type=int, default=16)
    p.add_argument("--gpus-per-host", type=int, default=8)
    p.add_argument("--days", type=float, default=1.0)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate-scale", type=float, default=1000.0,
                   help="multiplier on the real failure rate (~2e-4 per GPU-day in the StepFun trace); "
                        "1 gives a realistic fleet with almost no failures, 1000 enough to train on")
    p.add_argument("--repair-time-scale", type=float, default=0.02,
                   help="multiplier on real repair times (hours to weeks) so GPUs return within a run")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_simulate)

    from gpuwatch.training.args import add_eval_args, add_federated_args, add_score_args, add_train_args

    p = sub.add_parser("train", help="train a model artifact from recorded samples + labels")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("federated", help="train across sites that share only weights (Flower; docs/federated.md)")
    add_federated_args(p)
    p.set_defaults(func=cmd_federated)

    p = sub.add_parser("score", help="score recorded samples offline with the stream's features and model")
    add_score_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="evaluate the model and two baselines on held-out recordings")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sink", help="run the Redis risk sink and the remediation policy")
    p.set_defaults(func=cmd_sink)

    p = sub.add_parser("controller", help="execute remediation events (dry run by default)")
    p.set_defaults(func=cmd_controller)

    p = sub.add_parser("risk", help="print the risk of HOST or HOST:GPU from Redis")
    p.add_argument("target")
    p.set_defaults(func=cmd_risk)

    p = sub.add_parser("top", help="live view of the riskiest GPUs")
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("fleet", help="fleet reliability: MTBF by mode, model and host, failures expected in the "
                       "next 24 h and 7 days, job interruption, spares (--serve: to Prometheus)")
    from gpuwatch.apps.fleet.args import add_fleet_args

    add_fleet_args(p)
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("policy", help="the remediation policy's guard rails: status, reset-breaker, "
                       "clear-escalation, drill")
    policy = p.add_subparsers(dest="policy_command", required=True)
    q = policy.add_parser("status", help="breaker, escalations, incident, maintenance windows, pools, kill switch")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q = policy.add_parser("reset-breaker", help="close the circuit breaker and empty its window (audited)")
    q.add_argument("--note", required=True, help="who resets it and why, for the audit log ('alice: rack 12 fixed')")
    q = policy.add_parser("clear-escalation", help="close a host's escalation, forget its remediations (audited)")
    q.add_argument("host")
    q.add_argument("--note", required=True, help="who clears it and why, for the audit log")
    q = policy.add_parser("drill", help="feed correlated high risk to the policy (in memory): where does it trip?")
    q.add_argument("--fleet-hosts", type=int, default=100, help="hosts in the simulated fleet")
    q.add_argument("--rack-hosts", type=int, default=10, help="hosts of the rack whose cooling fails")
    q.add_argument("--gpus-per-host", type=int, default=8)
    q.add_argument("--hours", type=float, default=2.0, help="simulated time per scenario")
    q.add_argument("--json", dest="json_path", help="also write the figures here")
    p.set_defaults(func=cmd_policy)

    p = sub.add_parser("agent", help="node agent: sample this node's GPUs (NVML) and publish to Kafka")
    p.add_argument("--simulate", action="store_true", help="publish a simulated fleet instead of NVML")
    p.add_argument("--hosts", type=int, default=8, help="simulated hosts (with --simulate)")
    p.add_argument("--interval", type=float, help="seconds between snapshots (default: agent_interval_s)")
    p.add_argument("--spool-dir", help="on-disk spool directory (default: agent_spool_dir)")
    p.add_argument("--metrics-port", type=int, help="port of /metrics and /healthz; 0 turns them off")
    p.add_argument("--fake-nvml", type=int, default=0, metavar="N",
                   help="sample N stand-in GPUs instead of NVML (benchmarks and tests; not real telemetry)")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("realrate", help="false actions at the real failure rate (healthy fleets in memory, "
                       "look-alikes reweighted), combined with `gpuwatch eval` reports")
    p.add_argument("--eval", action="append", default=[], metavar="EVAL.json",
                   help="a `gpuwatch eval --json` report of failure-rich held-out fleets (repeatable)")
    p.add_argument("--plain-gpu-days", type=float, default=40_000.0, help="GPU-days of the plain healthy fleet")
    p.add_argument("--rich-gpu-days", type=float, default=1_500.0, help="GPU-days of each look-alike-rich fleet")
    p.add_argument("--interval", type=float, default=30.0, help="sampling interval of the healthy fleets (s)")
    p.add_argument("--processes", type=int, default=2, help="processes to simulate and score in")
    p.add_argument("--seed", type=int, default=9100, help="first simulator seed (keep apart from training's)")
    p.add_argument("--model", default="", help="model artifact (default: the shipped one)")
    p.add_argument("--runs-from", default="", metavar="REALRATE.json",
                   help="do not simulate: take the healthy runs' counts from an earlier --json (to combine anew)")
    p.add_argument("--json", default="", help="write the figures here")
    p.set_defaults(func=cmd_realrate)

    archive_help = "folder or fsspec URL of the archive (default: the archive_url setting)"
    p = sub.add_parser("archive", help="archive samples, risk, remediation and outcomes as Parquet (docs/archive.md)")
    p.add_argument("--archive", default="", help=archive_help)
    p.add_argument("--import", dest="import_dir", default="", metavar="DIR",
                   help="do not consume Kafka: archive a `gpuwatch simulate` folder's samples (its labels.jsonl into "
                        "the label store) and exit")
    p.set_defaults(func=cmd_archive)

    p = sub.add_parser("label", help="an operator's label: HOST:GPU failed at a time, or an alarm was false")
    p.add_argument("target", metavar="HOST:GPU")
    p.add_argument("--failed-at", default="", metavar="TS", help="when it failed (unix seconds or ISO 8601)")
    p.add_argument("--mode", default="", help="failure mode: " + ", ".join(m for m in ("memory", "thermal", "power",
                   "interconnect", "sudden")))  # fmt: skip
    p.add_argument("--false-alarm", action="store_true", help="mark an alarm on it as false (with --at)")
    p.add_argument("--at", default="", metavar="TS", help="when the false alarm was")
    p.add_argument("--uuid", default="", help="the GPU's uuid (default: looked up in the archive's samples)")
    p.add_argument("--by", default="", help="who labels it")
    p.add_argument("--note", default="", help="why, in a line")
    p.add_argument("--archive", default="", help=archive_help)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("labels", help="derive failure labels from the archive (derive) or list the versions (show)")
    p.add_argument("action", choices=["derive", "show"])
    p.add_argument("--horizon", type=float, default=3600.0,
                   help="alarms and actions this long before a failure count as about it (s)")
    p.add_argument("--archive", default="", help=archive_help)
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("model", help="model lifecycle: shadow a challenger, compare, promote, rollback, stop, status")
    from gpuwatch.apps.model_args import add_model_args

    add_model_args(p)
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
    p.add_argument("what", choices=["stream", "agent", "simulate", "decode", "codecs", "score", "reliability", "gpu",
                                     "archive", "forecast", "throttle", "explain", "soak"])
    p.add_argument("--json", dest="json_path", help="write the figures here")
    p.add_argument("--gpus", type=int, default=0, help="fleet size (0: the benchmark's default)")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="how long to run (0: default); score: seconds of simulated fleet time")
    p.add_argument("--real-nvml", action="store_true",
                   help="agent: sample this machine's GPUs through the driver instead of stand-in GPUs")
    p.add_argument("--interval", type=float, default=1.0,
                   help="archive --live, soak: seconds between a node's snapshots in the simulated fleet (default 1)")
    p.add_argument("--healthy-gpu-days", type=float, default=0.0,
                   help="throttle: GPU-days of the healthy fleet that counts false throttles (--gpus: failures)")
    p.add_argument("--false-alarms-per-1000", type=float, default=None,
                   help="throttle: false alarm episodes per 1,000 healthy GPU-days at real prevalence (gpuwatch "
                        "realrate's lstm.false_actions.checkpoint.per_1000_gpu_days); omitted: left out, and said")
    p.add_argument("--seed", type=int, default=0, help="throttle: simulator seed")
    p.add_argument("--halt-cut", type=float, default=0.3,
                   help="throttle: the simulator's assumption: a cap cutting this share of a failing GPU's power "
                        "halts its precursor (FleetConfig.throttle_halt_cut)")
    p.add_argument("--throttle-kind", default="power",
                   help="throttle: what the throttle-first arm throttles: power (a power limit of "
                        "policy_throttle_frac, the default) or clocks (an SM clock lock at "
                        "policy_throttle_clock_frac)")
    p.add_argument("--live", action="store_true",
                   help="archive: archive a fleet from the live pipeline (broker, stream worker, archive process) "
                   "and check that eval's replay of the archive gives the live records and figures")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("aiokafka", "faust", "mode", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"gpuwatch: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpuwatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
