"""`gpuwatch score`: offline scoring of recorded snapshots with exactly the stream worker's code.

The live worker folds small batches (a fraction of a second of telemetry) and scores a GPU at its first
sample at least `rescore_interval_s` after its last scoring. A file read in large batches would score each
GPU only once per batch, so the replay cuts batches at `REPLAY_SPAN_S` of sample time: every GPU is scored
at the same samples, with the same features and model, as a live worker at 1 Hz would have scored it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import orjson

from gpuwatch.config import Settings
from gpuwatch.schemas.codecs import (
    DecodeError,
    Snapshot,
    decode_snapshot,
    encode_remediation,
    make_deadletter,
)
from gpuwatch.sinks.policy import PolicyRules, RemediationPolicy
from gpuwatch.streams.model import ModelError, Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, Inbound, RiskProcessor

REPLAY_SPAN_S = 1.0  # sample time per replayed batch: one step of a 1 Hz fleet, like a live sub-second batch


def iter_chunks(
    input_path: Path, span_s: float, max_snapshots: int = 4096, stage: str = "score"
) -> Iterator[tuple[list[Snapshot], list[Inbound], list[bytes], int]]:
    """Decoded snapshots in file order, cut whenever `span_s` of sample time has passed since a chunk's first.

    Yields (snapshots, their sources, dead letters of undecodable lines, lines read).
    """
    snaps: list[Snapshot] = []
    sources: list[Inbound] = []
    dead: list[bytes] = []
    lines = 0
    start_ts = -np.inf
    with open(input_path, "rb") as fh:
        for lineno, line in enumerate(fh):
            if not line.strip():
                continue
            raw = line.rstrip(b"\n")
            try:
                snap = decode_snapshot(raw)
            except DecodeError as exc:
                dead.append(make_deadletter(raw, str(exc), topic=str(input_path), partition=0, offset=lineno,
                                            stage=stage))  # fmt: skip
                continue
            if snaps and (snap.ts - start_ts >= span_s or len(snaps) >= max_snapshots):
                yield snaps, sources, dead, lines
                snaps, sources, dead, lines = [], [], [], 0
            if not snaps:
                start_ts = snap.ts
            snaps.append(snap)
            sources.append(Inbound(raw, str(input_path), 0, lineno))
            lines += 1
    if snaps or dead:
        yield snaps, sources, dead, lines


def replay(input_path: Path, processor: RiskProcessor) -> Iterator[BatchResult]:
    """Feed a recording through `processor` on the live cadence; yields each chunk's result."""
    span = min(REPLAY_SPAN_S, processor.rescore_interval_s)
    for snaps, sources, dead, _ in iter_chunks(input_path, span, stage=processor.stage):
        result = BatchResult(deadletters=dead)
        if snaps:
            processor.fold(snaps, sources, result)
        yield result


def score_command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Scores a recording as the stream would (risk at the settings' fleet failure rate, the model's operating
    points unless the settings override them); with --actions, also replays the remediation policy."""
    settings = settings or Settings()
    if not Path(args.input).is_file():
        print(f"gpuwatch score: --input {args.input} is not a file; pass a JSONL of gpuwatch.samples/1 snapshots "
              "(e.g. `gpuwatch simulate --out DIR` writes DIR/samples.jsonl)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        scorer = Scorer(load_artifact(args.model or None), device=args.device)
    except ModelError as exc:
        print(f"gpuwatch score: {exc}", file=sys.stderr)
        return 2
    processor = RiskProcessor.from_settings(scorer, settings, rescore_interval_s=args.rescore_interval, stage="score")
    policy = RemediationPolicy(PolicyRules.from_settings(settings)) if args.actions else None
    t0 = time.time()
    samples = scored = rejected = actions = 0
    last_report = 0.0
    deadletter_path = Path(args.output).with_suffix(".deadletter.jsonl")
    with ExitStack() as files:
        out = files.enter_context(open(args.output, "wb"))
        dl = files.enter_context(open(deadletter_path, "wb"))
        act = files.enter_context(open(args.actions, "wb")) if args.actions else None
        for result in replay(Path(args.input), processor):
            samples += result.samples
            scored += len(result.risk)
            rejected += len(result.deadletters)
            out.writelines(v + b"\n" for _, v in result.risk)
            dl.writelines(v + b"\n" for v in result.deadletters)
            if policy is not None and act is not None and result.risk:
                recs = [orjson.loads(v) for _, v in result.risk]
                events = policy.observe(recs, max(r["ts"] for r in recs))  # the recording's clock
                act.writelines(encode_remediation(e) + b"\n" for e in events)
                actions += len(events)
            elapsed = time.time() - t0
            if elapsed - last_report >= 1.0:
                last_report = elapsed
                sys.stderr.write(f"\rscored {samples:,} GPU-samples ({samples / max(elapsed, 1e-9):,.0f}/s), "
                                 f"{scored:,} risk records")  # fmt: skip
                sys.stderr.flush()
    elapsed = time.time() - t0
    sys.stderr.write("\n")
    rate = samples / max(elapsed, 1e-9)
    print(f"{samples:,} GPU-samples in {elapsed:.1f} s = {rate:,.0f} GPU-samples/s; "
          f"{scored:,} risk records to {args.output}; {rejected} dead letters to {deadletter_path}"
          + (f"; {actions} remediation events to {args.actions}" if args.actions else ""))  # fmt: skip
    if args.json:
        summary = {"gpu_samples": samples, "seconds": round(elapsed, 3), "gpu_samples_per_s": round(rate),
                   "risk_records": scored, "deadletters": rejected, "model": processor.model_version,
                   "rescore_interval_s": processor.rescore_interval_s, "operating_point": processor.alarm_op.name,
                   "remediation_events": actions if args.actions else None}  # fmt: skip
        Path(args.json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return 0
