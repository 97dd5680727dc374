"""`gpuwatch score --workers N`: one recording scored by N processes, each owning a share of the hosts.

A GPU's window depends only on its own snapshots, and its peer features on the other GPUs of the same
snapshot, that is of the same host: hosts can be scored apart. What ties them together in one process is
the batching. The replay cuts batches before a host's second snapshot (`ChunkCuts`), a GPU is
scored at most once per batch, and a batch's records come out in the order the GPUs were first seen. So
the parent reads the file once, takes each line's host and ts with a light parse (`snapshot_head`), cuts
the batches exactly where one process would, and sends each worker the lines of its hosts with their batch
numbers. Each worker decodes, folds and scores its lines with the stream's `RiskProcessor`, batch by batch,
and keys every record by its batch and by where its GPU was first seen (line, position). The parent merges
the records back into one process's order. The output is byte-identical to `--workers 1` except the wall
times `scored_at` (risk) and `failed_at` (dead letters).

Two things a light parse cannot see are checked during the run; if either occurs, the recording is scored
again with what was learnt, so the output still matches one process:

- a line whose host and ts read but that the codec rejects (one process does not count it when cutting
  batches), or whose full decode reads another host or ts;
- a GPU uuid under two hosts that went to different workers (one process keeps one window per uuid): such
  hosts are then kept on one worker.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpuwatch.memory import spare_startup_heap_from_gc
from gpuwatch.schemas.codecs import (
    MAX_GPUS,
    DecodeError,
    decode_deadletter,
    decode_snapshot,
    make_deadletter,
    snapshot_head,
)
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import MAX_ABS_VALUE, BatchResult, Inbound, RiskProcessor, Scored
from gpuwatch.training.score import REPLAY_SPAN_S, ChunkCuts

BLOCK_LINES = 2048  # lines per block sent to the workers (whole batches only): a few MB of JSON
IN_FLIGHT = 3  # blocks queued per worker ahead of the one it is scoring
MAX_PASSES = 3  # a second pass knows every surprise of the first; a third is never expected
_PHASE_UNDECODABLE, _PHASE_IMPLAUSIBLE, _PHASE_STALE = 0, 1, 2  # the order of one batch's dead letters


class ShardError(RuntimeError):
    """A scoring worker failed or died; the message says which and why."""


@dataclass
class ScoreTotals:
    """What a sharded scoring run produced, for progress lines and the summary."""

    samples: int = 0  # GPU-samples folded into windows
    records: int = 0
    deadletters: int = 0
    lines: int = 0  # lines of the recording read in this pass
    passes: int = 1


def _mapped(fh: Any) -> Any:
    """The file's bytes without reading them into Python objects (an empty file has nothing to map)."""
    size = os.fstat(fh.fileno()).st_size
    return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"")


# ----------------------------------------------------------------------------------------------- worker side


@dataclass
class _Block:
    """One worker's lines of a block: line numbers, where they lie in the file (byte offset, length), batch
    numbers, and the host and ts the parent read. The worker reads the lines itself: no JSON through pipes."""

    block: int
    offsets: np.ndarray
    at: np.ndarray
    length: np.ndarray
    chunks: np.ndarray
    ts: np.ndarray
    hosts: list[str]


@dataclass
class _BlockOut:
    """A worker's records and dead letters for one block, keyed for the parent's merge."""

    block: int
    risk_chunk: list[np.ndarray] = field(default_factory=list)
    risk_key: list[np.ndarray] = field(default_factory=list)  # first line * MAX_GPUS + position of the GPU
    risk: list[bytes] = field(default_factory=list)
    dead_key: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, phase, line)
    dead: list[bytes] = field(default_factory=list)
    samples: int = 0
    # Lines the parent must read differently: None where the codec rejects the line, else its (host, ts).
    surprises: dict[int, tuple[str, float] | None] = field(default_factory=dict)


