"""`gpuwatch bench WHAT`: dispatch to one benchmark module per subject."""

from __future__ import annotations

import argparse
import sys


def bench_command(args: argparse.Namespace) -> int:
    if args.gpus < 0 or not args.seconds >= 0:  # 0: the benchmark's default
        print(f"gpuwatch bench {args.what}: --gpus {args.gpus} --seconds {args.seconds:g}: give a fleet size and a "
              "duration of 0 or more (0: the benchmark's default)", file=sys.stderr)  # fmt: skip
        return 2
    if args.what == "stream":
        from gpuwatch.apps.bench.stream import run_stream_bench

        run_stream_bench(args)
        return 0
    if args.what == "agent":
        from gpuwatch.apps.bench.agent import run_agent_bench

        figures = run_agent_bench(args.json_path, seconds=args.seconds or 60.0, gpus=args.gpus or 8,
                                  real_nvml=args.real_nvml)  # fmt: skip
        return 0 if figures["snapshots_invalid"] == 0 and figures["exit_code"] == 0 else 1
    if args.what == "gpu":
        from gpuwatch.apps.bench.gpu import GpuCheckUnavailable, run_gpu_check

        try:
            figures = run_gpu_check(args.json_path, seconds=args.seconds or 40.0)
        except GpuCheckUnavailable as exc:
            print(f"gpuwatch bench gpu: {exc}", file=sys.stderr)
            return 3
        ok = figures["nvml"]["contract_ok"] and figures["cuda"]["threshold_side_disagreements"] == 0
        return 0 if ok and figures["agent"]["snapshots_invalid"] == 0 else 1
    if args.what == "score":
        from gpuwatch.apps.bench.score import run_score_bench

        run_score_bench(args)
        return 0
    if args.what == "archive" and args.live:
        from gpuwatch.apps.bench.archive_live import archive_live_ok, bad_args, run_archive_live_bench

        if bad := bad_args(args):
            print(f"gpuwatch bench archive --live: {bad}", file=sys.stderr)
            return 2
        return 0 if archive_live_ok(run_archive_live_bench(args)) else 1
    if args.what == "archive":
        from gpuwatch.apps.bench.archive import run_archive_bench

        run_archive_bench(args)
        return 0
    if args.what == "simulate":
        from gpuwatch.apps.bench.table import emit
        from gpuwatch.simulator.fleet import bench_simulator

        figures = bench_simulator(hosts=max(1, (args.gpus or 512) // 8))
        emit("gpuwatch bench simulate", [(k, v, "") for k, v in figures.items()], figures, args.json_path)
        return 0
    if args.what == "decode":
        from gpuwatch.apps.bench.table import emit
        from gpuwatch.schemas.bench import bench_decode

        figures = bench_decode()
        emit("gpuwatch bench decode", [(k, v, "") for k, v in figures.items()], figures, args.json_path)
        return 0
    if args.what == "forecast":
        from gpuwatch.apps.bench.forecast import run_forecast_bench

        figures = run_forecast_bench(args.json_path, hosts=max(1, (args.gpus or 512) // 8))
        return 0 if figures["hits"] >= 9 else 1
    if args.what == "codecs":
        from gpuwatch.apps.bench.codecs import run_codecs_bench
        from gpuwatch.apps.bench.table import emit

        figures = run_codecs_bench()
        notes = {"risk_emit_us_per_record": "RiskProcessor.emit: the worker's per-record step, 2,048 GPUs",
                 "samples_decode_us_per_gpu_sample": "decode_snapshot, 8-GPU message, typed fast path",
                 "samples_decode_unknown_field_us_per_gpu_sample": "the same with a field it does not know",
                 "risk_encode_us_per_record": "Risk(...) + encode_risk(validate=False): the stream worker",
                 "risk_encode_validated_us_per_record": "encode_risk with its contract check",
                 "risk_encode_dict_orjson_us_per_record": "the worker's path before: dict literal + orjson",
                 "risk_decode_us_per_record": "decode_risk: the sinks' path"}  # fmt: skip
        emit("gpuwatch bench codecs (best of 5, one core)", [(k, v, notes.get(k, "")) for k, v in figures.items()],
             figures, args.json_path)
        return 0
    if args.what == "explain":
        from gpuwatch.apps.bench.explain import run_explain_bench

        run_explain_bench(args)
        return 0
    if args.what == "reliability":
        from gpuwatch.apps.bench.reliability import run_reliability_bench

        figures = run_reliability_bench(args)
        closed = figures["unaccounted"] == 0 and figures["downstream_unaccounted"] == 0
        return 0 if closed and figures["faults_survived"] == figures["faults_injected"] else 1
    if args.what == "soak":
        from gpuwatch.apps.bench.soak import run_soak_bench

        return 0 if run_soak_bench(args)["passed"] else 1
    raise SystemExit(f"gpuwatch bench: unknown benchmark {args.what!r}")
