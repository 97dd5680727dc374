"""Failure labels from what really happened: derived from archived telemetry, joined with the model's alarms and
the controller's outcomes, plus operators' labels, in one versioned label store (docs/archive.md, "Labels").

The labeller applies `gpuwatch.schemas.failure` (the definition behind `failed` in risk records) to every GPU's
archived samples in time order: each sample where a failure starts is a label at that sample's ts; the first
sample showing the GPU reset or repaired ends it (`repair_end_ts`). The mode comes from the evidence
(`MODE_RULES`, first match wins). A failure the model alarmed on before it and one it missed are both labels
(`alarmed` tells which): both are training data.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from gpuwatch.schemas import fields as F
from gpuwatch.schemas.failure import RESET_COUNTERS, failure_step

from .reader import ArchiveReader
from .storage import Storage
from .tables import OUTCOMES, RISK

# How far before a failure its mode's evidence is looked for (the longest precursors run for hours; the risk's
# horizon is an hour).
MODE_LOOKBACK_S = 3600.0
_THERMAL_BITS = F.THROTTLE_HW_THERMAL | F.THROTTLE_SW_THERMAL
MODE_RULES: tuple[tuple[str, str], ...] = (
    ("memory", "a memory XID (48, 63, 64, 92, 94, 95) or a row-remap failure in the sample the failure starts at"),
    ("interconnect", "XID 74 (NVLink) in that sample, or the PCIe link below its maximum width within "
                     "MODE_LOOKBACK_S before it"),
    ("thermal", "a thermal slowdown (HW or SW thermal throttle reason) within MODE_LOOKBACK_S before it"),
    ("power", "a hardware power brake (throttle reason) within MODE_LOOKBACK_S before it"),
    ("sudden", "none of the above: the telemetry shows no sign of the cause"),
)  # fmt: skip
LABEL_COLUMNS = ["host", "gpu_index", "uuid", "ts", "lost", "remap_failure", "util_gpu_pct", "throttle_reasons",
                 "xid", "pcie_link_width", "pcie_link_width_max", *RESET_COUNTERS]  # fmt: skip


@dataclass
class _State:
    """Per-GPU arrays indexed by slot (grown as GPUs appear)."""

    n: int = 0

    def __post_init__(self) -> None:
        self.seen = np.zeros(0, dtype=bool)
        self.failed = np.zeros(0, dtype=bool)
        self.since = np.zeros(0)
        self.was_lost = np.zeros(0, dtype=bool)
        self.last_ts = np.zeros(0)
        self.counters = np.zeros((0, len(RESET_COUNTERS)))
        self.thermal_ts = np.zeros(0)
        self.brake_ts = np.zeros(0)
        self.narrow_ts = np.zeros(0)
        self.open = np.zeros(0, dtype=np.int64)  # index of the GPU's open label, -1 when none

    def grow(self, n: int) -> None:
        extra = n - self.n
        if extra <= 0:
            return

        def add(a: np.ndarray, fill: Any) -> np.ndarray:
            return np.concatenate([a, np.full((extra, *a.shape[1:]), fill, dtype=a.dtype)])

        self.seen, self.failed = add(self.seen, False), add(self.failed, False)
        self.since, self.was_lost = add(self.since, 0.0), add(self.was_lost, False)
        self.last_ts, self.counters = add(self.last_ts, -np.inf), add(self.counters, np.nan)
        self.thermal_ts, self.brake_ts = add(self.thermal_ts, -np.inf), add(self.brake_ts, -np.inf)
        self.narrow_ts, self.open = add(self.narrow_ts, -np.inf), add(self.open, -1)
        self.n = n


class FailureLabeller:
    """Folds sample rows (archive columns `LABEL_COLUMNS`, in time order) into failure labels."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.state = _State()
        self.labels: list[dict[str, Any]] = []
        self.samples = 0

    def fold(self, table: pa.Table) -> None:
        """One time-ordered window of sample rows. A GPU's rows are folded in order; a row not newer than the
        GPU's last one (a resent snapshot) is skipped, as the stream skips it."""
        if not len(table):
            return
        uuids = table["uuid"].to_pylist()
        slots = np.fromiter(
            (self.slot_of.setdefault(u, len(self.slot_of)) for u in uuids), np.int64, len(uuids)
        )
        self.state.grow(len(self.slot_of))
        cols = {name: table[name] for name in LABEL_COLUMNS}
        num = {name: cols[name].to_numpy(zero_copy_only=False).astype(np.float64) for name in
               ("ts", "util_gpu_pct", "pcie_link_width", "pcie_link_width_max")}  # fmt: skip
        counters = np.column_stack(
            [cols[n].to_numpy(zero_copy_only=False).astype(np.float64) for n in RESET_COUNTERS]
        )
        lost = cols["lost"].to_numpy(zero_copy_only=False).astype(bool)
        remap = cols["remap_failure"].to_numpy(zero_copy_only=False).astype(bool)
        throttle = cols["throttle_reasons"].to_numpy(zero_copy_only=False).astype(np.int64)
        xids = cols["xid"].to_pylist()
        board = [[c for c in x if c not in F.XID_APPLICATION] if x else [] for x in xids]
        fatal = np.fromiter((any(c in F.XID_FATAL for c in b) for b in board), bool, len(board))
        memory = np.fromiter((any(c in F.XID_MEMORY for c in b) for b in board), bool, len(board))
        nvlink = np.fromiter((74 in b for b in board), bool, len(board))
        # Rows in rounds: the k-th row of every GPU in this window together, so each round holds a GPU once.
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        group_start = np.r_[0, np.flatnonzero(sorted_slots[1:] != sorted_slots[:-1]) + 1]
        rank = np.empty(len(slots), dtype=np.int64)
        rank[order] = np.arange(len(slots)) - np.repeat(group_start, np.diff(np.r_[group_start, len(slots)]))
        hosts, gpus = cols["host"].to_pylist(), cols["gpu_index"].to_pylist()
        for k in range(int(rank.max()) + 1):
            rows = np.flatnonzero(rank == k)
            self._round(rows, slots[rows], num, counters, lost, remap, throttle, fatal, memory, nvlink, board,
                        hosts, gpus, uuids)  # fmt: skip
        self.samples += len(slots)

    def _round(self, rows: np.ndarray, s: np.ndarray, num: dict[str, np.ndarray], counters: np.ndarray,
               lost: np.ndarray, remap: np.ndarray, throttle: np.ndarray, fatal: np.ndarray, memory: np.ndarray,
               nvlink: np.ndarray, board: list[list[int]], hosts: list, gpus: list, uuids: list) -> None:  # fmt: skip
        st = self.state
        ts = num["ts"][rows]
        newer = ts > st.last_ts[s]
        rows, s, ts = rows[newer], s[newer], ts[newer]
        if not len(rows):
            return
        first = ~st.seen[s]
        c = counters[rows]
        last = st.counters[s]
        reset = ~first & (c < last).any(axis=1)  # NaN compares False, as in the stream
        st.counters[s] = np.where(np.isnan(c), last, c)
        was = st.failed[s] & ~first
        failed, since, starts = failure_step(was, st.was_lost[s], st.since[s], ts, lost[rows], fatal[rows],
                                             remap[rows], num["util_gpu_pct"][rows], reset)  # fmt: skip
        thr = throttle[rows]
        st.thermal_ts[s] = np.where(thr & _THERMAL_BITS, ts, st.thermal_ts[s])
        st.brake_ts[s] = np.where(thr & F.THROTTLE_HW_POWER_BRAKE, ts, st.brake_ts[s])
        st.narrow_ts[s] = np.where(num["pcie_link_width"][rows] < num["pcie_link_width_max"][rows], ts,
                                   st.narrow_ts[s])  # fmt: skip
        for j in np.flatnonzero(was & ~failed).tolist():  # repaired: the open label gets its end
            if st.open[s[j]] >= 0:
                self.labels[st.open[s[j]]]["repair_end_ts"] = round(float(ts[j]), 3)
                st.open[s[j]] = -1
        for j in np.flatnonzero(starts).tolist():
            r, slot = int(rows[j]), int(s[j])
            mode, evidence = self._mode(r, slot, float(ts[j]), lost, remap, memory, nvlink, board)
            st.open[slot] = len(self.labels)
            self.labels.append({"host": hosts[r], "gpu_index": int(gpus[r]), "uuid": uuids[r],
                                "fail_ts": round(float(ts[j]), 3), "mode": mode, "precursor_start_ts": None,
                                "repair_end_ts": None, "source": "telemetry", "evidence": evidence})  # fmt: skip
        st.failed[s], st.since[s], st.was_lost[s] = failed, since, lost[rows]
        st.seen[s] = True
        st.last_ts[s] = ts

    def _mode(self, r: int, slot: int, ts: float, lost: np.ndarray, remap: np.ndarray, memory: np.ndarray,
              nvlink: np.ndarray, board: list[list[int]]) -> tuple[str, str]:  # fmt: skip
        """The failure's mode by MODE_RULES, and what started it ("lost; xid 79")."""
        st = self.state
        started = (["lost"] if lost[r] else []) + (
            ["xid " + ",".join(map(str, board[r]))] if board[r] else []
        )
        started += ["remap_failure"] if remap[r] else []
        if memory[r] or remap[r]:
            mode = "memory"
        elif nvlink[r] or ts - st.narrow_ts[slot] <= MODE_LOOKBACK_S:
            mode = "interconnect"
        elif ts - st.thermal_ts[slot] <= MODE_LOOKBACK_S:
            mode = "thermal"
        elif ts - st.brake_ts[slot] <= MODE_LOOKBACK_S:
            mode = "power"
        else:
            mode = "sudden"
        return mode, "; ".join(started)


