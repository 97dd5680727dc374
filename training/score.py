"""`gpuwatch score`: offline scoring of recorded snapshots with exactly the stream worker's code.

The live worker folds small batches (a fraction of a second of telemetry) and scores a GPU at its first
sample at least `rescore_interval_s` after its last scoring. A file read in large batches would score each
GPU only once per batch, so the replay cuts a batch before a host's second snapshot in it (`ChunkCuts`):
every GPU is scored at the same samples, with the same features and model, as a live worker that sees one
snapshot of a host per batch would have scored it.
`--workers N` splits the recording by host over N processes (training.score_shards) and writes the same
records; `replay_messages` replays snapshots from anywhere else (training.fleet_replay: a simulator in memory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import orjson

from gpuwatch.config import Settings
from gpuwatch.schemas.codecs import (
    DecodeError,
    Snapshot,
    decode_risk,
    decode_snapshot,
    encode_remediation,
    make_deadletter,
)
from gpuwatch.schemas.records import Remediation, Risk
from gpuwatch.sinks.policy import PolicyRules, RemediationPolicy
from gpuwatch.streams.model import ModelError, Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, Inbound, RiskProcessor
from gpuwatch.training.dataset import DeadLetterCount
from gpuwatch.training.recording import typical_interval_s

# Read buffer for recordings of snapshots (about 6 KB a line at 8 GPUs): 1 MiB instead of Python's 8 KiB reads
# them about three times as fast.
READ_BUFFER = 1 << 20
REPLAY_SPAN_S = 60.0  # longest sample time one replayed batch spans (a batch never holds a host twice)


class ChunkCuts:
    """Where the replay cuts batches: before a snapshot `span_s` or more after its batch's first, or once a batch
    holds `max_snapshots`, or (`by_host`) before a second snapshot of a host already in the batch. Fed the ts
    (and host) of every decoded snapshot in order, so that the sharded scorer (training.score_shards) cuts a
    recording exactly where one process does.

    Cut by host, every GPU is folded and scored exactly as a live worker that sees one snapshot of a host per
    batch would: a GPU's scoring depends only on its own samples, and its peers are in the same snapshot. (The
    1 s cut it replaced folded two snapshots of a host less than 1 s apart into one batch, so such a GPU could
    be scored one sample later than live.) Batches then hold a whole sampling interval of the fleet (30 s at 30 s sampling) instead
    of the hosts that happen to report in one second, which is what made slow fleets replay at a few thousand
    GPU-samples per second."""

    def __init__(self, span_s: float, max_snapshots: int = 4096, by_host: bool = False) -> None:
        self.span_s = span_s
        self.max_snapshots = max_snapshots
        self.by_host = by_host
        self.start_ts = -np.inf
        self.held = 0  # snapshots in the open batch
        self.hosts: set[str] = set()

    def cut_before(self, ts: float, host: str = "") -> bool:
        """Whether the snapshot at `ts` (of `host`) starts a new batch (never the first one); counts it in."""
        cut = self.held > 0 and (
            ts - self.start_ts >= self.span_s or self.held >= self.max_snapshots or (self.by_host and host in self.hosts)
        )
        if cut or not self.held:
            self.start_ts, self.held = ts, 0
            self.hosts.clear()
        self.held += 1
        if self.by_host:
            self.hosts.add(host)
        return cut


def observe_in_time(policy: RemediationPolicy, records: list[Risk]) -> list[Remediation]:
    """Feeds a replayed batch's risk records to `policy` in ts order, each at its own ts as the clock (a sink
    with no lag): a batch spans up to a sampling interval, and a clock at its end would act late."""
    events: list[Remediation] = []
    group: list[Risk] = []
    for rec in sorted(records, key=lambda r: r.ts):
        if group and rec.ts != group[0].ts:
            events += policy.observe(group, group[0].ts)
            group = []
        group.append(rec)
    if group:
        events += policy.observe(group, group[0].ts)
    return events


def file_messages(input_path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) of every non-blank line of a JSONL recording."""
    # isspace() is strip()'s test for a blank line, without copying the line.
    with open(input_path, "rb", buffering=READ_BUFFER) as fh:
        for lineno, line in enumerate(fh):
            if not line.isspace():
                yield lineno, line[:-1] if line.endswith(b"\n") else line


