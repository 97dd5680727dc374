"""Turn recorded telemetry (JSONL of gpuwatch.samples/1) plus labels into model sequences.

Windows and features come from `gpuwatch.streams.window`, the code the stream worker runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from gpuwatch.schemas.codecs import decode_deadletter
from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.streams.window import FEATURE_NAMES, WindowConfig, WindowStore

if TYPE_CHECKING:
    from gpuwatch.training.recording import Recording

_MODE_INDEX = {m: i for i, m in enumerate(FAILURE_MODES)}


class RecordingError(ValueError):
    """A recording cannot be used (a bad labels line, no usable samples); the message names the file and the fix.
    Labels are the ground truth every figure rests on, so a bad one stops the command instead of being skipped."""


@dataclass
class DeadLetterCount:
    """Recording lines train, eval and score set aside (undecodable, or refused by the stream's checks): how many,
    and the first one as ``file:line reason`` (lines numbered from 1, as editors do)."""

    lines: int = 0
    first: str = ""

    def add(self, deadletters: Iterable[bytes]) -> None:
        """Counts dead letters made by `training.score.chunk_messages` or the processor (source: file, 0-based line)."""
        for raw in deadletters:
            self.lines += 1
            if not self.first:
                rec = decode_deadletter(raw)
                self.first = f"{rec.source.topic}:{rec.source.offset + 1} {rec.error}"

    def describe(self) -> str:
        """``N lines dead-lettered (first: file:line reason)``, for stderr."""
        return f"{self.lines:,} lines dead-lettered" + (f" (first: {self.first})" if self.first else "")

    def as_dict(self) -> dict[str, Any]:
        """For eval JSON and artifact metrics: ``{"lines": N, "first": "file:line reason"}``."""
        return {"lines": self.lines, "first": self.first}


@dataclass
class Failures:
    """Ground truth per GPU uuid: sorted failure times, modes, repair ends, precursor flags, precursor starts."""

    by_uuid: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, path: Path) -> Failures:
        """The labels of a recording (`gpuwatch simulate`'s labels.jsonl); RecordingError names a bad line."""
        with open(path, "rb") as fh:
            return cls.parse(fh, str(path))

    @classmethod
    def parse(cls, lines: Iterable[bytes], path: str) -> Failures:
        """Labels from the lines of a labels.jsonl; `path` names it in errors."""
        rows: dict[str, list[tuple[float, int, float, bool, float]]] = {}
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                repair_end = rec.get("repair_end_ts") or rec["fail_ts"] + 3600.0
                pstart = rec.get("precursor_start_ts")
                has_precursor = pstart is not None and rec["mode"] != "sudden"
                if rec["mode"] not in _MODE_INDEX:
                    raise ValueError(f"mode {rec['mode']!r} is not one of {', '.join(FAILURE_MODES)}")
                row = (float(rec["fail_ts"]), _MODE_INDEX[rec["mode"]], float(repair_end), has_precursor,
                       float(pstart) if has_precursor else np.nan)  # fmt: skip
                uuid = str(rec["uuid"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                what = f"no field {exc}" if isinstance(exc, KeyError) else (str(exc).splitlines() or [""])[0]
                raise RecordingError(f"{path}:{lineno}: not a failure label ({what}); each line needs uuid, "
                                     "fail_ts and mode, as `gpuwatch simulate` writes them") from exc  # fmt: skip
            rows.setdefault(uuid, []).append(row)
        by_uuid = {}
        for uuid, items in rows.items():
            items.sort()
            a = np.array(items, dtype=np.float64)
            by_uuid[uuid] = (a[:, 0], a[:, 1].astype(np.int64), a[:, 2], a[:, 3].astype(bool), a[:, 4])
        return cls(by_uuid)

    def before(self, ts: float) -> Failures:
        """Only the failures before `ts` (what was known then)."""
        out = {}
        for uuid, cols in self.by_uuid.items():
            keep = cols[0] < ts
            if keep.any():
                out[uuid] = tuple(c[keep] for c in cols)
        return Failures(out)  # type: ignore[arg-type]

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
    samples_path: Path | Recording,
    labels_path: Path | None = None,
    *,
    window: WindowConfig | None = None,
    sample_every_s: float = 30.0,
    horizon_s: float = 3600.0,
    negative_keep: float = 0.1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    deadletters: DeadLetterCount | None = None,
) -> SequenceSet:
    """Replay a recording through the windows and take one sequence per GPU every `sample_every_s`.

    Positives (failure within the horizon) are all kept. Negatives where something looks wrong (an
    alert rule fires, an XID in the last hour) are all kept too, so the model sees the benign look-alikes
    it must not alarm on; quiet negatives are kept with probability `negative_keep`. Every sequence is
    weighted by the inverse of its keep probability. Samples while a GPU is in a failed state are not
    prediction targets. Lines that do not decode are counted into `deadletters`. `samples_path` may be a
    `Recording` (a simulate folder or an archive), which then gives the labels too.
    """
    from gpuwatch.training.baselines import rule_hits
    from gpuwatch.training.recording import Recording
    from gpuwatch.training.score import chunk_messages, file_messages

    if isinstance(samples_path, Recording):
        failures, source, messages = samples_path.failures(), samples_path.source, samples_path.messages()
    else:
        assert labels_path is not None, "labels_path is needed with a samples file"
        failures, source, messages = Failures.load(labels_path), str(samples_path), file_messages(samples_path)
    store = WindowStore(window or WindowConfig())
    rng = np.random.default_rng(seed)
    xs: list[np.ndarray] = []
    meta: list[tuple[int, int, float, float, bool, float]] = []
    uuids: list[str] = []
    last_taken = np.zeros(0)
    recent_xid = np.log1p(60.0) / 7.0  # the window's log_min_since_xid scale
    xid_col = FEATURE_NAMES.index("log_min_since_xid")
    # A GPU can only be sampled at a chunk boundary, so chunks span well under sample_every_s.
    for snaps, _sources, dead, _lines in chunk_messages(messages, source, min(sample_every_s / 3.0, 10.0)):
        if deadletters is not None:
            deadletters.add(dead)
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
        why = f"; {deadletters.describe()}" if deadletters is not None and deadletters.lines else ""
        raise RecordingError(f"{source} produced no sequences (empty, too short or all invalid{why}); "
                             "record a longer one with `gpuwatch simulate`")  # fmt: skip
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