def derive_failures(windows: Iterable[pa.Table]) -> list[dict[str, Any]]:
    """Failure labels from time-ordered windows of sample rows (`ArchiveReader.sample_windows(columns=
    LABEL_COLUMNS)`), in the order the failures started."""
    labeller = FailureLabeller()
    for window in windows:
        labeller.fold(window)
    return labeller.labels


def join_outcomes(labels: list[dict[str, Any]], risk: Iterable[dict[str, Any]], outcomes: Iterable[dict[str, Any]],
                  horizon_s: float = 3600.0) -> list[dict[str, Any]]:  # fmt: skip
    """Adds to each failure what the system did about it: `alarmed` (a risk record of its GPU said alarm within
    `horizon_s` before it), `first_alarm_ts`, and `actions`, the controller's outcomes for its GPU from
    `horizon_s` before it until it was repaired. A `repair` outcome no failure explains becomes a label of
    its own (source "controller", at its event's time): the telemetry of that failure is not in the archive."""
    alarms: dict[str, list[float]] = {}
    for rec in risk:
        if rec.get("alarm"):
            alarms.setdefault(rec["uuid"], []).append(float(rec["ts"]))
    by_gpu: dict[str, list[dict[str, Any]]] = {}
    for rec in outcomes:
        by_gpu.setdefault(rec["uuid"], []).append(rec)
    out = [dict(lab) for lab in labels]
    explained: set[str] = set()
    for lab in out:
        t0, fail = lab["fail_ts"] - horizon_s, lab["fail_ts"]
        end = lab["repair_end_ts"] if lab.get("repair_end_ts") is not None else fail + horizon_s
        before = sorted(t for t in alarms.get(lab["uuid"], []) if t0 <= t < fail)
        lab["alarmed"] = bool(before)
        lab["first_alarm_ts"] = before[0] if before else None
        acts = [o for o in by_gpu.get(lab["uuid"], []) if t0 <= o["event_ts"] <= end]
        explained.update(o["id"] for o in acts)
        lab["actions"] = [{"action": o["action"], "event_ts": o["event_ts"], "ok": o["ok"], "dry_run": o["dry_run"]}
                          for o in sorted(acts, key=lambda o: o["event_ts"])]  # fmt: skip
    for recs in by_gpu.values():
        for o in recs:
            if o["action"] == "repair" and o["ok"] and o["id"] not in explained:
                out.append({"host": o["host"], "gpu_index": o["gpu_index"], "uuid": o["uuid"],
                            "fail_ts": round(float(o["event_ts"]), 3), "mode": "sudden", "precursor_start_ts": None,
                            "repair_end_ts": None, "source": "controller", "evidence": f"repair outcome {o['id']}",
                            "alarmed": False, "first_alarm_ts": None, "actions": [
                                {"action": "repair", "event_ts": o["event_ts"], "ok": True, "dry_run": o["dry_run"]}]})  # fmt: skip
    return sorted(out, key=lambda lab: (lab["fail_ts"], lab["uuid"]))