class _ShardProcessor(RiskProcessor):
    """RiskProcessor for one worker's hosts, remembering which slots each record came from and where every
    GPU was first seen, so the parent can put records back in one process's order."""

    def __init__(self, scorer: Scorer, recording: Any, topic: str, **kwargs: Any) -> None:
        super().__init__(scorer, **kwargs)
        self.recording = recording  # the file's bytes (an mmap)
        self.topic = topic
        self.first_seen = np.zeros(0, dtype=np.int64)  # per slot: line * MAX_GPUS + position
        self.emitted: list[np.ndarray] = []
        self.uuid_hosts: dict[str, set[str]] = {}
        self._host_uuids: dict[str, list[str]] = {}

    def emit(self, scored: Scored, scored_at: float, result: BatchResult) -> None:
        super().emit(scored, scored_at, result)
        self.emitted.append(scored.slots)

    def score_block(self, block: _Block) -> _BlockOut:
        out = _BlockOut(block.block)
        chunks = block.chunks
        if not len(chunks):  # none of this block's lines are this worker's
            return out
        bounds = np.r_[0, np.flatnonzero(np.diff(chunks)) + 1, len(chunks)].tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            self._score_chunk(int(chunks[a]), block, slice(a, b), out)
        return out

    def _score_chunk(self, chunk: int, block: _Block, rows: slice, out: _BlockOut) -> None:
        snaps = []
        sources = []
        recording = self.recording
        for offset, at, length, host, ts in zip(block.offsets[rows].tolist(), block.at[rows].tolist(),
                                                block.length[rows].tolist(), block.hosts[rows],
                                                block.ts[rows].tolist()):  # fmt: skip
            raw = recording[at : at + length]
            try:
                snap = decode_snapshot(raw)
            except DecodeError as exc:
                out.surprises[offset] = None
                out.dead_key.append((chunk, _PHASE_UNDECODABLE, offset))
                out.dead.append(make_deadletter(raw, str(exc), topic=self.topic, partition=0, offset=offset,
                                                stage=self.stage))  # fmt: skip
                continue
            if snap.host != host or snap.ts != ts:
                out.surprises[offset] = (snap.host, snap.ts)
            if self._host_uuids.get(snap.host) != snap.uuids:
                self._host_uuids[snap.host] = snap.uuids
                for u in snap.uuids:
                    self.uuid_hosts.setdefault(u, set()).add(snap.host)
            snaps.append(snap)
            sources.append(Inbound(raw, self.topic, 0, offset))
        if not snaps:
            return
        result = BatchResult()
        known = len(self.store.uuids)
        self.emitted = []
        self.fold(snaps, sources, result)
        # The processor dead-letters a snapshot holding an implausible value whole: it never reached a window.
        implausible = (
            {src.offset for snap, src in zip(snaps, sources) if (np.abs(snap.numeric) > MAX_ABS_VALUE).any()}
            if result.deadletters
            else set()
        )
        self._note_first_seen(known, snaps, sources, implausible)
        if result.risk:
            keys = self.first_seen[np.concatenate(self.emitted)]
            out.risk_chunk.append(np.full(len(keys), chunk, dtype=np.int64))
            out.risk_key.append(keys)
            out.risk += [value for _, value in result.risk]
        for dead in result.deadletters:  # rare: implausible snapshots first, then stale ones, as one process
            offset = decode_deadletter(dead).source.offset
            phase = _PHASE_IMPLAUSIBLE if offset in implausible else _PHASE_STALE
            out.dead_key.append((chunk, phase, offset))
            out.dead.append(dead)
        out.samples += result.samples

    def _note_first_seen(
        self, known: int, snaps: list, sources: list[Inbound], implausible: set[int]
    ) -> None:
        """Key the slots this batch created by the first (line, position) of their GPU: one process numbers
        its slots in that order, and emits each batch's records in slot order."""
        store = self.store
        if len(store.uuids) == known:
            return
        want = {store.uuids[s]: s for s in range(known, len(store.uuids))}
        keys = np.zeros(len(want), dtype=np.int64)
        for snap, src in zip(snaps, sources):
            if src.offset in implausible:  # never reached the windows
                continue
            for pos, uuid in enumerate(snap.uuids):
                s = want.pop(uuid, None)
                if s is not None:
                    keys[s - known] = src.offset * MAX_GPUS + pos
            if not want:
                break
        self.first_seen = np.r_[self.first_seen, keys]


