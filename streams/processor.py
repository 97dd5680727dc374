"""The stream worker's batch step: decode snapshots, fold them into windows, score due GPUs.

`RiskProcessor.process` is pure of Kafka: the faust agent, the in-process replay benchmark
and offline `gpuwatch score` all call it, so they compute exactly the same risk.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from msgspec import UNSET

from gpuwatch.config import ConfigError, Settings
from gpuwatch.schemas.codecs import DecodeError, Snapshot, decode_snapshot, encode_risk, make_deadletter
from gpuwatch.schemas.fields import ALL_NUMERIC, FAILURE_MODES
from gpuwatch.schemas.records import Risk
from gpuwatch.streams.explain import explain
from gpuwatch.streams.model import ModelArtifact, Scorer
from gpuwatch.streams.operating_point import OperatingPoint, at_prevalence, bridge_for, prevalence
from gpuwatch.streams.window import FEATURE_NAMES, WindowStore

_MODES = FAILURE_MODES
# No NVML reading comes near this (a µs counter takes 31 years to get there): a larger value is corrupt and
# would overflow the float32 window state into inf/NaN for good, so its snapshot is dead-lettered.
MAX_ABS_VALUE = 1e15
_TEMP_COL, _POWER_COL = FEATURE_NAMES.index("temp"), FEATURE_NAMES.index("power_frac")
_MEMORY = FAILURE_MODES.index("memory")


def operating_points(artifact: ModelArtifact, settings: Settings) -> tuple[OperatingPoint, OperatingPoint | None]:
    """The alarm and drain operating points: the artifact's, or the `alarm_*` / `migrate_*` settings' overrides."""
    def pick(op: OperatingPoint | None, which: str) -> OperatingPoint | None:
        threshold, records = getattr(settings, f"{which}_threshold"), getattr(settings, f"{which}_records")
        for_s, bridge_s = getattr(settings, f"{which}_for_s"), getattr(settings, f"{which}_bridge_s")
        if not threshold and not records and for_s < 0 and bridge_s < 0:
            return op
        if op is None and not threshold:
            return None  # the model has no drain operating point and the override names no threshold
        base = op or OperatingPoint(threshold)
        held = base.for_s if for_s < 0 else for_s
        # The model's bridge goes with its hold: one no shorter than an overridden hold is dropped.
        bridged = bridge_for(base.bridge_s, held) if bridge_s < 0 else bridge_s
        try:
            return OperatingPoint(threshold or base.threshold, records or base.records, source="override",
                                  for_s=held, bridge_s=bridged)  # fmt: skip
        except ValueError as exc:
            raise ConfigError(f"{which}_bridge_s / {which}_for_s: {exc}; set {which}_bridge_s below {which}_for_s") from None

    alarm = pick(artifact.alarm_op, "alarm")
    assert alarm is not None
    return alarm, pick(artifact.migrate_op, "migrate")


def chosen_for_other_settings(artifact: ModelArtifact, settings: Settings) -> str | None:
    """A sentence naming the settings whose values differ from those the model's operating points were chosen
    for (its failure rate and cost model), or None when they match or the artifact does not say."""
    from gpuwatch.costs import CostModel

    chosen = artifact.metrics.get("operating_points_chosen_for")
    if not chosen:
        return None
    now = {"failures_per_gpu_day": settings.fleet_failure_rate_per_gpu_day, **CostModel.from_settings(settings).__dict__}
    then = {"failures_per_gpu_day": chosen.get("failures_per_gpu_day"), **(chosen.get("costs") or {})}
    differ = [f"{k} {then[k]} -> {now[k]}" for k in now if k in then and then[k] != now[k]]
    if not differ:
        return None
    return ("the model's operating points were chosen for other figures than these settings' ("
            + ", ".join(differ) + "); re-pick them with `gpuwatch train --operating-point-of`")


@dataclass(slots=True)
class Inbound:
    """One consumed message and where it came from (for dead letters)."""

    value: bytes | None
    topic: str = ""
    partition: int = -1
    offset: int = -1


@dataclass(slots=True)
class Scored:
    """What one batched pass decided: the slots in order, which had failed, and for the others (in the same
    order) risk at the fleet's base rate, the calibrated score, the mode index and the operating points' calls."""

    slots: np.ndarray
    failed: np.ndarray
    risk: np.ndarray
    score: np.ndarray
    mode: np.ndarray
    alarm: np.ndarray
    drain: np.ndarray


@dataclass
class BatchResult:
    """What one batch produced: risk records (key, value), the challenger's (if any) and dead letters, plus
    counts."""

    risk: list[tuple[bytes, bytes]] = field(default_factory=list)
    shadow: list[tuple[bytes, bytes]] = field(default_factory=list)  # the challenger's records (shadow topic)
    deadletters: list[bytes] = field(default_factory=list)
    samples: int = 0  # GPU-samples folded into windows
    rejected_samples: int = 0  # GPU-samples sent to the dead-letter topic
    scored: int = 0
    newest_sample_ts: float = 0.0
    inference_s: float = 0.0  # wall time of the model's forward passes in this batch


def _check_plausible(snap: Snapshot) -> None:
    """Raises DecodeError (kind range) naming the first value beyond MAX_ABS_VALUE."""
    big = np.abs(snap.numeric) > MAX_ABS_VALUE  # NaN (null) compares False
    if big.any():
        i, j = (int(v) for v in np.argwhere(big)[0])
        path = f"gpus[{i}].{ALL_NUMERIC[j]}"
        value = float(snap.numeric[i, j])
        reason = f"{path}: {value!r} is beyond any real reading (|x| > {MAX_ABS_VALUE:g}); not applied"
        raise DecodeError(reason, path=path, kind="range")


# A model's runs at its operating points: scorings in a row, the ts of the first and of the last at or above it.
RUN_FIELDS = ("alarm_run", "alarm_since", "alarm_hit", "drain_run", "drain_since", "drain_hit")
# A challenger's runs in a window checkpoint (docs/architecture.md, "Window checkpoints"): this format byte, the
# champion's and the challenger's versions (u16 length + UTF-8 each), then the runs as one record of this dtype.
RUNS_CHECKPOINT_FORMAT = 2  # 2: with the ts of the last scoring at or above each operating point
_RUNS_DTYPE = np.dtype([(name, "<i2" if name.endswith("_run") else "<f8") for name in RUN_FIELDS])


def _version_tag(version: str) -> bytes:
    raw = version.encode()
    return len(raw).to_bytes(2, "big") + raw


def _end_runs(runs: dict[str, np.ndarray], slots: np.ndarray) -> None:
    """A failed GPU has no run at any operating point (and no scoring at or above one to bridge a dip from)."""
    for name in RUN_FIELDS:
        runs[name][slots] = -np.inf if name.endswith("_hit") else 0


def decode_runs_checkpoint(ext: bytes) -> tuple[str, str, np.void] | None:
    """(champion version, challenger version, challenger's runs) from a window checkpoint's extension, or None
    when it has none or one this code cannot read (the challenger then starts its runs afresh)."""
    if not ext or ext[0] != RUNS_CHECKPOINT_FORMAT:
        return None
    pos, versions = 1, []
    for _ in range(2):
        n = int.from_bytes(ext[pos : pos + 2], "big")
        try:
            versions.append(ext[pos + 2 : pos + 2 + n].decode())
        except UnicodeDecodeError:
            return None
        pos += 2 + n
    if len(ext) - pos != _RUNS_DTYPE.itemsize:
        return None
    return versions[0], versions[1], np.frombuffer(ext[pos:], dtype=_RUNS_DTYPE)[0]


class ModelState:
    """One model's scoring state over the shared windows: scorer, operating points, base rates, and per slot the
    cached LSTM state (valid while the ring's last push and the GPU's first sample are what they were).

    The champion's runs of scorings at its operating points live in the window store; a challenger keeps its
    own (`runs`), and promotion exchanges the two. Both are checkpointed with the windows, each tagged with its
    model's version (`RiskProcessor.checkpoint`).
    """

    def __init__(
        self, scorer: Scorer, alarm_op: OperatingPoint | None = None, drain_op: OperatingPoint | None = None,
        failures_per_gpu_day: float | None = None,
    ) -> None:  # fmt: skip
        artifact = scorer.artifact
        self.scorer = scorer
        self.version = scorer.version
        self.horizon_s = artifact.horizon_s
        self.alarm_op = alarm_op or artifact.alarm_op
        self.drain_op = drain_op if drain_op is not None else artifact.migrate_op
        self.calibrated_at = artifact.calibration_prevalence
        self.deployed_at = (
            self.calibrated_at if failures_per_gpu_day is None else prevalence(failures_per_gpu_day, self.horizon_s)
        )
        hidden = artifact.hidden
        self.h = np.zeros((0, hidden), dtype=np.float32)
        self.c = np.zeros((0, hidden), dtype=np.float32)
        self.cache_push_ts = np.zeros(0)
        self.cache_first_ts = np.zeros(0)
        # Runs while this model is the challenger, and the first_ts of the GPU each slot's run belongs to.
        self.runs: dict[str, np.ndarray] = {name: np.zeros(0, np.int16 if name.endswith("_run") else np.float64)
                                            for name in RUN_FIELDS}  # fmt: skip
        self.runs_first_ts = np.zeros(0)

    def grow(self, size: int) -> None:
        """Size the per-slot arrays to `size` slots (new slots: no cached state, no run)."""
        have = len(self.cache_push_ts)
        if have >= size:
            return

        def grown(a: np.ndarray, fill: float) -> np.ndarray:
            out = np.full((size, *a.shape[1:]), fill, dtype=a.dtype)
            out[:have] = a
            return out

        self.h, self.c = grown(self.h, 0.0), grown(self.c, 0.0)
        self.cache_push_ts, self.cache_first_ts = grown(self.cache_push_ts, np.nan), grown(self.cache_first_ts, np.nan)
        self.runs = {k: grown(v, 0) for k, v in self.runs.items()}
        self.runs_first_ts = grown(self.runs_first_ts, np.nan)

    def scores(self, store: WindowStore, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated score and mode index of the `live` slots: one LSTM step from the cached state, after
        encoding the past of the slots whose ring moved on."""
        if not len(live):
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        key = (store.last_push_ts[live], store.first_ts[live])
        stale = (self.cache_push_ts[live] != key[0]) | (self.cache_first_ts[live] != key[1])
        stale |= store.ring_count[live] == 0  # no past yet: the padding copies the (changing) current row
        miss = live[stale]
        if len(miss):
            h, c = self.scorer.encode_past(store.sequences(miss, past_only=True))
            self.h[miss], self.c[miss] = h, c
            self.cache_push_ts[miss] = store.last_push_ts[miss]
            self.cache_first_ts[miss] = store.first_ts[miss]
        return self.scorer.score_from_state(self.h[live], self.c[live], store.current[live])

    def own_runs(self, store: WindowStore, slots: np.ndarray) -> dict[str, np.ndarray]:
        """This model's run arrays as a challenger, reset for `slots` now held by another GPU than their run's."""
        moved = slots[self.runs_first_ts[slots] != store.first_ts[slots]]
        if len(moved):
            for a in self.runs.values():
                a[moved] = 0
            self.runs_first_ts[moved] = store.first_ts[moved]
        return self.runs


class RiskProcessor:
    """Windows + model for the GPUs of the partitions this worker owns; optionally a challenger model scoring the
    same windows in the shadow (`set_challenger`, `install`)."""

    def __init__(
        self,
        scorer: Scorer,
        *,
        rescore_interval_s: float = 5.0,
        stage: str = "stream",
        max_future_s: float = 300.0,
        max_age_s: float | None = 7 * 86400.0,
        capacity: int = 1024,
        alarm_op: OperatingPoint | None = None,
        drain_op: OperatingPoint | None = None,
        failures_per_gpu_day: float | None = None,
    ) -> None:
        """`alarm_op` / `drain_op` default to the artifact's; `failures_per_gpu_day` is the fleet's failure
        rate, at which `risk` is stated (None: the model's calibration base rate, so risk equals score)."""
        self.store = WindowStore(scorer.artifact.window, capacity=capacity)
        self.rescore_interval_s = rescore_interval_s
        self.stage = stage
        self.max_future_s = max_future_s
        self.max_age_s = max_age_s or None
        self.failures_per_gpu_day = failures_per_gpu_day
        self.model = ModelState(scorer, alarm_op, drain_op, failures_per_gpu_day)
        self.challenger: ModelState | None = None
        self._scored_wall = np.zeros(0)  # per slot: wall time of the last risk record
        # Per slot: (key, value) of the champion's last risk record, which `refresh_silent` publishes again, and
        # the first_ts of the GPU it belongs to (a slot later held by another GPU has another), as runs_first_ts.
        self._published: list[tuple[bytes, bytes] | None] = []
        self._published_first_ts = np.zeros(0)

    # The champion's figures, as records and callers name them.
    scorer = property(lambda self: self.model.scorer)
    model_version = property(lambda self: self.model.version)
    horizon_s = property(lambda self: self.model.horizon_s)
    alarm_op = property(lambda self: self.model.alarm_op)
    drain_op = property(lambda self: self.model.drain_op)
    calibrated_at = property(lambda self: self.model.calibrated_at)
    deployed_at = property(lambda self: self.model.deployed_at)
    _cache_push_ts = property(lambda self: self.model.cache_push_ts)

    def model_state(self, scorer: Scorer, settings: Settings | None = None) -> ModelState:
        """A ModelState for `scorer` that fits these windows, with the operating points `settings` give it (the
        artifact's when None) and this processor's fleet failure rate. ValueError when its window differs."""
        if scorer.artifact.window != self.store.config:
            w, mine = scorer.artifact.window, self.store.config
            raise ValueError(f"model {scorer.version} needs windows of {w.seq_len} rows every {w.stride_s:g} s, "
                             f"these hold {mine.seq_len} every {mine.stride_s:g} s; it cannot share them")  # fmt: skip
        alarm, drain = operating_points(scorer.artifact, settings) if settings is not None else (None, None)
        return ModelState(scorer, alarm, drain, self.failures_per_gpu_day)

    def install(self, champion: ModelState, challenger: ModelState | None) -> None:
        """Make `champion` score for the risk topic and `challenger` (or none) in the shadow, between batches.

        Windows are kept. A model that was the challenger and becomes the champion brings its runs of scorings
        into the window store (and the champion it replaces takes the store's, if it stays as the challenger);
        a model new to this processor starts with no runs and encodes every GPU's past afresh."""
        store, n = self.store, len(self.store.uuids)
        old = self.model
        for m in (champion, challenger):
            if m is not None:
                m.grow(max(n, len(self._scored_wall)))
        if champion is not old:
            incoming = champion.runs if champion is self.challenger else None
            for name in RUN_FIELDS:
                held = getattr(store, name)[:n].copy()
                getattr(store, name)[:n] = incoming[name][:n] if incoming is not None else 0
                if challenger is old:
                    old.runs[name][:n] = held
            if challenger is old:
                old.runs_first_ts[:n] = store.first_ts[:n]
        if champion is not old or challenger is not self.challenger:
            # The next checkpoint rewrites every GPU with these models' runs (and none of a challenger gone).
            store.dirty[:n] = True
        self.model = champion
        self.challenger = challenger

    @classmethod
    def from_settings(cls, scorer: Scorer, settings: Settings, **kwargs: Any) -> RiskProcessor:
        """The processor a stream worker runs: operating points and the fleet's failure rate from `settings`."""
        alarm, drain = operating_points(scorer.artifact, settings)
        kwargs.setdefault("rescore_interval_s", settings.rescore_interval_s)
        return cls(scorer, alarm_op=alarm, drain_op=drain,
                   failures_per_gpu_day=settings.fleet_failure_rate_per_gpu_day, **kwargs)  # fmt: skip

    def process(self, messages: Sequence[Inbound], *, now: float | None = None) -> BatchResult:
        """Decode and fold `messages`; score every touched GPU that is due. Never raises on bad input.

        With `now` (the worker's clock), a snapshot whose `ts` is more than `max_future_s` ahead of it or more
        than `max_age_s` behind it is dead-lettered: either would hold back or distort the GPU's window.
        """
        result = BatchResult()
        snaps: list[Snapshot] = []
        sources: list[Inbound] = []
        max_age = self.max_age_s if now is not None else None
        for msg in messages:
            try:
                if msg.value is None:
                    raise DecodeError("message has no value (tombstone)")
                snap = decode_snapshot(msg.value, now=now, max_future_s=self.max_future_s, max_age_s=max_age)
                snaps.append(snap)
                sources.append(msg)
            except DecodeError as exc:
                result.deadletters.append(self._deadletter(msg, str(exc)))
        if snaps:
            self.fold(snaps, sources, result)
        return result

    def fold(self, snaps: list[Snapshot], sources: Sequence[Inbound] | None, result: BatchResult) -> None:
        """Fold decoded snapshots into the windows and score due GPUs (offline scoring enters here).

        A batch that holds a host twice (a backlog: after an outage, a restart, or a replay) is folded in
        segments cut before each repeated host, so every GPU is scored at the same samples however its
        snapshots were batched: live at 1 Hz, live draining a backlog, and `score`/`eval` replaying an
        archive give the same records. A snapshot holding a value beyond MAX_ABS_VALUE is dead-lettered whole.
        """
        start = 0
        seen: set[str] = set()
        for i, snap in enumerate(snaps):
            if snap.host in seen:
                self._fold(snaps[start:i], sources[start:i] if sources is not None else None, result)
                start = i
                seen.clear()
            seen.add(snap.host)
        if start == 0:
            self._fold(snaps, sources, result)
        else:
            self._fold(snaps[start:], sources[start:] if sources is not None else None, result)

    def _fold(self, snaps: list[Snapshot], sources: Sequence[Inbound] | None, result: BatchResult) -> None:
        """`fold` of snapshots of distinct hosts."""
        numeric = np.concatenate([s.numeric for s in snaps])
        if (np.abs(numeric) > MAX_ABS_VALUE).any():  # NaN (null) compares False
            snaps, sources = self._reject_implausible(snaps, sources, result)
            if snaps:
                self._fold(snaps, sources, result)
            return
        counts = [len(s.uuids) for s in snaps]
        uuids = [u for s in snaps for u in s.uuids]
        hosts = [s.host for s, n in zip(snaps, counts) for _ in range(n)]
        gpu_index = np.concatenate([s.gpu_index for s in snaps])
        ts = np.repeat(np.fromiter((s.ts for s in snaps), dtype=np.float64, count=len(snaps)), counts)
        seq = np.repeat(np.fromiter((s.seq for s in snaps), dtype=np.int64, count=len(snaps)), counts)
        flags = np.concatenate([s.flags for s in snaps])
        throttle = np.concatenate([s.throttle for s in snaps])
        xids = [x for s in snaps for x in s.xids]

        store = self.store
        partition = (
            np.repeat(np.fromiter((m.partition for m in sources), dtype=np.int64, count=len(sources)), counts)
            if sources is not None
            else -1
        )
        slots = store.slots_for(uuids, hosts, gpu_index, partition)
        accepted = store.update(slots, ts, numeric, flags, throttle, xids, seq)
        n_ok = int(accepted.sum())
        result.samples += n_ok
        if n_ok < len(slots):
            self._reject_stale(snaps, sources, counts, accepted, result)
        result.newest_sample_ts = max(result.newest_sample_ts, float(ts.max()))

        touched = np.unique(slots[accepted])
        due = touched[store.last_ts[touched] - store.last_scored_ts[touched] >= self.rescore_interval_s]
        if len(due):
            self.score_slots(due, result)

    def score_slots(self, slots: np.ndarray, result: BatchResult) -> None:
        """Score `slots` in one batched pass and append their risk records to `result` (and, with a challenger,
        its records of the very same windows to `result.shadow`).

        Incremental and exact: the LSTM state after a GPU's past ring rows is cached until the ring
        advances (every `stride_s`), so a rescoring runs one LSTM step over the current row. A GPU that has
        failed is not scored: its record says `failed` (risk 1, no alarm).
        """
        store = self.store
        self._grow(len(store.uuids))
        failed = store.failed[slots]
        live = slots[~failed]
        dead = slots[failed]
        runs = {name: getattr(store, name) for name in RUN_FIELDS}
        t0 = time.perf_counter()
        scored = self._decide(self.model, slots, failed, live, runs)
        shadow = None
        if self.challenger is not None:
            own = self.challenger.own_runs(store, slots)
            shadow = self._decide(self.challenger, slots, failed, live, own)
            _end_runs(own, dead)
        result.inference_s += time.perf_counter() - t0
        _end_runs(runs, dead)
        store.last_scored_ts[slots] = store.last_ts[slots]
        scored_at = time.time()
        self._scored_wall[slots] = scored_at
        self.emit(scored, scored_at, result)
        if shadow is not None and self.challenger is not None:
            self.render(shadow, scored_at, result.shadow, self.challenger)
        result.scored += len(slots)

    def _decide(
        self, model: ModelState, slots: np.ndarray, failed: np.ndarray, live: np.ndarray, runs: dict[str, np.ndarray]
    ) -> Scored:
        """One model's scores of the live slots and its operating points' calls, advancing its `runs`."""
        store = self.store
        score, mode = model.scores(store, live)
        new_sample = store.last_ts[live] > store.last_scored_ts[live]
        gap = store.last_ts[live] - store.last_scored_ts[live]
        interval = store.dt_ewma[live].astype(np.float64)
        ts = store.last_ts[live]
        alarm = self._run(runs["alarm_run"], runs["alarm_since"], runs["alarm_hit"], live, score, model.alarm_op,
                          new_sample, gap, interval, ts)  # fmt: skip
        # The drain operating point is the stricter one: a GPU is never drained without being in alarm.
        drain = (
            self._run(runs["drain_run"], runs["drain_since"], runs["drain_hit"], live, score, model.drain_op,
                      new_sample, gap, interval, ts)
            & alarm
            if model.drain_op is not None
            else np.zeros(len(live), dtype=bool)
        )
        risk = at_prevalence(score, model.calibrated_at, model.deployed_at)
        return Scored(slots, failed, risk, score, mode, alarm, drain)

    def emit(self, scored: Scored, scored_at: float, result: BatchResult) -> None:
        """Append one `gpuwatch.risk/1` record per scored slot to `result.risk`, in slot order (the evaluation's
        baselines score the same slots in that order).

        Called by `score_slots` after each batched pass; an offline caller that wants columns instead of JSON
        (training.fleet_replay) overrides this and nothing else, so the decisions are computed once. Each GPU's
        record is also kept, for `refresh_silent` to publish again.
        """
        start = len(result.risk)
        self.render(scored, scored_at, result.risk, self.model)
        published = self._published
        for sl, item in zip(scored.slots.tolist(), result.risk[start:], strict=True):
            published[sl] = item
        self._published_first_ts[scored.slots] = self.store.first_ts[scored.slots]

    def render(self, scored: Scored, scored_at: float, out: list[tuple[bytes, bytes]], model: ModelState) -> None:
        """Append (key, value) of one `gpuwatch.risk/1` record per scored slot, named after `model`, to `out`."""
        store = self.store
        hosts, uuids = store.hosts, store.uuids
        op, horizon, version = model.alarm_op.name, model.horizon_s, model.version
        slots, failed = scored.slots, scored.failed
        live_at = (np.cumsum(~failed) - 1).tolist()
        risk_l, score_l, mode_l = scored.risk.tolist(), scored.score.tolist(), scored.mode.tolist()
        alarm_l, drain_l = scored.alarm.tolist(), scored.drain.tolist()
        # Why: only for the GPUs in alarm (few), one vectorised pass; the others' records carry no `why`.
        in_alarm = np.flatnonzero(scored.alarm | scored.drain)
        why = dict(zip(in_alarm.tolist(), explain(store, slots[~failed][in_alarm]))) if len(in_alarm) else {}
        idx_l, ts_l = store.gpu_index[slots].tolist(), store.last_ts[slots].tolist()
        hist_l = (store.last_ts[slots] - store.first_ts[slots]).tolist()
        for i, (sl, is_failed) in enumerate(zip(slots.tolist(), failed.tolist())):
            host = hosts[sl]
            if is_failed:
                mode_name = _MODES[_MEMORY] if store.failed_memory[sl] else "none"
                rec = Risk(host=host, gpu_index=idx_l[i], uuid=uuids[sl], ts=ts_l[i], risk=1.0, horizon_s=horizon,
                           mode=mode_name, model=version, scored_at=scored_at, op=op, failed=True,
                           failed_since=float(store.failed_since[sl]), history_s=hist_l[i])  # fmt: skip
            else:
                j = live_at[i]
                rec = Risk(host=host, gpu_index=idx_l[i], uuid=uuids[sl], ts=ts_l[i], risk=risk_l[j], horizon_s=horizon,
                           mode=_MODES[mode_l[j]], model=version, scored_at=scored_at, op=op, score=score_l[j],
                           alarm=alarm_l[j], drain=drain_l[j], history_s=hist_l[i],
                           why=why.get(j, UNSET))  # fmt: skip
            # Not validated per record (the hot path): the values come from decoded samples and the model.
            out.append((host.encode(), encode_risk(rec, validate=False)))

    @staticmethod
    def _run(
        runs: np.ndarray, since: np.ndarray, last_hit: np.ndarray, slots: np.ndarray, score: np.ndarray,
        op: OperatingPoint, new_sample: np.ndarray, gap: np.ndarray, interval: np.ndarray, ts: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        """Advances each GPU's run of scorings at or above `op` (how many, the ts of the first, and of the last
        one at or above its threshold): a rescoring of the same sample does not count, a gap past
        `op.gap_limit` restarts it, and so does a scoring below the threshold more than `op.bridge_s` after the
        last one at or above it. Whether `op` holds now: at least `op.records` scorings spanning at least
        `op.for_s` seconds of sample time (`training.evaluate.sustained_risk` computes the same offline)."""
        in_reach = gap <= op.gap_limit(interval)
        above = score >= op.threshold
        hit_ts = np.where(above, ts, np.where(in_reach, last_hit[slots], -np.inf))
        last_hit[slots] = np.where(new_sample, hit_ts, last_hit[slots])
        hit = ts - hit_ts <= op.bridge_s
        run = runs[slots].astype(np.int32)
        start = since[slots]
        linked = in_reach & (run > 0)
        advanced = np.where(hit, np.where(linked, run + 1, 1), 0)
        started = np.where(hit & ~linked, ts, start)
        run = np.where(new_sample, advanced, run)
        start = np.where(new_sample, started, start)
        runs[slots] = np.minimum(run, 10_000)
        since[slots] = start
        return (run >= op.records) & (ts - start >= op.for_s)

    def _deadletter(self, msg: Inbound, error: str) -> bytes:
        return make_deadletter(
            msg.value, error, topic=msg.topic, partition=msg.partition, offset=msg.offset, stage=self.stage
        )

    def _reject_implausible(
        self, snaps: list[Snapshot], sources: Sequence[Inbound] | None, result: BatchResult
    ) -> tuple[list[Snapshot], list[Inbound] | None]:
        """Dead-letters the snapshots `_check_plausible` refuses; returns the others and their sources."""
        kept: list[Snapshot] = []
        kept_sources: list[Inbound] = []
        for i, snap in enumerate(snaps):
            src = sources[i] if sources is not None else Inbound(None)
            try:
                _check_plausible(snap)
            except DecodeError as exc:
                result.deadletters.append(self._deadletter(self._original(src, snap), str(exc)))
                continue
            kept.append(snap)
            kept_sources.append(src)
        return kept, (kept_sources if sources is not None else None)

    @staticmethod
    def _original(src: Inbound, snap: Snapshot) -> Inbound:
        """`src`, or where the snapshot came without its message, a stand-in naming host and seq."""
        if src.value is not None:
            return src
        return Inbound(orjson.dumps({"host": snap.host, "seq": snap.seq}), src.topic, src.partition, src.offset)

    def _reject_stale(
        self,
        snaps: list[Snapshot],
        sources: Sequence[Inbound] | None,
        counts: list[int],
        accepted: np.ndarray,
        result: BatchResult,
    ) -> None:
        # Duplicates and out-of-order samples never touch a window; they go to the dead-letter topic whole.
        start = 0
        for i, (snap, n) in enumerate(zip(snaps, counts)):
            bad = np.flatnonzero(~accepted[start : start + n])
            start += n
            if len(bad):
                result.rejected_samples += len(bad)
                gpus = ", ".join(str(int(snap.gpu_index[j])) for j in bad)
                src = sources[i] if sources is not None else Inbound(None)
                error = (
                    f"host {snap.host} seq {snap.seq} ts {snap.ts}: GPU(s) {gpus} already have a sample at or "
                    "after this ts (duplicate or out of order); not applied"
                )
                result.deadletters.append(self._deadletter(self._original(src, snap), error))

    def refresh_silent(self, now: float, max_age_s: float = 10.0) -> BatchResult:
        """Publish again the last risk record of tracked GPUs whose last record is older than `max_age_s` of
        wall time.

        Such GPUs have gone silent (or their host stopped sending): the record keeps the ts of the sample it
        scored, so readers see the staleness; the gap itself enters the features when the next sample arrives.
        The record is published as it was, not scored again: a rescoring would score the GPU's newest sample,
        which the rescoring interval may have skipped, so the worker would score (and advance the alarm's run
        at) a sample that `gpuwatch score` and `eval` never score, and only when its wall clock says so. A GPU
        whose record this process cannot publish again (none yet, as after a restart, or its window was reset or
        moved in time since) is scored.
        """
        result = BatchResult()
        store = self.store
        tracked = np.fromiter(store.slot_of.values(), dtype=np.int64, count=len(store.slot_of))
        if len(tracked):
            known = tracked[tracked < len(self._scored_wall)]
            due = np.sort(known[now - self._scored_wall[known] >= max_age_s])
            # A slot that still holds the GPU its record was published for (NaN, never published, equals nothing)
            again = self._published_first_ts[due] == store.first_ts[due]
            result.risk += [self._published[sl] for sl in due[again].tolist()]
            self._scored_wall[due[again]] = now
            if not again.all():
                self.score_slots(due[~again], result)
        return result

    def checkpoint(self, everything: bool = False) -> list[tuple[int, bytes, bytes]]:
        """(partition, key, value) changelog records for every GPU changed since the last checkpoint, or for
        every GPU tracked (`everything`: a handover to an empty changelog). With a challenger, each record also
        carries its runs, tagged with both models' versions."""
        store = self.store
        slots = np.arange(len(store.uuids)) if everything else store.dirty_slots()
        slots = slots[store.partition[slots] >= 0]
        if not len(slots):
            return []
        items = store.export_state(slots, self._challenger_runs(slots))
        store.clear_dirty(slots)
        return [(int(p), u.encode(), blob) for p, (u, blob) in zip(store.partition[slots].tolist(), items)]

    def _challenger_runs(self, slots: np.ndarray) -> list[bytes] | None:
        """Per slot, the challenger's runs as a checkpoint extension (None without a challenger)."""
        challenger, store = self.challenger, self.store
        if challenger is None:
            return None
        # Read only: a slot now held by another GPU than its run's has no run (what `own_runs` makes of it).
        known = slots < len(challenger.runs_first_ts)
        at = np.where(known, slots, 0)
        held = known & (challenger.runs_first_ts[at] == store.first_ts[slots])
        rec = np.zeros(len(slots), dtype=_RUNS_DTYPE)
        for name in RUN_FIELDS:
            rec[name] = np.where(held, challenger.runs[name][at], 0)
        versions = _version_tag(self.model.version) + _version_tag(challenger.version)
        head = bytes([RUNS_CHECKPOINT_FORMAT]) + versions
        return [head + r.tobytes() for r in rec]

    def restore(self, records: list[tuple[bytes | None, bytes | None]]) -> int:
        """Apply changelog records (oldest first; the last per GPU wins); returns GPUs restored.

        Runs go to the model they were counted for, by version: the challenger's only to a challenger of the
        same version (another challenger starts its runs afresh), and where a promote or rollback came after the
        checkpoint, each model gets its own back. The champion keeps the window's runs unless the checkpoint
        names its version as the challenger's."""
        latest: dict[str, bytes] = {}
        for key, value in records:
            if key is not None and value is not None:
                latest[key.decode()] = value
        for model in (self.model, self.challenger):
            if model is not None:
                model.cache_push_ts[:] = np.nan  # restored rings: encode their past afresh
        applied = self.store.import_state(list(latest.items()))
        self._grow(len(self.store.uuids))
        store, champion, challenger = self.store, self.model, self.challenger
        for s, ext in applied:
            counted: dict[str, Any] = {}  # version -> its runs (a record with RUN_FIELDS)
            decoded = decode_runs_checkpoint(ext)
            if decoded is not None:
                was_champion, was_challenger, their_runs = decoded
                counted[was_champion] = {name: getattr(store, name)[s].copy() for name in RUN_FIELDS}
                counted[was_challenger] = their_runs
            if champion.version in counted:
                for name in RUN_FIELDS:
                    getattr(store, name)[s] = counted[champion.version][name]
            if challenger is not None:
                mine = counted.get(challenger.version)
                for name in RUN_FIELDS:
                    challenger.runs[name][s] = mine[name] if mine is not None else 0
                challenger.runs_first_ts[s] = store.first_ts[s]
        return len(applied)

    def _grow(self, n: int) -> None:
        """Size the per-slot scoring state (wall time of the last record, each model's cached state) to `n` slots."""
        have = len(self._scored_wall)
        if have >= n:
            return
        size = max(n, 2 * have, 64)
        grown = np.zeros(size)
        grown[:have] = self._scored_wall
        self._scored_wall = grown
        self._published += [None] * (size - len(self._published))
        first_ts = np.full(size, np.nan)  # NaN equals no first_ts: a slot never published is scored
        first_ts[:have] = self._published_first_ts
        self._published_first_ts = first_ts
        for model in (self.model, self.challenger):
            if model is not None:
                model.grow(size)

    def state_bytes_per_gpu(self) -> int:
        """Window state plus each model's cached LSTM state (and a challenger's runs), per tracked GPU."""
        extra = 8  # last record time
        for model in (self.model, self.challenger):
            if model is not None:
                extra += model.h.itemsize * model.scorer.artifact.hidden * 2 + 8 * 2  # h, c, cache keys
        if self.challenger is not None:
            extra += sum(a.itemsize for a in self.challenger.runs.values()) + 8
        return self.store.state_bytes_per_gpu() + extra

    def stats(self) -> dict[str, Any]:
        return {"gpus_tracked": len(self.store), "state_bytes_per_gpu": self.state_bytes_per_gpu()}

    def sampled_slower_than_validated(self, fresh_within_s: float = 1800.0) -> tuple[int, str, float]:
        """GPUs heard from within `fresh_within_s` of the newest sample whose usual interval is slower than the
        model was validated at (`ModelArtifact.sampled_slower_than_validated`): how many, and one of them
        (host/index) with its interval ("", 0.0 when none)."""
        store, limit = self.store, self.scorer.artifact.slow_interval_s
        n = len(store.uuids)
        if limit is None or not n:
            return 0, "", 0.0
        last_ts, interval = store.last_ts[:n], store.dt_ewma[:n].astype(np.float64)
        slow = np.flatnonzero((last_ts >= last_ts.max() - fresh_within_s) & (interval > limit))
        if not len(slow):
            return 0, "", 0.0
        s = int(slow[0])
        return len(slow), f"{store.hosts[s]}/{int(store.gpu_index[s])}", float(interval[s])

    def telemetry(
        self, fresh_within_s: float = 120.0
    ) -> tuple[list[str], np.ndarray, list[str], np.ndarray, np.ndarray]:
        """(hosts, gpu_index, uuids, temp_c, power/limit) from the newest sample of each GPU sampled within
        `fresh_within_s` of the newest sample seen (relative, so agent clock skew does not hide GPUs)."""
        store = self.store
        n = len(store.uuids)
        last_ts = store.last_ts[:n]
        if not n:
            return [], np.zeros(0, np.int32), [], np.zeros(0), np.zeros(0)
        slots = np.flatnonzero((last_ts >= last_ts.max() - fresh_within_s) & (last_ts > 0))
        cur = store.current[slots]
        hosts, uuids, picked = store.hosts, store.uuids, slots.tolist()
        return (
            [hosts[s] for s in picked],
            store.gpu_index[slots],
            [uuids[s] for s in picked],
            cur[:, _TEMP_COL].astype(np.float64) * 100.0,
            cur[:, _POWER_COL].astype(np.float64),
        )
