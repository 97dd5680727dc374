"""Turn recorded telemetry (JSONL of gpuwatch.samples/1) plus labels into model sequences.

Windows and features come from `gpuwatch.streams.window`, the code the stream worker runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from gpuwatch.schemas.codecs import DecodeError, Snapshot, decode_snapshot
from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.streams.window import FEATURE_NAMES, WindowConfig, WindowStore

_MODE_INDEX = {m: i for i, m in enumerate(FAILURE_MODES)}


@dataclass
class Failures:
    """Ground truth per GPU uuid: sorted failure times, modes, repair ends, precursor flags, precursor starts."""

    by_uuid: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, path: Path) -> Failures:
        rows: dict[str, list[tuple[float, int, float, bool, float]]] = {}
        with open(path, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                rec = orjson.loads(line)
                repair_end = rec.get("repair_end_ts") or rec["fail_ts"] + 3600.0
                pstart = rec.get("precursor_start_ts")
                has_precursor = pstart is not None and rec["mode"] != "sudden"
                rows.setdefault(rec["uuid"], []).append(
                    (
                        float(rec["fail_ts"]),
                        _MODE_INDEX[rec["mode"]],
                        float(repair_end),
                        has_precursor,
                        float(pstart) if has_precursor else np.nan,
                    )
                )
        by_uuid = {}
        for uuid, items in rows.items():
            items.sort()
            a = np.array(items, dtype=np.float64)
            by_uuid[uuid] = (a[:, 0], a[:, 1].astype(np.int64), a[:, 2], a[:, 3].astype(bool), a[:, 4])
        return cls(by_uuid)

    def label(self, uuid: str, ts: float, horizon_s: float) -> tuple[int, int, float, bool, bool]:
        """(fails within horizon, mode index, seconds to that failure, its precursor has started by `ts`,
        GPU is in a failed state)."""
        entry = self.by_uuid.get(uuid)
        if entry is None:
            return 0, 0, np.inf, False, False
        fail, mode, repair_end, precursor, pstart = entry
        failed_now = bool(np.any((fail <= ts) & (ts < repair_end)))
        i = int(np.searchsorted(fail, ts, side="right"))
        if i < len(fail) and fail[i] - ts <= horizon_s:
            visible = bool(precursor[i]) and ts >= pstart[i]
            return 1, int(mode[i]), float(fail[i] - ts), visible, failed_now
        return 0, 0, float(fail[i] - ts) if i < len(fail) else np.inf, False, failed_now


def iter_snapshot_batches(path: Path, batch: int = 2000) -> Iterator[tuple[list[Snapshot], int]]:
    """Decoded snapshots in file order, `batch` at a time, with the count of bad lines skipped."""
    snaps: list[Snapshot] = []
    bad = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                snaps.append(decode_snapshot(line.rstrip(b"\n")))
            except DecodeError:
                bad += 1
            if len(snaps) >= batch:
                yield snaps, bad
                snaps, bad = [], 0
    if snaps:
        yield snaps, bad


@dataclass
class SequenceSet:
    """Model inputs with labels and the bookkeeping evaluation needs."""

    x: np.ndarray  # (N, T, F) float16
    y: np.ndarray  # (N,) 0/1
    mode: np.ndarray  # (N,) index into FAILURE_MODES
    weight: np.ndarray  # (N,) inverse of the sampling probability
    ts: np.ndarray
    uuid: list[str]
    lead_s: np.ndarray
    precursor: np.ndarray  # positive whose precursor has started (a model could see it)


def build_sequences(
    samples_path: Path,
    labels_path: Path,
    *,
    window: WindowConfig | None = None,
    sample_every_s: float = 30.0,
    horizon_s: float = 3600.0,
    negative_keep: float = 0.1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SequenceSet:
    """Replay a recording through the windows and take one sequence per GPU every `sample_every_s`.

    Positives (failure within the horizon) are all kept. Negatives where something looks wrong (an
    alert rule fires, an XID in the last hour) are all kept too, so the model sees the benign look-alikes
    it must not alarm on; quiet negatives are kept with probability `negative_keep`. Every sequence is
    weighted by the inverse of its keep probability. Samples while a GPU is in a failed state are not
    prediction targets.
    """
    from gpuwatch.training.baselines import rule_hits
    from gpuwatch.training.score import iter_chunks

    failures = Failures.load(labels_path)
    store = WindowStore(window or WindowConfig())
    rng = np.random.default_rng(seed)
    xs: list[np.ndarray] = []
    meta: list[tuple[int, int, float, float, bool, float]] = []
    uuids: list[str] = []
    last_taken = np.zeros(0)
    recent_xid = np.log1p(60.0) / 7.0  # the window's log_min_since_xid scale
    xid_col = FEATURE_NAMES.index("log_min_since_xid")
    # A GPU can only be sampled at a chunk boundary, so chunks span well under sample_every_s.
    for snaps, _sources, _dead, _lines in iter_chunks(samples_path, min(sample_every_s / 3.0, 10.0)):
        if not snaps:
            continue
        counts = [len(s.uuids) for s in snaps]
        slots = store.slots_for(
            [u for s in snaps for u in s.uuids],
            [s.host for s, n in zip(snaps, counts) for _ in range(n)],
            np.concatenate([s.gpu_index for s in snaps]),
        )
        ts = np.repeat([s.ts for s in snaps], counts)
        store.update(
            slots, ts, np.concatenate([s.numeric for s in snaps]), np.concatenate([s.flags for s in snaps]),
            np.concatenate([s.throttle for s in snaps]), [x for s in snaps for x in s.xids],
        )  # fmt: skip
        if len(last_taken) < len(store.uuids):
            last_taken = np.r_[last_taken, np.full(len(store.uuids) - len(last_taken), -np.inf)]
        touched = np.unique(slots)
        due = touched[store.last_ts[touched] - last_taken[touched] >= sample_every_s]
        if len(due):
            last_taken[due] = store.last_ts[due]
            seqs = store.sequences(due)
            hard = rule_hits(seqs).any(axis=1) | (seqs[:, -1, xid_col] <= recent_xid)
            keep_rows = []
            for k, s in enumerate(due.tolist()):
                t = float(store.last_ts[s])
                y, mode, lead, precursor, failed = failures.label(store.uuids[s], t, horizon_s)
                if failed:
                    continue
                keep_p = 1.0 if (y or hard[k]) else negative_keep
                if keep_p < 1.0 and rng.random() >= keep_p:
                    continue
                keep_rows.append(k)
                meta.append((y, mode, 1.0 / keep_p, t, precursor, lead))
                uuids.append(store.uuids[s])
            if keep_rows:
                xs.append(seqs[keep_rows].astype(np.float16))
        if progress is not None:
            progress(sum(counts))
    if not xs:
        raise ValueError(f"{samples_path} produced no sequences: is it empty or all invalid?")
    m = np.array(meta, dtype=np.float64)
    return SequenceSet(
        x=np.concatenate(xs),
        y=m[:, 0].astype(np.int64),
        mode=m[:, 1].astype(np.int64),
        weight=m[:, 2],
        ts=m[:, 3],
        uuid=uuids,
        lead_s=m[:, 5],
        precursor=m[:, 4].astype(bool),
    )