def _worker(
    index: int, input_path: Path, model: str, device: str, rescore_interval_s: float, tasks: Any, results: Any,
    decisions: dict[str, Any] | None = None,
) -> None:
    """A scoring process: blocks in from `tasks` until None, a `_BlockOut` per block out to `results`."""
    try:
        import torch

        torch.set_num_threads(1)  # one process per core
        scorer = Scorer(load_artifact(model or None), device=device)
        with open(input_path, "rb") as fh, _mapped(fh) as recording:
            processor = _ShardProcessor(scorer, recording, str(input_path), rescore_interval_s=rescore_interval_s,
                                        stage="score", **(decisions or {}))  # fmt: skip
            spare_startup_heap_from_gc()
            while (block := tasks.get()) is not None:
                results.put(("block", index, processor.score_block(block)))
            results.put(("done", index, processor.uuid_hosts))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the run
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))


# ----------------------------------------------------------------------------------------------- parent side

_HEAD_BYTES = 512  # schema, host (at most 255 bytes) and ts open a usual snapshot
_BLANK = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() strips


def _lines(recording: Any) -> Iterator[tuple[int, int, int]]:
    """(line number, byte offset, length without the newline) of every non-blank line, numbered and judged
    blank as `training.score.file_messages` does, found without copying the lines."""
    size = len(recording)
    at = lineno = 0
    while at < size:
        end = recording.find(b"\n", at)
        nxt = end + 1 if end >= 0 else size
        end = end if end >= 0 else size
        if recording[at] not in _BLANK or recording[at:nxt].strip():
            yield lineno, at, end - at
        at = nxt
        lineno += 1


def _head(recording: Any, at: int, length: int) -> tuple[str, float] | None:
    """`snapshot_head` from the line's first bytes where they hold schema, host and ts, else from the line."""
    head = snapshot_head(recording[at : at + min(length, _HEAD_BYTES)])
    if head is None and length > _HEAD_BYTES:
        head = snapshot_head(recording[at : at + length])
    return head


