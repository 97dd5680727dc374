"""The failure history the fleet view learns from: which GPUs were watched over which window, and which failed.

`FailureHistory` is the interface; readers build one from what holds the history:

- `read_simulation(folder)`: a `gpuwatch simulate` output (labels.jsonl and meta.json: the fleet, its boards
  and the window are known, and so is each repair's end);
- `read_history_file(path, ...)`: a JSONL file of failure labels (the simulator's and the archive's label
  format, `schemas.fields.LABEL_FIELDS`) or of the controller's outcomes (`gpuwatch.outcome/1`, from the
  outcomes topic: each `repair` is one failure; its mode and repair time are not recorded there), with the fleet
  from an inventory and the window given.

- `read_archive(location, ...)`: a gpuwatch archive (docs/archive.md): the current version of its label store
  (failures derived from the archived telemetry, operators' labels, repairs the controller recorded), over the
  time its samples cover, with the fleet from an inventory.

Errors are `HistoryError`, whose message names the input and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .estimators import DAY_S

OUTCOME_SCHEMA = "gpuwatch.outcome/1"  # controller/worker.py writes it
UNKNOWN = "unknown"


class HistoryError(ValueError):
    """The history cannot be read as given; the message names the input and the fix."""


@dataclass(frozen=True)
class Failure:
    """One GPU failure: where, when, how, and when the GPU was back (None: not back, or not recorded)."""

    host: str
    gpu_index: int
    fail_ts: float
    mode: str = UNKNOWN
    repair_end_ts: float | None = None
    uuid: str = ""


@dataclass(frozen=True)
class FailureHistory:
    """GPUs watched from `start_ts` to `end_ts` (unix seconds) and the failures known.

    `gpus`: the fleet as (host, gpu_index) slots; `gpu_model`: host -> board name (hosts not named are
    "unknown"); `failures` may include some outside the window (their repairs can reach into it), every method
    counts only the window. `repairs_known`: whether a failure's `repair_end_ts` says when it was back (labels)
    or nothing does (outcomes): then a failed GPU counts as up, which overstates exposure by the repairs' share.
    """

    start_ts: float
    end_ts: float
    gpus: tuple[tuple[str, int], ...]
    failures: tuple[Failure, ...]
    gpu_model: Mapping[str, str] = field(default_factory=dict)
    repairs_known: bool = True
    source: str = ""

    @property
    def days(self) -> float:
        return (self.end_ts - self.start_ts) / DAY_S

    def window(self, start_ts: float, end_ts: float) -> FailureHistory:
        """The same fleet and failures seen over another window."""
        return replace(self, start_ts=float(start_ts), end_ts=float(end_ts))

    def in_window(self) -> list[Failure]:
        """Failures that started inside the window, oldest first."""
        return sorted(
            (f for f in self.failures if self.start_ts <= f.fail_ts < self.end_ts), key=lambda f: f.fail_ts
        )

    def model_of(self, host: str) -> str:
        return self.gpu_model.get(host, UNKNOWN)

    def exposure_gpu_days(self) -> np.ndarray:
        """Per GPU of `gpus` (same order), the days it was up within the window (in repair: not at risk)."""
        span = max(self.end_ts - self.start_ts, 0.0)
        up = np.full(len(self.gpus), span)
        if self.repairs_known:
            slot = {g: i for i, g in enumerate(self.gpus)}
            down: dict[int, list[tuple[float, float]]] = {}
            for f in self.failures:
                i = slot.get((f.host, f.gpu_index))
                end = self.end_ts if f.repair_end_ts is None else f.repair_end_ts
                a, b = max(f.fail_ts, self.start_ts), min(end, self.end_ts)
                if i is not None and b > a:
                    down.setdefault(i, []).append((a, b))
            for i, spans in down.items():
                up[i] -= _union_length(spans)
        return up / DAY_S

    def repair_days(self) -> list[float]:
        """Repair durations (days) of the window's failures whose GPU is known to be back."""
        return [
            (f.repair_end_ts - f.fail_ts) / DAY_S for f in self.in_window() if f.repair_end_ts is not None
        ]


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def parse_time(text: str, what: str) -> float:
    """Unix seconds from `text`: a number, or an ISO date/time (UTC unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise HistoryError(f"{what} {text!r} is neither unix seconds nor an ISO date (e.g. 2025-06-01 or "
                           "2025-06-01T12:00Z)") from None  # fmt: skip
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HistoryError(f"cannot read {path} ({exc.strerror or exc}); give a labels or outcomes JSONL "
                           "file or a `gpuwatch simulate` folder") from None  # fmt: skip
    for n, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise HistoryError(f"{path} line {n} is not JSON ({exc}); fix or remove that line") from None
        if not isinstance(rec, dict):
            raise HistoryError(f"{path} line {n} is not a JSON object; each line is one label or outcome")
        yield n, rec


def _failure_from_label(rec: dict[str, Any], where: str) -> Failure:
    try:
        repair = rec.get("repair_end_ts")
        fail = Failure(
            host=str(rec["host"]), gpu_index=int(rec["gpu_index"]), fail_ts=float(rec["fail_ts"]),
            mode=str(rec.get("mode") or UNKNOWN), repair_end_ts=None if repair is None else float(repair),
            uuid=str(rec.get("uuid", "")),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise HistoryError(f"{where} is not a failure label ({type(exc).__name__}: {exc}); a label has host, "
                           "gpu_index, fail_ts and optionally mode and repair_end_ts") from None  # fmt: skip
    if not (
        math.isfinite(fail.fail_ts) and (fail.repair_end_ts is None or math.isfinite(fail.repair_end_ts))
    ):
        raise HistoryError(f"{where}: fail_ts and repair_end_ts must be finite unix seconds")
    return fail


def _failure_from_outcome(rec: dict[str, Any], where: str) -> Failure:
    try:
        return Failure(host=str(rec["host"]), gpu_index=int(rec["gpu_index"]), fail_ts=float(rec["event_ts"]),
                       uuid=str(rec.get("uuid", "")))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise HistoryError(
            f"{where} is not a {OUTCOME_SCHEMA} record ({type(exc).__name__}: {exc})"
        ) from None


def read_simulation(folder: str | Path) -> FailureHistory:
    """The history of a `gpuwatch simulate` run: its hosts and boards, its window, its failures (labels of
    precursors still running at the end, whose failure lies ahead, are not failures yet)."""
    folder = Path(folder)
    try:
        meta = orjson.loads((folder / "meta.json").read_bytes())
        hosts = [str(h) for h in meta["hosts"]]
        per_host = int(meta["config"]["gpus_per_host"])
        start, end = float(meta["start_ts"]), float(meta["end_ts"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HistoryError(
            f"{folder / 'meta.json'} cannot be read as a `gpuwatch simulate` meta.json "
            f"({type(exc).__name__}: {exc}); give the folder `gpuwatch simulate --out` wrote"
        ) from None
    hardware = meta.get("host_hardware") or []
    if not hardware and isinstance(meta["config"].get("hardware"), str):
        hardware = [meta["config"]["hardware"]] * len(hosts)  # one board for every host
    labels = folder / "labels.jsonl"
    failures = tuple(
        f for n, rec in _lines(labels) if (f := _failure_from_label(rec, f"{labels} line {n}")).fail_ts <= end
    )
    return FailureHistory(
        start_ts=start, end_ts=end, gpus=tuple((h, g) for h in hosts for g in range(per_host)),
        failures=failures, gpu_model=dict(zip(hosts, hardware)), repairs_known=True, source=str(folder),
    )  # fmt: skip


def read_archive(
    location: str, *, gpus: Iterable[tuple[str, int]], start_ts: float | None = None, end_ts: float | None = None,
    gpu_model: Mapping[str, str] | None = None,
) -> FailureHistory:  # fmt: skip
    """The history of a gpuwatch archive: its label store's current failures, over the time its samples cover
    (narrowed to `start_ts`..`end_ts` when given), on the fleet `gpus`. A derived failure's `repair_end_ts` is
    when the telemetry showed the GPU back; None: not back by the archive's end."""
    from gpuwatch.archive.labels import LabelStore, LabelStoreError
    from gpuwatch.archive.reader import ArchiveReader
    from gpuwatch.archive.writer import file_time_range

    reader = ArchiveReader(location)
    try:
        data = LabelStore(reader.storage).labels_jsonl()
    except LabelStoreError as exc:
        raise HistoryError(str(exc)) from None
    spans = [file_time_range(rel) for rel in reader.files("samples")]
    if not spans:
        raise HistoryError(
            f"the archive {location} holds no samples: nothing says which time its labels cover"
        )
    start = min(lo for lo, _ in spans) if start_ts is None else max(start_ts, min(lo for lo, _ in spans))
    end = max(hi for _, hi in spans) if end_ts is None else min(end_ts, max(hi for _, hi in spans))
    if end <= start:
        raise HistoryError(f"the archive {location} has no samples between --since and --until")
    failures = []
    for n, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            failures.append(_failure_from_label(orjson.loads(line), f"{location} label store line {n}"))
    fleet = tuple(gpus)
    if not fleet:
        raise HistoryError(
            f"no fleet for the archive {location}: give --inventory, or a Redis with live risk"
        )
    return FailureHistory(
        start_ts=start, end_ts=end, gpus=fleet, failures=tuple(failures), gpu_model=dict(gpu_model or {}),
        repairs_known=True, source=str(location),
    )  # fmt: skip