def chunk_messages(
    messages: Iterable[tuple[int, bytes]], topic: str, span_s: float, max_snapshots: int = 4096,
    stage: str = "score", by_host: bool = False,
) -> Iterator[tuple[list[Snapshot], list[Inbound], list[bytes], int]]:  # fmt: skip
    """Decoded snapshots in order, cut by `ChunkCuts`; (offset, raw message) in, `topic` names the source.

    Yields (snapshots, their sources, dead letters of undecodable messages, messages read).
    """
    cuts = ChunkCuts(span_s, max_snapshots, by_host)
    snaps: list[Snapshot] = []
    sources: list[Inbound] = []
    dead: list[bytes] = []
    lines = 0
    for offset, raw in messages:
        try:
            snap = decode_snapshot(raw)
        except DecodeError as exc:
            dead.append(make_deadletter(raw, str(exc), topic=topic, partition=0, offset=offset, stage=stage))
            continue
        if cuts.cut_before(snap.ts, snap.host):
            yield snaps, sources, dead, lines
            snaps, sources, dead, lines = [], [], [], 0
        snaps.append(snap)
        sources.append(Inbound(raw, topic, 0, offset))
        lines += 1
    if snaps or dead:
        yield snaps, sources, dead, lines


def iter_chunks(
    input_path: Path, span_s: float, max_snapshots: int = 4096, stage: str = "score"
) -> Iterator[tuple[list[Snapshot], list[Inbound], list[bytes], int]]:
    """`chunk_messages` over the lines of a recording (dead letters name the file and the line number)."""
    return chunk_messages(file_messages(input_path), str(input_path), span_s, max_snapshots, stage)


def replay(input_path: Path, processor: RiskProcessor) -> Iterator[BatchResult]:
    """Feed a recording through `processor` on the live cadence; yields each chunk's result."""
    return replay_messages(file_messages(input_path), str(input_path), processor)


def replay_messages(messages: Iterable[tuple[int, bytes]], topic: str, processor: RiskProcessor) -> Iterator[BatchResult]:
    """`replay` for (offset, raw snapshot) pairs from anywhere, e.g. a simulator stepping in memory."""
    cut = chunk_messages(messages, topic, REPLAY_SPAN_S, stage=processor.stage, by_host=True)
    for snaps, sources, dead, _ in cut:
        result = BatchResult(deadletters=dead)
        if snaps:
            processor.fold(snaps, sources, result)
        yield result


def _replay_input(location: str, processor: RiskProcessor) -> Iterator[BatchResult]:
    """`replay` of a JSONL file, or of an archive's snapshots (in time order)."""
    if Path(location).is_file():
        return replay(Path(location), processor)
    return replay_messages(_input_messages(location), f"{location.rstrip('/')}/samples", processor)


def _input_messages(location: str) -> Iterator[tuple[int, bytes]]:
    """(offset, raw snapshot) of a JSONL file's lines, or of an archive's snapshots in time order."""
    if Path(location).is_file():
        return file_messages(Path(location))
    from gpuwatch.archive.reader import ArchiveReader

    return ArchiveReader(location).snapshot_messages()


def is_archive(location: str) -> bool:
    from gpuwatch.archive.reader import is_archive as _is_archive

    return _is_archive(location)