class _HostGroups:
    """Hosts that must be scored by one worker (they share a GPU uuid), as a union-find over host names."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, host: str) -> str:
        root = self._parent.get(host, host)
        if root != host:
            root = self._parent[host] = self.find(root)
        return root

    def union(self, hosts: set[str]) -> None:
        first, *rest = sorted(hosts)
        for h in rest:
            a, b = self.find(first), self.find(h)
            if a != b:
                self._parent[b] = a


@dataclass
class _Pass:
    """One pass over the recording with `workers` processes."""

    input_path: Path
    output: Path
    deadletter_path: Path
    workers: int
    model: str
    device: str
    rescore_interval_s: float
    known: dict[int, tuple[str, float] | None]
    groups: _HostGroups
    progress: Callable[[ScoreTotals], None] | None
    totals: ScoreTotals = field(default_factory=ScoreTotals)
    surprises: dict[int, tuple[str, float] | None] = field(default_factory=dict)
    decisions: dict[str, Any] | None = None  # RiskProcessor's operating points and fleet failure rate
    worker_of: dict[str, int] = field(default_factory=dict)  # host group -> worker
    host_worker: dict[str, int] = field(default_factory=dict)  # host -> worker, in this pass

    def run(self) -> dict[str, set[str]]:
        """Score the recording; returns every uuid's hosts, over all workers."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or locks inherited
        results = ctx.Queue()
        tasks = [ctx.Queue(maxsize=IN_FLIGHT) for _ in range(self.workers)]
        procs = [
            ctx.Process(target=_worker, name=f"gpuwatch-score-{i}", daemon=True,
                        args=(i, self.input_path, self.model, self.device, self.rescore_interval_s, tasks[i], results,
                              self.decisions))
            for i in range(self.workers)
        ]  # fmt: skip
        for p in procs:
            p.start()
        pending: dict[int, list[_BlockOut]] = {}
        parent_dead: dict[int, tuple[list[tuple[int, int, int]], list[bytes]]] = {}
        uuid_hosts: dict[str, set[str]] = {}
        state = {"next": 0, "done": 0}
        try:
            with open(self.output, "wb") as out, open(self.deadletter_path, "wb") as dl:

                def handle(msg: tuple[str, int, Any]) -> None:
                    kind, index, payload = msg
                    if kind == "error":
                        raise ShardError(f"scoring worker {index} failed: {payload}")
                    if kind == "done":
                        state["done"] += 1
                        for uuid, hosts in payload.items():
                            uuid_hosts.setdefault(uuid, set()).update(hosts)
                        return
                    pending.setdefault(payload.block, []).append(payload)
                    while len(pending.get(state["next"], ())) == self.workers:
                        b = state["next"]
                        self._write(pending.pop(b), parent_dead.pop(b), out, dl)
                        state["next"] = b + 1

                def put(i: int, item: _Block | None) -> None:
                    while True:
                        try:
                            tasks[i].put(item, timeout=0.5)
                            return
                        except queue.Full:
                            self._drain(results, procs, handle, wait=False)

                for block, parts, dead in self._blocks():
                    parent_dead[block] = dead
                    for i, part in enumerate(parts):
                        put(i, part)
                    self._drain(results, procs, handle, wait=False)
                for i in range(self.workers):
                    put(i, None)
                while state["done"] < self.workers:
                    self._drain(results, procs, handle, wait=True)
        finally:
            for p in procs:
                p.join(timeout=5 if state["done"] == self.workers else 0)
                if p.is_alive():
                    p.terminate()
                    p.join()
        return uuid_hosts

    def _drain(self, results: Any, procs: list, handle: Callable[[Any], None], wait: bool) -> None:
        """Handle the workers' messages that are there (or wait for one); fail if a worker died silently."""
        try:
            handle(results.get(timeout=1.0) if wait else results.get_nowait())
            while True:
                handle(results.get_nowait())
        except queue.Empty:
            pass
        for i, p in enumerate(procs):
            if not p.is_alive() and p.exitcode not in (0, None):
                raise ShardError(f"scoring worker {i} exited with code {p.exitcode}")

    def _blocks(self) -> Any:
        """Yields (block number, one `_Block` per worker, the parent's dead letters): whole batches only."""
        cuts = ChunkCuts(REPLAY_SPAN_S, by_host=True)
        chunk = block = held = 0
        parts = self._empty_parts()
        dead_keys: list[tuple[int, int, int]] = []
        dead: list[bytes] = []
        with open(self.input_path, "rb") as fh, _mapped(fh) as recording:
            for offset, at, length in _lines(recording):
                self.totals.lines += 1
                head = self.known[offset] if offset in self.known else _head(recording, at, length)
                if head is None:
                    head = self._slow_head(offset, recording[at : at + length], chunk, dead_keys, dead)
                    if head is None:
                        continue
                host, ts = head
                if cuts.cut_before(ts, host):
                    chunk += 1
                    if held >= BLOCK_LINES:
                        yield block, self._seal(block, parts), (dead_keys, dead)
                        block, held = block + 1, 0
                        parts = self._empty_parts()
                        dead_keys, dead = [], []
                part = parts[self._worker_for(host)]
                part[0].append(offset)
                part[1].append(at)
                part[2].append(length)
                part[3].append(chunk)
                part[4].append(ts)
                part[5].append(host)
                held += 1
        yield block, self._seal(block, parts), (dead_keys, dead)

    def _slow_head(
        self, offset: int, raw: bytes, chunk: int, dead_keys: list[tuple[int, int, int]], dead: list[bytes]
    ) -> tuple[str, float] | None:
        """Host and ts by the full decode, for a line the light parse could not read (or a known surprise);
        None, and its dead letter, where the codec rejects it."""
        try:
            snap = decode_snapshot(raw)
        except DecodeError as exc:
            dead_keys.append((chunk, _PHASE_UNDECODABLE, offset))
            dead.append(make_deadletter(raw, str(exc), topic=str(self.input_path), partition=0, offset=offset,
                                        stage="score"))  # fmt: skip
            return None
        return snap.host, snap.ts

    def _worker_for(self, host: str) -> int:
        w = self.host_worker.get(host)
        if w is None:
            group = self.groups.find(host)
            w = self.worker_of.get(group)
            if w is None:  # round robin in order of first appearance: balanced host counts
                w = self.worker_of[group] = len(self.worker_of) % self.workers
            self.host_worker[host] = w
        return w

    def _empty_parts(self) -> list[tuple[list, list, list, list, list, list]]:
        return [([], [], [], [], [], []) for _ in range(self.workers)]

    @staticmethod
    def _seal(block: int, parts: list[tuple[list, list, list, list, list, list]]) -> list[_Block]:
        i64 = np.int64
        return [
            _Block(
                block, np.array(o, i64), np.array(a, i64), np.array(n, i64), np.array(c, i64), np.array(t), h
            )
            for o, a, n, c, t, h in parts
        ]

    def _write(
        self,
        outs: list[_BlockOut],
        parent_dead: tuple[list[tuple[int, int, int]], list[bytes]],
        out: Any,
        dl: Any,
    ) -> None:
        """Merge one block's records (by batch, then first-seen key) and dead letters (batch, phase, line)."""
        risk = [v for o in outs for v in o.risk]
        if risk:
            chunk = np.concatenate([c for o in outs for c in o.risk_chunk])
            key = np.concatenate([k for o in outs for k in o.risk_key])
            out.writelines(risk[i] + b"\n" for i in np.lexsort((key, chunk)).tolist())
        dead_keys = parent_dead[0] + [k for o in outs for k in o.dead_key]
        dead = parent_dead[1] + [d for o in outs for d in o.dead]
        if dead:
            order = sorted(range(len(dead)), key=dead_keys.__getitem__)
            dl.writelines(dead[i] + b"\n" for i in order)
        t = self.totals
        t.samples += sum(o.samples for o in outs)
        t.records += len(risk)
        t.deadletters += len(dead)
        for o in outs:
            self.surprises.update(o.surprises)
        if self.progress is not None:
            self.progress(t)