def read_inventory(path: str | Path) -> tuple[tuple[tuple[str, int], ...], dict[str, str]]:
    """A fleet inventory: JSON {host: {"gpus": N, "model": "h100-sxm"}} ("model" optional) -> (gpus, models)."""
    path = Path(path)
    hint = 'give JSON like {"node-0001": {"gpus": 8, "model": "h100-sxm"}}'
    try:
        raw = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise HistoryError(f"cannot read the inventory {path} ({exc}); {hint}") from None
    if not isinstance(raw, dict) or not raw:
        raise HistoryError(f"the inventory {path} is not a non-empty JSON object of hosts; {hint}")
    gpus: list[tuple[str, int]] = []
    models: dict[str, str] = {}
    for host, entry in raw.items():
        count = entry.get("gpus") if isinstance(entry, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise HistoryError(
                f"the inventory {path}: host {host!r} has no whole number of gpus >= 1; {hint}"
            )
        gpus += [(str(host), g) for g in range(count)]
        if entry.get("model"):
            models[str(host)] = str(entry["model"])
    return tuple(gpus), models


def read_history_file(
    path: str | Path, *, gpus: Iterable[tuple[str, int]], start_ts: float, end_ts: float,
    gpu_model: Mapping[str, str] | None = None,
) -> FailureHistory:  # fmt: skip
    """Failures from a JSONL file of labels or of `gpuwatch.outcome/1` records, over a given fleet and window.

    In an outcomes file each `repair` outcome is one failure at its event's time (once per id, executed or
    not: the GPU failed either way); other outcomes and records of other schemas on the topic (command acks)
    are skipped. Labels and outcomes cannot be mixed in one file.
    """
    path = Path(path)
    if end_ts <= start_ts:
        raise HistoryError(f"the history window of {path} is empty (since {start_ts:.0f} >= until {end_ts:.0f}); "
                           "give --since before --until")  # fmt: skip
    failures: list[Failure] = []
    kinds: set[str] = set()
    seen: set[str] = set()
    for n, rec in _lines(path):
        where = f"{path} line {n}"
        if rec.get("schema") == OUTCOME_SCHEMA:
            kinds.add("outcomes")
            if rec.get("action") == "repair" and str(rec.get("id")) not in seen:
                seen.add(str(rec.get("id")))
                failures.append(_failure_from_outcome(rec, where))
        elif "fail_ts" in rec:
            kinds.add("labels")
            failures.append(_failure_from_label(rec, where))
        elif not str(rec.get("schema", "")).startswith("gpuwatch."):
            raise HistoryError(f"{where} is neither a failure label (fail_ts) nor a {OUTCOME_SCHEMA} record")
    if len(kinds) > 1:
        raise HistoryError(f"{path} mixes failure labels and outcomes; give one kind per file")
    fleet = tuple(gpus)
    if not fleet:
        raise HistoryError(
            f"no fleet for {path}: give --inventory, or a Redis with live risk to count the GPUs"
        )
    return FailureHistory(
        start_ts=float(start_ts), end_ts=float(end_ts), gpus=fleet, failures=tuple(failures),
        gpu_model=dict(gpu_model or {}), repairs_known="outcomes" not in kinds, source=str(path),
    )  # fmt: skip