def available_cpus() -> int:
    """CPUs this process may run on (the default number of scoring workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _bad_score_args(args: argparse.Namespace) -> str:
    """What is wrong with the command line, in one line, or ""."""
    if not Path(args.input).is_file() and not is_archive(args.input):
        return (f"--input {args.input} is neither a file nor an archive; record one with `gpuwatch simulate --out DIR` "
                "(DIR/samples.jsonl) or pass a `gpuwatch archive` location")
    for name in ("output", "actions"):
        path = getattr(args, name, "")
        if path and not Path(path).resolve().parent.is_dir():
            return f"--{name} {path}: folder {Path(path).resolve().parent} does not exist"
    if args.workers < 0:
        return f"--workers must be 0 (one per CPU) or more, got {args.workers}"
    if not args.rescore_interval > 0:
        return f"--rescore-interval must be > 0 s, got {args.rescore_interval}"
    return ""


def score_command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Scores a recording as the stream would (risk at the settings' fleet failure rate, the model's operating
    points unless the settings override them); with --actions, also replays the remediation policy."""
    settings = settings or Settings()
    problem = _bad_score_args(args)
    if problem:
        print(f"gpuwatch score: {problem}", file=sys.stderr)
        return 2
    archived = not Path(args.input).is_file()
    workers = 1 if archived else args.workers or available_cpus()
    if archived and args.workers > 1:
        sys.stderr.write("gpuwatch score: an archive is scored in one process (--workers applies to JSONL files)\n")
    try:
        scorer = Scorer(load_artifact(args.model or None), device=args.device)
    except ModelError as exc:
        print(f"gpuwatch score: {exc}", file=sys.stderr)
        return 2
    if note := scorer.artifact.slow_sampling_note(args.input, typical_interval_s(_input_messages(args.input))):
        print(f"gpuwatch score: warning: {note}", file=sys.stderr)
    # What the stream would run: operating points (with the settings' overrides), risk at the fleet's rate.
    processor = RiskProcessor.from_settings(scorer, settings, rescore_interval_s=args.rescore_interval, stage="score")
    decisions = {"alarm_op": processor.alarm_op, "drain_op": processor.drain_op,
                 "failures_per_gpu_day": settings.fleet_failure_rate_per_gpu_day}  # fmt: skip
    progress = _ProgressLine()
    deadletter_path = Path(args.output).with_suffix(".deadletter.jsonl")
    if workers > 1:
        from gpuwatch.training.score_shards import ShardError, score_sharded

        try:
            totals = score_sharded(
                Path(args.input), Path(args.output), deadletter_path, workers=workers, model=args.model,
                device=args.device, rescore_interval_s=args.rescore_interval,
                progress=lambda t: progress(t.samples, t.records),
                say=lambda line: sys.stderr.write(f"\ngpuwatch score: {line}\n"), decisions=decisions,
            )  # fmt: skip
        except ShardError as exc:
            print(f"\ngpuwatch score: {exc}", file=sys.stderr)
            return 1
        samples, scored, rejected = totals.samples, totals.records, totals.deadletters
    else:
        import torch

        torch.set_num_threads(1)  # as each worker and the stream worker: a second thread mostly waits
        samples, scored, rejected = _score_here(args.input, processor, Path(args.output), deadletter_path,
                                                progress)
    rules = PolicyRules.from_settings(settings, fleet_guards=False)  # a replay of a simulated fleet: see there
    actions = replay_actions(Path(args.output), Path(args.actions), rules) if args.actions else 0
    elapsed = time.time() - progress.t0
    sys.stderr.write("\n")
    dead = first_deadletter(deadletter_path, rejected)
    if dead.lines:
        sys.stderr.write(f"gpuwatch score: {dead.describe()} to {deadletter_path}\n")
    rate = samples / max(elapsed, 1e-9)
    print(f"{samples:,} GPU-samples in {elapsed:.1f} s = {rate:,.0f} GPU-samples/s; "
          f"{scored:,} risk records to {args.output}; {rejected} dead letters to {deadletter_path}"
          + (f"; {actions} remediation events to {args.actions}" if args.actions else ""))  # fmt: skip
    if args.json:
        summary = {"gpu_samples": samples, "seconds": round(elapsed, 3), "gpu_samples_per_s": round(rate),
                   "risk_records": scored, "deadletters": rejected, "deadletter_first": dead.first,
                   "model": scorer.version,
                   "rescore_interval_s": args.rescore_interval, "workers": workers,
                   "operating_point": processor.alarm_op.name,
                   "remediation_events": actions if args.actions else None}  # fmt: skip
        Path(args.json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return 0


def first_deadletter(path: Path, lines: int) -> DeadLetterCount:
    """`lines` dead letters written to `path`, with the first one's line and reason."""
    dead = DeadLetterCount()
    if lines:
        with open(path, "rb") as fh:
            dead.add([fh.readline().rstrip(b"\n")])
    dead.lines = lines
    return dead


def replay_actions(risk_path: Path, actions_path: Path, rules: PolicyRules) -> int:
    """Feeds the risk records of `risk_path` (in file order: time order per batch) through the remediation policy
    on the recording's clock (each record is fresh when it arrives) and writes the events to `actions_path`;
    returns how many."""
    policy = RemediationPolicy(rules)
    n = 0
    with open(risk_path, "rb") as fh, open(actions_path, "wb") as out:
        for line in fh:
            rec = decode_risk(line)
            for event in policy.observe([rec], rec.ts):
                out.write(encode_remediation(event) + b"\n")
                n += 1
    return n


class _ProgressLine:
    """The progress line on stderr, at most once a second."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.last = 0.0

    def __call__(self, samples: int, scored: int) -> None:
        elapsed = time.time() - self.t0
        if elapsed - self.last >= 1.0:
            self.last = elapsed
            sys.stderr.write(f"\rscored {samples:,} GPU-samples ({samples / max(elapsed, 1e-9):,.0f}/s), "
                             f"{scored:,} risk records")  # fmt: skip
            sys.stderr.flush()


def _score_here(
    input_path: str, processor: RiskProcessor, output: Path, deadletter_path: Path, progress: _ProgressLine
) -> tuple[int, int, int]:
    """One process: (GPU-samples, risk records, dead letters)."""
    samples = scored = rejected = 0
    with open(output, "wb") as out, open(deadletter_path, "wb") as dl:
        for result in _replay_input(input_path, processor):
            samples += result.samples
            scored += len(result.risk)
            rejected += len(result.deadletters)
            out.writelines(v + b"\n" for _, v in result.risk)
            dl.writelines(v + b"\n" for v in result.deadletters)
            progress(samples, scored)
    return samples, scored, rejected