def score_sharded(
    input_path: Path, output: Path, deadletter_path: Path, *, workers: int, model: str = "", device: str = "cpu",
    rescore_interval_s: float = 5.0, progress: Callable[[ScoreTotals], None] | None = None,
    say: Callable[[str], object] | None = None, decisions: dict[str, Any] | None = None,
) -> ScoreTotals:  # fmt: skip
    """Score a JSONL recording with `workers` processes into `output` (risk) and `deadletter_path`, exactly as
    one process (`training.score.replay`) would, `scored_at` and `failed_at` aside. `progress` gets the running
    totals after every block; `say` a line when the recording must be scored again (see the module doc).
    `decisions`: RiskProcessor keyword arguments (alarm_op, drain_op, failures_per_gpu_day) for every worker.
    Raises ShardError when a worker fails."""
    known: dict[int, tuple[str, float] | None] = {}
    groups = _HostGroups()
    for attempt in range(1, MAX_PASSES + 1):
        run = _Pass(input_path, output, deadletter_path, workers, model, device, rescore_interval_s, known,
                    groups, progress, decisions=decisions)  # fmt: skip
        uuid_hosts = run.run()
        run.totals.passes = attempt
        split = [hosts for hosts in uuid_hosts.values() if len(hosts) > 1]
        moved = [hosts for hosts in split if len({run.host_worker.get(h, -1) for h in hosts}) > 1]
        for hosts in split:
            groups.union(hosts)
        if not run.surprises and not moved:
            return run.totals
        known.update(run.surprises)
        if say is not None:
            say(f"scoring again so the output matches one process: {len(run.surprises)} line(s) the light parse "
                f"misread (e.g. rejected by the codec), {len(moved)} GPU uuid(s) under hosts on different workers")  # fmt: skip
    raise ShardError(f"the sharded scoring did not settle after {MAX_PASSES} passes (a bug); use --workers 1")