def label_archive(reader: ArchiveReader, horizon_s: float = 3600.0) -> list[dict[str, Any]]:
    """Derives the failures of everything `reader` holds and joins the alarms and the outcomes."""
    failures = derive_failures(reader.sample_windows(columns=LABEL_COLUMNS))
    return join_outcomes(failures, reader.records(RISK), reader.records(OUTCOMES), horizon_s)


# ---------------------------------------------------------------- the label store

LOG, VERSIONS, MANIFEST = "log", "versions", "manifest.json"
STORE_SCHEMA = "gpuwatch.labels/1"
# An operator's failure label and a derived failure of the same GPU this close in time are one failure.
MATCH_S = 3600.0
SOURCES = ("telemetry", "import", "operator")


class LabelStoreError(ValueError):
    """The label store cannot be read or written as asked; the message names it and the fix."""


class LabelStore:
    """Append-only log files under `labels/log/` (one per write, never changed; its source is in the manifest),
    each write making a new version:
    `labels/versions/NNNNNN/labels.jsonl` (failures, `gpuwatch simulate`'s format plus provenance) and
    `false_alarms.jsonl`, listed in `labels/manifest.json`. Version N is everything logged up to write N."""

    def __init__(self, storage: Storage, prefix: str = "labels") -> None:
        self.storage = storage
        self.prefix = prefix

    def _rel(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def manifest(self) -> dict[str, Any]:
        if not self.storage.exists(self._rel(MANIFEST)):
            return {"schema": STORE_SCHEMA, "current": None, "versions": []}
        return orjson.loads(self.storage.read(self._rel(MANIFEST)))

    def current(self) -> int | None:
        return self.manifest()["current"]

    def append(self, source: str, records: list[dict[str, Any]], note: str = "") -> int:
        """Logs `records` from `source` (telemetry, import or operator) and writes the version they make; returns it."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        manifest = self.manifest()
        version = len(manifest["versions"]) + 1
        log_name = f"{version:06d}.jsonl"  # the version alone: two writers of any sources cannot both take it
        if not self.storage.create(
            self._rel(LOG, log_name), b"".join(orjson.dumps(r) + b"\n" for r in records)
        ):
            raise LabelStoreError(f"{self.storage.path(self._rel(LOG, log_name))} exists but the manifest does not "
                                  "list it: another writer is at work, or one died before writing the manifest; "
                                  "run the command again once it is done (or remove that file)")  # fmt: skip
        logs = [(v["source"], v["log"]) for v in manifest["versions"]] + [(source, log_name)]
        failures, false_alarms = merge([(src, self._read_log(name)) for src, name in logs])
        folder = self._rel(VERSIONS, f"{version:06d}")
        self.storage.write(f"{folder}/labels.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in failures))
        self.storage.write(
            f"{folder}/false_alarms.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in false_alarms)
        )
        by_source: dict[str, int] = {}
        for r in failures:
            by_source[r["source"]] = by_source.get(r["source"], 0) + 1
        manifest["versions"].append({
            "version": version, "source": source, "log": log_name, "created_at": time.time(), "note": note, "records": len(records),
            "failures": len(failures), "false_alarms": len(false_alarms), "by_source": by_source,
            "alarmed": sum(1 for r in failures if r.get("alarmed")),
            "missed": sum(1 for r in failures if r.get("alarmed") is False),
        })  # fmt: skip
        manifest["current"] = version
        self.storage.write(self._rel(MANIFEST), orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        return version

    def labels_jsonl(self, version: int | None = None) -> bytes:
        """labels.jsonl of `version` (default: the current one)."""
        return self._version_file("labels.jsonl", version)

    def false_alarms(self, version: int | None = None) -> list[dict[str, Any]]:
        return [
            orjson.loads(line)
            for line in self._version_file("false_alarms.jsonl", version).splitlines()
            if line
        ]

    def _version_file(self, name: str, version: int | None) -> bytes:
        version = version if version is not None else self.current()
        if version is None:
            raise LabelStoreError(f"no labels in {self.storage.path(self.prefix)} yet: run `gpuwatch labels derive` "
                                  "(or `gpuwatch label HOST:GPU ...`) first")  # fmt: skip
        rel = self._rel(VERSIONS, f"{version:06d}", name)
        if not self.storage.exists(rel):
            raise LabelStoreError(f"label version {version} is not in {self.storage.path(self.prefix)}; "
                                  f"versions there: 1..{self.current()}")  # fmt: skip
        return self.storage.read(rel)

    def _read_log(self, name: str) -> list[dict[str, Any]]:
        return [
            orjson.loads(line)
            for line in self.storage.read(self._rel(LOG, name)).splitlines()
            if line.strip()
        ]


def merge(logs: list[tuple[str, list[dict[str, Any]]]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Failures and false-alarm marks of a sequence of logs (source, records), oldest first.

    Derived and imported failures are keyed by (uuid, fail_ts): a later log's record updates an earlier one's
    (a later run knows the repair end, the alarms), except where it has null (an imported label's precursor start
    stays). An operator's failure label joins the derived failure of its
    GPU nearest in time within MATCH_S: the time stays the telemetry's, the mode becomes the operator's; with
    none, it is a failure of its own. False-alarm marks are kept as they are."""
    derived: dict[tuple[str, float], dict[str, Any]] = {}
    operator: list[dict[str, Any]] = []
    false_alarms: list[dict[str, Any]] = []
    for source, records in logs:
        for rec in records:
            if source == "operator":
                (false_alarms if rec.get("kind") == "false_alarm" else operator).append(rec)
            else:
                key = (rec["uuid"], float(rec["fail_ts"]))
                known = {k: v for k, v in rec.items() if v is not None}  # a null erases nothing
                derived[key] = {**rec, **derived.get(key, {}), **known, "source": rec.get("source", source)}
    failures = list(derived.values())
    for op in operator:
        near = [f for f in failures if f["uuid"] == op["uuid"] and abs(f["fail_ts"] - op["fail_ts"]) <= MATCH_S
                and f["source"] != "operator"]  # fmt: skip
        if near:
            f = min(near, key=lambda f: abs(f["fail_ts"] - op["fail_ts"]))
            f.update(
                {"mode": op["mode"], "source": f["source"] + "+operator", "operator": _operator_part(op)}
            )
        else:
            failures.append({"host": op["host"], "gpu_index": op["gpu_index"], "uuid": op["uuid"],
                             "fail_ts": op["fail_ts"], "mode": op["mode"], "precursor_start_ts": None,
                             "repair_end_ts": None, "source": "operator", "operator": _operator_part(op)})  # fmt: skip
    failures.sort(key=lambda f: (f["fail_ts"], f["uuid"]))
    return failures, false_alarms


def _operator_part(op: dict[str, Any]) -> dict[str, Any]:
    return {k: op.get(k) for k in ("by", "note", "at", "fail_ts")}
