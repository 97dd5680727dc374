"""Per-GPU window state and the feature pipeline, vectorised over batches of GPU-samples.

One implementation serves the stream worker, offline training, `gpuwatch score` and
`gpuwatch eval`. State is preallocated NumPy arrays indexed by a slot per GPU (no lists
of dicts): the last counter values, multi-scale EWMAs of rates and flags (1 min, 10 min,
1 h, plus 6 h device baselines), and a ring of past feature rows spaced `stride_s` apart.
A model sequence is the last `seq_len - 1` ring rows followed by the current row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpuwatch.schemas import fields as F
from gpuwatch.schemas.failure import RESET_COUNTERS, failure_step, xid_summary

_NUM = {name: i for i, name in enumerate(F.ALL_NUMERIC)}
_FLAG = {name: i for i, name in enumerate(F.ALL_FLAGS)}

# Counter groups whose per-minute rates are tracked; the order is the order of RATE_SIGNALS.
_COUNTER_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sbe", ("ecc_sbe_volatile",)),
    ("dbe", ("ecc_dbe_volatile",)),
    ("remap", ("remapped_rows_correctable", "remapped_rows_uncorrectable", "retired_pages")),
    ("pcie", ("pcie_replay",)),
    ("nvlink", ("nvlink_crc_errors", "nvlink_replay_errors", "nvlink_recovery_errors")),
)
_COUNTER_COLS = np.array([_NUM[c] for _, cols in _COUNTER_GROUPS for c in cols])
_GROUP_OF_COL = np.array([g for g, (_, cols) in enumerate(_COUNTER_GROUPS) for _ in cols])
_VIOLATION_COLS = np.array([_NUM["power_violation_us"], _NUM["thermal_violation_us"]])
# A drop of these counters is a reset here as in schemas.failure (the labeller's copy of the failed state).
if {F.ALL_NUMERIC[i] for i in np.r_[_COUNTER_COLS, _VIOLATION_COLS]} != set(RESET_COUNTERS):
    raise ImportError("streams.window's reset counters differ from gpuwatch.schemas.failure.RESET_COUNTERS")

# Signals smoothed at every time scale: counter rates, then derived per-sample signals. "Peer" signals
# compare a GPU with the other GPUs of its host in the same snapshot: they share ambient air and the job,
# so a GPU whose cooling or power delivery degrades stands out from its peers whatever the load.
EWMA_SIGNALS: tuple[str, ...] = tuple(name for name, _ in _COUNTER_GROUPS) + (
    "thermal_dev",
    "thermal_peer",
    "throttle_thermal",
    "throttle_power",
    "own_brake",
    "power_excursion",
    "power_jitter",
    "xid",
    "clock_deficit",
)
_SIG = {name: i for i, name in enumerate(EWMA_SIGNALS)}
LOADED_UTIL = 0.5  # utilisation above which a GPU counts as loaded
# Temperatures lag a load change by a minute or two (and by a different time constant per GPU), so the
# peer-relative thermal signal holds still until the load state has been steady this long.
SETTLE_S = 180.0
EWMA_TAUS_S: tuple[float, ...] = (60.0, 600.0, 3600.0)
# Slow per-device baselines (robust device normalisation): a GPU that always trickles SBEs or
# always runs warm is compared against itself.
BASELINE_TAU_S = 6 * 3600.0
PEER_WARMUP_S = 600.0  # settled seconds over which a peer-relative thermal baseline is a plain running mean
# Rate signals (events per minute) are read out as log1p of their EWMA.
_LOGGED = np.array([_SIG[n] for n in ("sbe", "dbe", "remap", "pcie", "nvlink", "xid")])
# Rates compared with the device's own slow baseline (trickling GPUs are normal for themselves).
_BASELINED_RATES = ("sbe", "pcie", "nvlink")
_RATE_BASE_COLS = np.array([_SIG[n] for n in _BASELINED_RATES])
# baseline columns: the rates above, thermal resistance, then resistance relative to peers idle and loaded.
_B_THERMAL_R = len(_BASELINED_RATES)
_B_PEER_IDLE, _B_PEER_LOADED = _B_THERMAL_R + 1, _B_THERMAL_R + 2
N_BASELINES = len(_BASELINED_RATES) + 3

_THROTTLE_BITS: tuple[tuple[str, int], ...] = (
    ("thr_sw_power_cap", F.THROTTLE_SW_POWER_CAP),
    ("thr_hw_slowdown", F.THROTTLE_HW_SLOWDOWN),
    ("thr_sw_thermal", F.THROTTLE_SW_THERMAL),
    ("thr_hw_thermal", F.THROTTLE_HW_THERMAL),
    ("thr_hw_power_brake", F.THROTTLE_HW_POWER_BRAKE),
)

INSTANT_FEATURES: tuple[str, ...] = (
    "temp",
    "power_frac",
    "util",
    "sm_clock",
    "fan",
    "fan_missing",
    "mem_used_frac",
    "pcie_width_ratio",
    "pcie_gen_ratio",
    *(name for name, _ in _THROTTLE_BITS),
    "remap_pending",
    "remap_failure",
    "retired_pages_pending",
    "lost",
    "xid_now",
    "xid_last_memory",
    "xid_last_fatal",
    "log_min_since_xid",
    "gap_ratio",
    "log_dbe_aggregate",
    "log_retired_pages",
    "log_remapped_uncorrectable",
    "violation_power",
    "violation_thermal",
    "temp_peer",
    "fan_peer",
    "power_peer",
)
FEATURE_NAMES: tuple[str, ...] = (
    INSTANT_FEATURES
    + tuple(f"{s}_ewma_{int(t)}s" for t in EWMA_TAUS_S for s in EWMA_SIGNALS)
    + tuple(f"{n}_vs_baseline" for n in _BASELINED_RATES)
    + ("thermal_dev_vs_baseline",)
)
N_FEATURES = len(FEATURE_NAMES)
N_SIGNALS = len(EWMA_SIGNALS)
_LOST_COL = FEATURE_NAMES.index("lost")
_NO_XID_MIN = 24 * 60.0  # "never seen an XID" reads as a day ago
# A sample whose ts is not after its GPU's last one is still newer when its snapshot's seq follows the last
# folded seq by at most this much (the agent's next snapshots): the node's clock stepped back, or the last
# snapshot was stamped ahead. Such a GPU's window is moved back in time instead of refusing its samples
# until the clock catches up. A resend or an older snapshot never has a seq after the last one.
MAX_SEQ_STEP = 64
# The meaning of a checkpointed window's arrays: a release that changes what a feature or a baseline holds (not
# only the arrays' shapes, which the record's size tells) raises it, and older checkpoints start afresh.
# 2: thermal_peer and its baselines in °C at the GPU's power, not in thermal resistance (2026-12-07).
WINDOW_LAYOUT = 2
# Marks bytes a caller framed after a checkpointed window (`export_state(extensions=...)`): magic, u16 length.
EXTENSION_MAGIC = b"GWX1"
# Every per-GPU time of the window (sample time), moved together so that time differences stay what they were.
# failed_since is left alone: it names the failure (the repair event's id is built from it).
_TIME_FIELDS = (
    "first_ts", "last_ts", "last_push_ts", "last_xid_ts", "last_scored_ts", "state_since", "alarm_since", "drain_since",
    "alarm_hit", "drain_hit",
)  # fmt: skip


def _unframe(rest: bytes) -> bytes | None:
    """The extension framed in `rest` (what follows a window record; b"" when nothing does), or None when `rest`
    is no framed extension (the blob has another window layout)."""
    if not rest:
        return b""
    head = len(EXTENSION_MAGIC) + 2
    if len(rest) <= head or rest[: len(EXTENSION_MAGIC)] != EXTENSION_MAGIC:
        return None
    declared = int.from_bytes(rest[len(EXTENSION_MAGIC) : head], "big")
    return rest[head:] if declared == len(rest) - head else None


def _nan_to(x: np.ndarray, nan: float = 0.0) -> np.ndarray:
    """`np.nan_to_num(x, nan=nan)` of a float array (NaN -> `nan`, +-inf -> the largest finite float), in a
    third of its time: a fold makes many such calls, and on a small batch their overhead was most of its cost."""
    big = np.finfo(x.dtype).max
    out = np.where(np.isnan(x), nan, x)
    np.minimum(out, big, out=out)
    return np.maximum(out, -big, out=out)


def _peer_means(group: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N, K): per row, the mean of each column over the other rows of its group, ignoring NaN. `group` is
    nondecreasing (a snapshot's rows are contiguous)."""
    inv = np.cumsum(np.concatenate(([0], group[1:] != group[:-1])))[: len(group)]  # np.unique's inverse, sooner
    ok = ~np.isnan(v)
    vv = np.where(ok, v, 0.0)
    out = np.empty_like(vv)
    for k in range(v.shape[1]):
        total = np.bincount(inv, weights=vv[:, k])[inv] - vv[:, k]
        n = np.bincount(inv, weights=ok[:, k])[inv] - ok[:, k]
        out[:, k] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return out


def _widen(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src, float16 into float32 (exact): torch's copy is vectorised, about 15 times numpy's cast here."""
    import torch  # loaded already wherever windows are scored or trained on

    torch.from_numpy(dst).copy_(torch.from_numpy(src))


@dataclass(frozen=True)
class WindowConfig:
    """Shape of the window; stored in the model artifact so training and serving agree."""

    seq_len: int = 16
    stride_s: float = 30.0


class WindowStore:
    """Bounded per-GPU state for every tracked GPU, grown by doubling, addressed by slot."""

    def __init__(self, config: WindowConfig | None = None, capacity: int = 1024) -> None:
        self.config = config or WindowConfig()
        self.slot_of: dict[str, int] = {}
        self.hosts: list[str] = []
        self.uuids: list[str] = []
        self._free: list[int] = []  # slots of GPUs handed to another worker, reused first
        self._host_codes: dict[str, int] = {}
        self.host_code = np.zeros(0, dtype=np.int32)  # per slot; local to this store, so not checkpointed
        # Per slot: seq of the snapshot of the last folded sample, -1 unknown (not checkpointed: a restored GPU
        # is ordered by ts alone until its next sample).
        self.last_seq = np.zeros(0, dtype=np.int64)
        self._cap = 0
        self._alloc(max(16, capacity))

    # -- storage -------------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        shapes = self._shapes()
        old_cap = self._cap
        for name, (shape, dtype) in shapes.items():
            new = np.zeros((cap, *shape), dtype=dtype)
            if old_cap:
                new[:old_cap] = getattr(self, name)
            setattr(self, name, new)
        self.last_seq = np.r_[self.last_seq[:old_cap], np.zeros(cap - old_cap, dtype=np.int64)]
        self._reset(np.arange(old_cap, cap))
        self.host_code = np.r_[self.host_code[:old_cap], np.zeros(cap - old_cap, dtype=np.int32)]
        self._cap = cap

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        t = self.config.seq_len
        return {
            "gpu_index": ((), np.int32),
            "partition": ((), np.int32),
            "dirty": ((), np.bool_),
            "first_ts": ((), np.float64),
            "last_ts": ((), np.float64),
            "last_push_ts": ((), np.float64),
            "last_xid_ts": ((), np.float64),
            "last_scored_ts": ((), np.float64),
            "n_seen": ((), np.int32),
            "ring_pos": ((), np.int16),
            "ring_count": ((), np.int16),
            "xid_last_memory": ((), np.bool_),
            "xid_last_fatal": ((), np.bool_),
            "dt_ewma": ((), np.float32),
            "last_counters": ((len(_COUNTER_COLS),), np.float64),
            "last_violation": ((2,), np.float64),
            "ewma": ((len(EWMA_TAUS_S), N_SIGNALS), np.float32),
            "baseline": ((N_BASELINES,), np.float32),
            "state_s": ((2,), np.float32),  # settled seconds seen idle, loaded (baseline warm-up)
            "state_since": ((), np.float64),  # ts of the last change between idle and loaded
            "was_loaded": ((), np.bool_),
            "last_power_peer": ((), np.float32),
            "clock_max": ((), np.float32),  # highest SM clock seen (MHz): the board's boost clock
            "current": ((N_FEATURES,), np.float32),
            "ring": ((t, N_FEATURES), np.float16),
            # Failure state (see `_update_unique`) and the runs of scorings in a row at each operating point
            # (how many, and the ts of the first), held here so that a restored or rebalanced GPU keeps them.
            "failed": ((), np.bool_),
            "failed_since": ((), np.float64),
            "failed_memory": ((), np.bool_),
            "alarm_run": ((), np.int16),
            "drain_run": ((), np.int16),
            "alarm_since": ((), np.float64),
            "drain_since": ((), np.float64),
            "alarm_hit": ((), np.float64),  # ts of the last scoring at or above the operating point
            "drain_hit": ((), np.float64),
        }

    def _reset(self, slots: np.ndarray) -> None:
        for name in self._shapes():
            getattr(self, name)[slots] = 0
        self.last_xid_ts[slots] = -np.inf
        self.last_scored_ts[slots] = -np.inf
        self.alarm_hit[slots] = -np.inf
        self.drain_hit[slots] = -np.inf
        self.last_seq[slots] = -1

    def __len__(self) -> int:
        """Number of GPUs tracked now."""
        return len(self.slot_of)

    def state_bytes_per_gpu(self) -> int:
        """Bytes of array state held per tracked GPU (excluding the uuid/host strings)."""
        return int(sum(getattr(self, n).nbytes for n in self._shapes()) // self._cap)

    def slots_for(
        self, uuids: list[str], hosts: list[str], gpu_index: np.ndarray, partition: int | np.ndarray = -1
    ) -> np.ndarray:
        """Slot of each GPU (by uuid), allocating slots for GPUs seen for the first time."""
        slot_of = self.slot_of
        out = np.empty(len(uuids), dtype=np.int64)
        for i, u in enumerate(uuids):
            s = slot_of.get(u)
            if s is None:
                s = self._new_slot(u, hosts[i])
                self.gpu_index[s] = gpu_index[i]
            out[i] = s
        self.partition[out] = partition
        return out

    def _new_slot(self, uuid: str, host: str) -> int:
        if self._free:
            s = self._free.pop()
            self.uuids[s], self.hosts[s] = uuid, host
        else:
            s = len(self.uuids)
            if s >= self._cap:
                self._alloc(self._cap * 2)
            self.uuids.append(uuid)
            self.hosts.append(host)
        self.slot_of[uuid] = s
        self.host_code[s] = self._host_codes.setdefault(host, len(self._host_codes))
        return s

    # -- checkpoint and restore (so a restarted or rebalanced worker keeps its windows) ----------
    def _record_dtype(self) -> np.dtype:
        arrays = [(name, dtype, shape) for name, (shape, dtype) in self._shapes().items()]
        return np.dtype([*arrays, ("layout", np.uint8)])

    def export_state(
        self, slots: np.ndarray, extensions: list[bytes] | None = None
    ) -> list[tuple[str, bytes]]:
        """(uuid, blob) per slot: a host header plus the slot's arrays, for a changelog topic (format in
        docs/architecture.md, "Window checkpoints"). `extensions`: per slot, bytes the caller wants back with the
        window on restore (b"": none), framed after the arrays."""
        rec = np.zeros(len(slots), dtype=self._record_dtype())
        for name in self._shapes():
            rec[name] = getattr(self, name)[slots]
        rec["layout"] = WINDOW_LAYOUT
        out = []
        for i, s in enumerate(slots.tolist()):
            host = self.hosts[s].encode()
            ext = extensions[i] if extensions is not None else b""
            framed = EXTENSION_MAGIC + len(ext).to_bytes(2, "big") + ext if ext else b""
            out.append((self.uuids[s], len(host).to_bytes(2, "big") + host + rec[i].tobytes() + framed))
        return out

    def import_state(self, items: list[tuple[str, bytes]]) -> list[tuple[int, bytes]]:
        """Restore GPUs from `export_state` blobs (newest wins over what is held); returns (slot, extension)
        of each GPU applied (b"": the blob had none)."""
        dtype = self._record_dtype()
        size = dtype.itemsize
        applied = []
        for uuid, blob in items:
            n = int.from_bytes(blob[:2], "big")
            body = blob[2 + n :]
            ext = _unframe(body[size:])
            if len(body) < size or ext is None:
                continue  # written by a different window layout: start that GPU fresh instead
            rec = np.frombuffer(body[:size], dtype=dtype)[0]
            if rec["layout"] != WINDOW_LAYOUT:
                continue  # the same size, other meanings: fresh as well
            s = self.slot_of.get(uuid)
            if s is not None and self.last_ts[s] >= rec["last_ts"]:
                continue
            if s is None:
                s = self._new_slot(uuid, blob[2 : 2 + n].decode())
            for name in self._shapes():
                getattr(self, name)[s] = rec[name]
            self.last_seq[s] = -1
            self.dirty[s] = False
            applied.append((s, ext))
        return applied

    def forget(self, keep: Callable[[int], bool]) -> int:
        """Drop GPUs whose partition fails `keep` (revoked in a rebalance); their slots are reused."""
        dropped = [s for u, s in self.slot_of.items() if not keep(int(self.partition[s]))]
        for s in dropped:
            del self.slot_of[self.uuids[s]]
            self._free.append(s)
        if dropped:
            self._reset(np.array(dropped))
        return len(dropped)

    def dirty_slots(self) -> np.ndarray:
        """Slots changed since the last `clear_dirty` (what a checkpoint must write)."""
        return np.flatnonzero(self.dirty[: len(self.uuids)])

    def clear_dirty(self, slots: np.ndarray) -> None:
        self.dirty[slots] = False

    # -- updates -------------------------------------------------------------------------------
    def update(
        self,
        slots: np.ndarray,
        ts: np.ndarray,
        numeric: np.ndarray,
        flags: np.ndarray,
        throttle: np.ndarray,
        xids: list[list[int]],
        seq: np.ndarray | None = None,
    ) -> np.ndarray:
        """Fold a batch of GPU-samples (arrival order) into the windows.

        Returns a boolean mask of accepted rows; a sample no newer than the GPU's last one
        (duplicate or out of order) is rejected and leaves the window untouched. With `seq` (the seq of
        each row's snapshot), a sample whose ts is not after the GPU's last one but whose seq follows the
        last folded seq (by at most MAX_SEQ_STEP) is accepted: the node's clock stepped back, or the last
        snapshot was stamped ahead of it. The GPU's window is first moved back in time (`rebase`), so a
        future-stamped snapshot or a clock step never locks the GPU out.
        """
        xid_count, xid_mem, xid_fatal = xid_summary(xids)
        accepted = np.zeros(len(slots), dtype=bool)
        # Peer groups: a snapshot's GPUs arrive together (same host, same ts, contiguous rows).
        hc = self.host_code[slots]
        group = np.cumsum(np.concatenate(([True], (hc[1:] != hc[:-1]) | (ts[1:] != ts[:-1])))) if len(slots) else hc
        # A GPU may appear several times in one batch: apply its samples in rounds of unique slots.
        by_slot = np.sort(slots)
        if not (by_slot[1:] == by_slot[:-1]).any():
            rounds = [np.arange(len(slots))]
        else:
            order = np.argsort(slots, kind="stable")
            sorted_slots = slots[order]
            starts = np.r_[0, np.flatnonzero(np.diff(sorted_slots)) + 1]
            rank = np.arange(len(slots)) - np.repeat(starts, np.diff(np.r_[starts, len(slots)]))
            rank_by_row = np.empty_like(rank)
            rank_by_row[order] = rank
            rounds = [np.flatnonzero(rank_by_row == r) for r in range(int(rank.max()) + 1)]
        for rows in rounds:
            s = slots[rows]
            fresh = (self.n_seen[s] == 0) | (ts[rows] > self.last_ts[s])
            if seq is not None:
                last = self.last_seq[s]
                step = seq[rows] - last
                stepped = ~fresh & (last >= 0) & (step > 0) & (step <= MAX_SEQ_STEP)
                if stepped.any():
                    self.rebase(s[stepped], ts[rows[stepped]])
                    fresh |= stepped
            rows, s = rows[fresh], s[fresh]
            if seq is not None:
                self.last_seq[s] = seq[rows]
            if len(rows):
                self._update_unique(
                    s, ts[rows], numeric[rows], flags[rows], throttle[rows],
                    xid_count[rows], xid_mem[rows], xid_fatal[rows], group[rows],
                )
                accepted[rows] = True
        return accepted

    def rebase(self, slots: np.ndarray, ts: np.ndarray) -> None:
        """Move the windows of `slots` (unique) back in time so that their last sample lies one usual sample
        interval before `ts`: every time difference the features use stays what it was."""
        interval = np.where(self.dt_ewma[slots] > 0, self.dt_ewma[slots], 1.0).astype(np.float64)
        shift = ts - interval - self.last_ts[slots]
        for name in _TIME_FIELDS:
            getattr(self, name)[slots] += shift  # -inf ("never") stays -inf
        self.dirty[slots] = True

    def _update_unique(
        self,
        s: np.ndarray,
        ts: np.ndarray,
        x: np.ndarray,
        flags: np.ndarray,
        throttle: np.ndarray,
        xid_count: np.ndarray,
        xid_mem: np.ndarray,
        xid_fatal: np.ndarray,
        group: np.ndarray,
    ) -> None:
        first = self.n_seen[s] == 0
        dt = np.where(first, 0.0, ts - self.last_ts[s])
        dt_pos = np.maximum(dt, 1e-3)

        # Ring: keep the previous current row when a stride has passed, so the ring holds only the past.
        push = ~first & (ts - self.last_push_ts[s] >= self.config.stride_s)
        if push.any():
            ps = s[push]
            self.ring[ps, self.ring_pos[ps]] = self.current[ps]
            self.ring_pos[ps] = (self.ring_pos[ps] + 1) % self.config.seq_len
            self.ring_count[ps] = np.minimum(self.ring_count[ps] + 1, self.config.seq_len)
            self.last_push_ts[ps] = ts[push]
        self.last_push_ts[s[first]] = ts[first]

        # Counter deltas: a drop means a reset (driver reload, reboot), counted from zero.
        c = x[:, _COUNTER_COLS]
        last = self.last_counters[s]
        reset = ~first & (c < last).any(axis=1)  # NaN compares False
        delta = np.where(c >= last, c - last, c)
        delta = np.where(np.isnan(delta) | first[:, None], 0.0, delta)
        self.last_counters[s] = np.where(np.isnan(c), last, c)
        group_delta = np.zeros((len(s), len(_COUNTER_GROUPS)))
        np.add.at(group_delta, (slice(None), _GROUP_OF_COL), delta)
        # Raw events per minute are smoothed, and logged only when read out: EWMA-then-log keeps the
        # features the same whether a GPU reports every second or every ten.
        rates = group_delta * (60.0 / dt_pos[:, None])

        viol = x[:, _VIOLATION_COLS]
        last_v = self.last_violation[s]
        reset |= ~first & (viol < last_v).any(axis=1)
        dv = np.where(viol >= last_v, viol - last_v, viol)
        dv = np.where(np.isnan(dv) | first[:, None], 0.0, dv)
        self.last_violation[s] = np.where(np.isnan(viol), last_v, viol)
        violation_frac = np.clip(dv / (dt_pos[:, None] * 1e6), 0.0, 1.0)

        temp = x[:, _NUM["temp_c"]]
        power = x[:, _NUM["power_w"]]
        limit = x[:, _NUM["power_limit_w"]]
        power_frac = power / np.where(limit > 0, limit, np.nan)
        # Thermal resistance (°C per W above ambient): fan or heatsink trouble raises it at any load.
        heat_w = _nan_to(power) + 60.0
        thermal_r = (temp - 25.0) / heat_w
        sm_clock = x[:, _NUM["sm_clock_mhz"]]
        # Clocks relative to the highest this GPU has shown: boards boost to 1410 (A100) or 1980 MHz (H100), so
        # a fixed scale would read every A100 as throttled.
        clock_max = np.fmax(np.where(first, 0.0, self.clock_max[s]), _nan_to(sm_clock))
        self.clock_max[s] = clock_max
        clock_ratio = sm_clock / np.where(clock_max > 0, clock_max, np.nan)
        util = x[:, _NUM["util_gpu_pct"]] / 100.0
        # Load is the job's demand (utilisation), not power: a throttling GPU draws less power but is busy.
        loaded = _nan_to(util) >= LOADED_UTIL
        clock_deficit = np.where(util > 0.5, np.clip(1.0 - clock_ratio, 0.0, 1.0), 0.0)

        thr_thermal = (throttle & (F.THROTTLE_SW_THERMAL | F.THROTTLE_HW_THERMAL)) != 0
        thr_power = (throttle & (F.THROTTLE_HW_POWER_BRAKE | F.THROTTLE_HW_SLOWDOWN)) != 0

        # Peers: the mean of the other GPUs of the same snapshot (NaN when there are none).
        fan = x[:, _NUM["fan_pct"]]
        peer = _peer_means(
            group, np.stack([temp, thermal_r, power, fan, thr_power.astype(np.float64)], axis=1)
        )
        temp_peer = _nan_to(temp - peer[:, 0])
        power_peer = _nan_to(power - peer[:, 2])
        # In degrees at the GPU's present power, not in resistance: dR * (P + 60) is how much hotter it runs than
        # its peers would at its power. At idle, a resistance difference is mostly 1 °C of NVML's integer
        # temperatures over a small power, and read as resistance it looked like a loaded GPU 20 °C too hot
        # (what most of a healthy plain fleet's high scores were, docs/model.md).
        peer_c = _nan_to((thermal_r - peer[:, 1]) * heat_w)

        base = self.baseline[s]
        base_thermal = np.where(first, _nan_to(thermal_r, 0.3), base[:, _B_THERMAL_R])
        thermal_dev = _nan_to(thermal_r - base_thermal) * 10.0
        # Peer-relative resistance against this GPU's own usual offset from its peers in the same load state
        # (a hot-running board is normal for itself), once temperatures have settled after a load change.
        changed = first | (loaded != self.was_loaded[s])
        self.state_since[s] = np.where(changed, ts, self.state_since[s])
        self.was_loaded[s] = loaded
        settled = ts - self.state_since[s] >= SETTLE_S
        b_col = np.where(loaded, _B_PEER_LOADED, _B_PEER_IDLE)
        rows_i = np.arange(len(s))
        thermal_peer = np.where(settled, peer_c - base[rows_i, b_col], 0.0)
        last_pp = self.last_power_peer[s]
        jitter = np.where(loaded & ~first & ~np.isnan(last_pp), np.abs(power_peer - last_pp) / 100.0, 0.0)
        self.last_power_peer[s] = np.where(loaded, power_peer, np.nan)

        signals = np.empty((len(s), N_SIGNALS), dtype=np.float32)
        signals[:, : len(_COUNTER_GROUPS)] = rates
        signals[:, _SIG["thermal_dev"]] = thermal_dev
        signals[:, _SIG["thermal_peer"]] = thermal_peer
        signals[:, _SIG["throttle_thermal"]] = thr_thermal
        signals[:, _SIG["throttle_power"]] = thr_power
        signals[:, _SIG["own_brake"]] = np.maximum(thr_power - _nan_to(peer[:, 4]), 0.0)
        signals[:, _SIG["power_excursion"]] = _nan_to(np.maximum(power_frac - 1.0, 0.0) * 10.0)
        signals[:, _SIG["power_jitter"]] = jitter
        signals[:, _SIG["xid"]] = xid_count * (60.0 / dt_pos)
        signals[:, _SIG["clock_deficit"]] = _nan_to(clock_deficit)

        taus = np.asarray(EWMA_TAUS_S, dtype=np.float32)
        alpha = np.where(first[:, None], 1.0, 1.0 - np.exp(-dt_pos[:, None] / taus[None, :]))
        ew = self.ewma[s]
        step = alpha[:, :, None] * (signals[:, None, :] - ew)
        step[:, :, _SIG["thermal_peer"]] *= (settled | first)[:, None]  # hold still while temperatures settle
        step[:, :, _SIG["power_jitter"]] *= (loaded | first)[:, None]  # only meaningful under load
        ew += step
        self.ewma[s] = ew

        a_base = np.where(first, 1.0, 1.0 - np.exp(-dt_pos / BASELINE_TAU_S))
        new_base = base.copy()
        nb = len(_BASELINED_RATES)
        new_base[:, :nb] += a_base[:, None] * (rates[:, _RATE_BASE_COLS] - base[:, :nb])
        # The thermal baselines only learn while the GPU is not throttling, so a failing fan is not learned as normal.
        learn = ~thr_thermal | first
        r_now = _nan_to(thermal_r, 0.3)
        new_base[:, _B_THERMAL_R] = np.where(learn, base[:, _B_THERMAL_R] + a_base * (r_now - base[:, _B_THERMAL_R]),
                                             base[:, _B_THERMAL_R])  # fmt: skip
        learn_peer = settled & ~thr_thermal
        state_col = loaded.astype(np.int64)
        state_s = self.state_s[s, state_col] + np.where(learn_peer, np.minimum(dt_pos, 60.0), 0.0)
        # A running mean over the first minutes in a state, then the slow baseline (so a precursor is not learnt).
        tau_peer = np.where(state_s < PEER_WARMUP_S, np.maximum(state_s, 30.0), BASELINE_TAU_S)
        a_peer = 1.0 - np.exp(-np.minimum(dt_pos, 60.0) / tau_peer)
        old_peer = base[rows_i, b_col]
        new_base[rows_i, b_col] = np.where(learn_peer, old_peer + a_peer * (peer_c - old_peer), old_peer)
        self.baseline[s] = new_base
        self.state_s[s, state_col] = state_s

        # XID bookkeeping.
        has_xid = xid_count > 0
        self.last_xid_ts[s] = np.where(has_xid, ts, self.last_xid_ts[s])
        self.xid_last_memory[s] = np.where(has_xid, xid_mem, self.xid_last_memory[s])
        self.xid_last_fatal[s] = np.where(has_xid, xid_fatal, self.xid_last_fatal[s])
        min_since_xid = np.minimum((ts - self.last_xid_ts[s]) / 60.0, _NO_XID_MIN)

        # Silence is a signal: the gap to the previous sample relative to this GPU's usual interval.
        dt_ew = self.dt_ewma[s]
        dt_ew = np.where(first, 0.0, np.where(dt_ew == 0, dt, dt_ew + 0.05 * (dt - dt_ew)))
        gap_ratio = np.where(dt_ew > 0, np.log(np.maximum(dt, 1e-3) / np.maximum(dt_ew, 1e-3)), 0.0)
        self.dt_ewma[s] = dt_ew

        width_ratio = x[:, _NUM["pcie_link_width"]] / x[:, _NUM["pcie_link_width_max"]]
        gen_ratio = x[:, _NUM["pcie_link_gen"]] / x[:, _NUM["pcie_link_gen_max"]]
        lost = flags[:, _FLAG["lost"]]
        self._update_failed(s, ts, first, lost, xid_fatal, xid_mem, flags[:, _FLAG["remap_failure"]], util, reset)

        cur = np.empty((len(s), N_FEATURES), dtype=np.float32)
        cols = [
            temp / 100.0,
            power_frac,
            util,
            clock_ratio,
            fan / 100.0,
            np.isnan(fan),
            x[:, _NUM["mem_used_mib"]] / x[:, _NUM["mem_total_mib"]],
            np.where(np.isnan(width_ratio), 1.0, width_ratio),
            np.where(np.isnan(gen_ratio), 1.0, gen_ratio),
            *(((throttle & bit) != 0) for _, bit in _THROTTLE_BITS),
            flags[:, _FLAG["remap_pending"]],
            flags[:, _FLAG["remap_failure"]],
            flags[:, _FLAG["retired_pages_pending"]],
            lost,
            has_xid,
            self.xid_last_memory[s],
            self.xid_last_fatal[s],
            np.log1p(min_since_xid) / 7.0,
            np.clip(gap_ratio, -3.0, 8.0),
            np.log1p(_nan_to(x[:, _NUM["ecc_dbe_aggregate"]])),
            np.log1p(_nan_to(x[:, _NUM["retired_pages"]])),
            np.log1p(_nan_to(x[:, _NUM["remapped_rows_uncorrectable"]])),
            violation_frac[:, 0],
            violation_frac[:, 1],
            np.clip(temp_peer / 10.0, -5.0, 5.0),
            _nan_to((fan - peer[:, 3]) / 100.0),
            np.clip(power_peer / 100.0, -5.0, 5.0),
        ]
        for j, col in enumerate(cols):
            cur[:, j] = col
        n_inst = len(INSTANT_FEATURES)
        n_ew = len(EWMA_TAUS_S) * N_SIGNALS
        ew_out = ew.copy()
        ew_out[:, :, _LOGGED] = np.log1p(np.maximum(ew_out[:, :, _LOGGED], 0.0))
        cur[:, n_inst : n_inst + n_ew] = ew_out.reshape(len(s), -1)
        nb = len(_BASELINED_RATES)
        cur[:, n_inst + n_ew : n_inst + n_ew + nb] = ew_out[:, 1, _RATE_BASE_COLS] - np.log1p(
            np.maximum(self.baseline[s, :nb], 0.0)
        )
        cur[:, n_inst + n_ew + nb] = ew[:, 1, _SIG["thermal_dev"]]
        bad = ~np.isfinite(cur)
        if bad.any():  # rare: NaN reads as 0, an infinity as +-10
            cur[bad] = np.where(np.isnan(cur[bad]), 0.0, np.where(cur[bad] > 0, 10.0, -10.0))
        np.clip(cur, -1000.0, 1000.0, out=cur)  # features are O(1); the clip keeps float16 rings finite
        self.current[s] = cur

        self.first_ts[s] = np.where(first, ts, self.first_ts[s])
        self.last_ts[s] = ts
        self.n_seen[s] += 1
        self.dirty[s] = True

    def _update_failed(
        self, s: np.ndarray, ts: np.ndarray, first: np.ndarray, lost: np.ndarray, xid_fatal: np.ndarray,
        xid_mem: np.ndarray, remap_failure: np.ndarray, util: np.ndarray, reset: np.ndarray,
    ) -> None:  # fmt: skip
        """Whether each GPU has failed (docs/model.md, "Failed is not at risk"): the rule of
        `gpuwatch.schemas.failure`, which the labeller of archived telemetry applies too."""
        was = self.failed[s] & ~first
        was_lost = self.current[s, _LOST_COL] > 0.5
        failed, since, starts = failure_step(was, was_lost, self.failed_since[s], ts, lost,
                                             xid_fatal, remap_failure, util, reset)  # fmt: skip
        self.failed[s] = failed
        self.failed_since[s] = since
        self.failed_memory[s] = np.where(starts, xid_mem | remap_failure, self.failed_memory[s] & failed)

    # -- model input ---------------------------------------------------------------------------
    def sequences(self, slots: np.ndarray, out: np.ndarray | None = None, past_only: bool = False) -> np.ndarray:
        """(B, seq_len, N_FEATURES) float32: past ring rows (oldest first, edge-padded), then the current row;
        with `past_only`, (B, seq_len - 1, N_FEATURES): the past rows alone (what `Scorer.encode_past` takes)."""
        t = self.config.seq_len
        b = len(slots)
        if out is None:
            out = np.empty((b, t - 1 if past_only else t, N_FEATURES), dtype=np.float32)
        count = np.minimum(self.ring_count[slots].astype(np.int64), t - 1)
        j = np.arange(t - 1)[None, :]
        k = np.maximum(j - (t - 1 - count[:, None]), 0)  # edge padding: repeat the oldest row
        idx = (self.ring_pos[slots].astype(np.int64)[:, None] - count[:, None] + k) % t
        # Whole rows by one flat index: several times faster than indexing (slot, position) element by element.
        _widen(out[:, : t - 1], self.ring.reshape(-1, N_FEATURES)[slots.astype(np.int64)[:, None] * t + idx])
        current = self.current[slots]
        if not past_only:
            out[:, t - 1] = current
        no_past = count == 0
        if no_past.any():
            out[no_past, : t - 1] = current[no_past][:, None, :]
        return out

    def due_for_scoring(self, slots: np.ndarray, now: float, interval_s: float) -> np.ndarray:
        """Subset of `slots` (unique) whose last scoring is at least `interval_s` old at `now`."""
        slots = np.unique(slots)
        return slots[now - self.last_scored_ts[slots] >= interval_s]
