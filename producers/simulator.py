"""Vectorised fleet simulator: `gpuwatch.samples/1` snapshots of H100-like GPUs, with failures and labels.

All state lives in numpy arrays of shape (n_gpus,) or (n_hosts,); one `step()` advances every GPU by
`interval_s`. Ground truth never enters the samples: it leaves through `drain_labels()` only.
See docs/simulator.md for the physics, the fault modes and how the defaults come from a real trace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from gpuwatch.producers import faults
from gpuwatch.schemas import fields as F

MODES = faults.MODES
M_MEMORY, M_THERMAL, M_POWER, M_INTERCONNECT, M_SUDDEN = range(5)
DAY_S = 86400.0
MAX_CLOCK_MHZ, IDLE_CLOCK_MHZ, MEM_CLOCK_MHZ = 1980, 345, 2619
SW_THERMAL_C, HW_THERMAL_C = 87.0, 92.0
IDLE_MEM_MIB = 4
WARMUP_S = 60.0  # a job loads data and allocates memory before it saturates the GPU


@dataclass
class FleetConfig:
    """Fleet shape, fault model and physics knobs; every field has a sane default.

    Fault defaults come from the StepFun trace (`faults`); real rates are ~2e-4 failures per GPU-day,
    so training and demo fleets raise `rate_scale` (1000 gives ~0.19 per GPU-day) and lower
    `repair_time_scale` (real repairs take hours to weeks).
    """

    hosts: int = 8
    gpus_per_host: int = 8
    seed: int = 0
    interval_s: float = 1.0
    start_ts: float | None = None  # None: time.time() at construction
    host_prefix: str = "node"  # host names like node-0003
    ts_jitter_s: float = 0.0  # uniform +- jitter of each snapshot's ts, capped at 0.45 * interval_s
    fanless: bool = False  # passively cooled boards report fan_pct null
    # Fault model.
    rate_per_gpu_day: float = faults.RATE_PER_GPU_DAY
    rate_scale: float = 1.0
    mode_mix: dict[str, float] = field(default_factory=lambda: dict(faults.MODE_MIX))
    precursor_range_s: tuple[float, float] | None = None  # None: per-mode faults.PRECURSOR_RANGE_S
    precursor_strength: float = 1.0  # scales every precursor signal; each failure draws U(0.25, 1) of it
    repair_time_scale: float = 1.0
    host_frailty: bool = True  # per-host gamma rate multiplier (trace shape): repeat offenders
    forced_failures: list[tuple[int, int, str, float, float]] = field(default_factory=list)
    # (host_idx, gpu_idx, mode, fail_after_s, precursor_s), applied at start with full strength.
    # Load.
    job_len_s: tuple[float, float] = (900.0, 6 * 3600.0)  # log-uniform job length on a host
    idle_len_s: tuple[float, float] = (60.0, 1800.0)  # log-uniform gap between jobs
    # Benign noise that makes threshold rules raise false alarms.
    hot_gpu_frac: float = 0.05  # GPUs with 60-130 % worse heatsinks: run hot, thermal-throttle now and then
    sbe_trickle_frac: float = 0.03  # GPUs with a steady harmless SBE trickle (and rare benign remaps)
    replay_trickle_frac: float = 0.02  # GPUs on marginal risers/links: steady PCIe replay or NVLink CRC
    narrow_link_frac: float = 0.003  # GPUs that trained their PCIe link at x8 and run fine that way
    remap_pending_frac: float = 0.01  # GPUs with a harmless remap pending since the last reset
    power_brake_per_host_day: float = 0.3  # brief host-wide HW power-brake blips (PSU/BMC capping)
    # Board.
    power_limit_w: float = 700.0
    mem_total_mib: int = 81559


# Render layout: static per GPU, "slow" (changes rarely, re-rendered when dirty), dynamic (every step).
_STATIC_NUM = ("power_limit_w", "mem_total_mib", "mem_clock_mhz", "pcie_link_width_max", "pcie_link_gen_max")
_SLOW_INT = F.COUNTERS + ("nvlink_replay_errors", "nvlink_recovery_errors", "pcie_link_width")
_SLOW_FLAG = ("remap_pending", "remap_failure", "retired_pages_pending")
_DYN = (
    ("temp_c", "%.1f"), ("power_w", "%.1f"), ("mem_used_mib", "%d"), ("util_gpu_pct", "%d"),
    ("sm_clock_mhz", "%d"), ("fan_pct", "%s"), ("util_mem_pct", "%d"), ("pcie_link_gen", "%d"),
    ("power_violation_us", "%d"), ("thermal_violation_us", "%d"),
)  # fmt: skip
_ROW = {name: i for i, name in enumerate(_SLOW_INT + _SLOW_FLAG)}
_VOLATILE = [_ROW[k] for k in ("ecc_sbe_volatile", "ecc_dbe_volatile", "pcie_replay", "nvlink_crc_errors",
                               "nvlink_replay_errors", "nvlink_recovery_errors")]  # fmt: skip
_SLOW_FMT = "".join(f'"{k}":%d,' for k in _SLOW_INT) + "".join(f'"{k}":%s,' for k in _SLOW_FLAG)
_DYN_FMT = "%s" + "".join(f'"{k}":{f},' for k, f in _DYN) + '"lost":false,"throttle_reasons":%d,"xid":%s}'
_NUMERIC_ALL = _STATIC_NUM + _SLOW_INT + tuple(k for k, _ in _DYN)
_LOST_FMT = "".join(f'"{k}":null,' for k in _NUMERIC_ALL) + "".join(f'"{k}":false,' for k in _SLOW_FLAG)
_LOST_FMT = _LOST_FMT.replace("%", "%%") + '"lost":true,"throttle_reasons":0,"xid":%s}'
_BOOL = ("false", "true")
# A field added to schemas/fields.py must be rendered here too; fail at import rather than ship bad samples.
if set(_NUMERIC_ALL) != set(F.ALL_NUMERIC) or set(_SLOW_FLAG) | {"lost"} != set(F.ALL_FLAGS):
    raise ImportError("simulator render layout is out of date with schemas/fields.py")


def _gpu_uuid(seed: int, host: str, index: int) -> str:
    h = hashlib.sha1(f"{seed}/{host}/{index}".encode()).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _loguniform(rng: np.random.Generator, lo: float, hi: float, size: int) -> np.ndarray:
    if hi <= 0:
        return np.zeros(size)
    lo = max(lo, 1e-3)
    return lo * np.exp(rng.random(size) * math.log(max(hi, lo) / lo))


class FleetSimulator:
    """Steps a fleet of `hosts x gpus_per_host` GPUs; deterministic for a given config (seed included)."""

    def __init__(self, config: FleetConfig) -> None:
        c = self.cfg = config
        H, G = c.hosts, c.gpus_per_host
        n = self.n = H * G
        self.H, self.G = H, G
        rng = self._rng = np.random.default_rng(c.seed)
        self._t = float(time.time() if c.start_ts is None else c.start_ts)
        self.t0 = self._t
        self.dt = float(c.interval_s)
        self._seq = -1
        self._hidx = np.repeat(np.arange(H), G)
        self.hosts = [f"{c.host_prefix}-{h:04d}" for h in range(H)]
        self.uuids = [_gpu_uuid(c.seed, self.hosts[i // G], i % G) for i in range(n)]
        self._labels: list[dict] = []
        mix = np.array([max(0.0, float(c.mode_mix.get(m, 0.0))) for m in MODES])
        if mix.sum() <= 0:
            raise ValueError("mode_mix needs a positive weight for at least one mode")
        self._mix = mix / mix.sum()

        # Static heterogeneity: hosts differ in ambient, GPUs in heatsink, idle power and time constant.
        self._amb0 = rng.uniform(18.0, 32.0, H)
        self._amb_phase = rng.uniform(0, 2 * math.pi, H)
        self._r_th = rng.normal(0.062, 0.004, n)
        hot = rng.random(n) < c.hot_gpu_frac
        self._r_th[hot] *= rng.uniform(1.6, 2.3, int(hot.sum()))
        self._idle_w = rng.uniform(62.0, 80.0, n)
        self._dyn_w = rng.uniform(560.0, 630.0, n)
        self._a_t = 1.0 - np.exp(-self.dt / rng.uniform(25.0, 60.0, n))  # first-order thermal lag
        self._a_f = 1.0 - math.exp(-self.dt / 8.0)  # fan controller lag
        self._mem_off = rng.integers(-300, 300, n)
        self._sbe_rate = np.full(n, 2e-6)  # per second; most GPUs see a handful of SBEs per year
        trickle = rng.random(n) < c.sbe_trickle_frac
        self._sbe_rate[trickle] = rng.uniform(5e-4, 1e-2, int(trickle.sum()))
        self._remap_rate = np.where(trickle, 1.0 / (5 * DAY_S), 0.0)
        self._replay_rate = np.full(n, 1e-6)
        self._crc_rate = np.full(n, 3e-7)
        marg = rng.random(n) < c.replay_trickle_frac
        on_nvl = rng.random(n) < 0.5
        self._replay_rate[marg & ~on_nvl] = rng.uniform(1e-4, 2e-3, int((marg & ~on_nvl).sum()))
        self._crc_rate[marg & on_nvl] = rng.uniform(1e-4, 2e-3, int((marg & on_nvl).sum()))
        frail = (
            rng.gamma(faults.FRAILTY_SHAPE, 1.0 / faults.FRAILTY_SHAPE, H) if c.host_frailty else np.ones(H)
        )
        self._lam_s = c.rate_per_gpu_day * c.rate_scale * frail[self._hidx] / DAY_S

        # Counters and flags, with some history so absolute values alone mean little.
        S = self._S = np.zeros((len(_ROW), n), dtype=np.int64)
        hist = rng.random(n) < 0.2
        S[_ROW["ecc_sbe_aggregate"]] = np.where(hist, rng.geometric(0.05, n), 0)
        S[_ROW["ecc_sbe_aggregate"], trickle] += rng.integers(500, 20000, int(trickle.sum()))
        S[_ROW["remapped_rows_correctable"]] = np.where(rng.random(n) < 0.05, rng.integers(1, 4, n), 0)
        old_dbe = rng.random(n) < 0.005
        S[_ROW["ecc_dbe_aggregate"]] = old_dbe
        S[_ROW["remapped_rows_uncorrectable"]] = old_dbe
        self._width = np.where(rng.random(n) < c.narrow_link_frac, 8, 16)
        S[_ROW["pcie_link_width"]] = self._width
        S[_ROW["remap_pending"]] = rng.random(n) < c.remap_pending_frac
        S[_ROW["remapped_rows_correctable"]] += S[_ROW["remap_pending"]]
        self._S_prev = np.full_like(S, -1)
        self._pv_us = np.zeros(n, dtype=np.int64)
        self._tv_us = np.zeros(n, dtype=np.int64)

        # Load state per host.
        self._busy = rng.random(H) < 0.75
        self._phase_end = self._t + np.where(
            self._busy, rng.uniform(0, 1, H) * c.job_len_s[1], rng.uniform(0, 1, H) * c.idle_len_s[1]
        )
        self._job_start = np.full(H, self._t - 3600.0)
        self._intensity = rng.uniform(0.75, 1.12, H)
        self._mem_frac = rng.uniform(0.6, 0.97, H)
        self._stall_until = np.zeros(H)
        amb = self._ambient()[self._hidx]
        self._temp = amb + self._r_th * np.where(self._busy[self._hidx], 600.0, 70.0)
        self._fan = np.clip(30 + 2.2 * (self._temp - 45), 30, 100)
        self._brake_until = np.zeros(n)

        # Fault schedule and state.
        self._f_mode = np.zeros(n, dtype=np.int8)
        self._f_sub = np.zeros(n, dtype=np.int8)
        self._f_fail = np.full(n, np.inf)
        self._f_pstart = np.full(n, np.inf)
        self._f_strength = np.zeros(n)
        self._f_width_at = np.ones(n)
        self._down = np.zeros(n, dtype=bool)
        self._lost = np.zeros(n, dtype=bool)
        self._down_until = np.full(n, np.inf)
        self._cool = np.ones(n)
        self._schedule(np.arange(n), self._t)
        for h, g, mode, after_s, prec_s in c.forced_failures:
            self.schedule_failure(h, g, mode, after_s, prec_s)

        # Render caches.
        self._prefix = [
            f'{{"gpu_index":{i % G},"uuid":"{u}","power_limit_w":{c.power_limit_w:.1f},'
            f'"mem_total_mib":{c.mem_total_mib},"mem_clock_mhz":{MEM_CLOCK_MHZ},'
            f'"pcie_link_width_max":16,"pcie_link_gen_max":5,'
            for i, u in enumerate(self.uuids)
        ]
        self._lost_fmt = [p.split('"power_limit_w"')[0].replace("%", "%%") + _LOST_FMT for p in self._prefix]
        self._gpu_head = [""] * n  # static prefix + slow fields, re-rendered when the slow fields change
        self._head = [f'{{"schema":"{F.SAMPLES_SCHEMA}","host":"{h}","ts":' for h in self.hosts]
        self._xid: dict[int, list[int]] = {}
        self._null_col, self._empty_col = ["null"] * n, ["[]"] * n
        self._cols: dict[str, np.ndarray] = {}
        self._host_ts = np.full(H, self._t)

    # ----- public API -----

    @property
    def now(self) -> float:
        """Current simulated time (unix seconds): the ts of the last step's snapshots, before jitter."""
        return self._t

    def step(self) -> list[dict]:
        """Advance one interval; return one `gpuwatch.samples/1` snapshot dict per host."""
        return [orjson.loads(line) for line in self._step_lines()]

    def step_json(self) -> list[tuple[str, bytes]]:
        """Advance one interval; return (host, orjson-compatible JSON bytes) per host: the publishing path."""
        lines = self._step_lines()
        return [(self.hosts[h], lines[k].encode()) for k, h in enumerate(self._order)]

    def drain_labels(self) -> list[dict]:
        """Label records of failures that happened since the last call (emitted at the failure step)."""
        out, self._labels = self._labels, []
        return out

    def pending_labels(self) -> list[dict]:
        """Labels for precursors already running whose failure lies in the future (not drained)."""
        idx = np.flatnonzero(~self._down & (self._f_pstart <= self._t) & np.isfinite(self._f_fail))
        return [self._label(int(i), float(self._f_fail[i]), math.nan) for i in idx]

    def schedule_failure(
        self, host_idx: int, gpu_idx: int, mode: str, fail_in_s: float, precursor_s: float,
        strength: float | None = None,
    ) -> None:  # fmt: skip
        """Make GPU (host_idx, gpu_idx) fail with `mode` in `fail_in_s` s after a `precursor_s` s precursor.

        Replaces that GPU's random schedule; `strength` defaults to config.precursor_strength.
        Raises ValueError for an unknown mode or a GPU that is down for repair.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if not (0 <= host_idx < self.H and 0 <= gpu_idx < self.G):
            raise ValueError(f"no GPU ({host_idx}, {gpu_idx}) in a {self.H}x{self.G} fleet")
        i = host_idx * self.G + gpu_idx
        if self._down[i]:
            raise ValueError(f"GPU ({host_idx}, {gpu_idx}) is down until {self._down_until[i]:.0f}")
        m = MODES.index(mode)
        self._f_mode[i] = m
        self._f_sub[i] = self._rng.integers(0, 3)
        self._f_fail[i] = self._t + max(float(fail_in_s), 0.0)
        prec = 0.0 if m == M_SUDDEN else max(float(precursor_s), 0.0)
        self._f_pstart[i] = np.inf if m == M_SUDDEN else max(self._t, self._f_fail[i] - prec)
        self._f_strength[i] = self.cfg.precursor_strength if strength is None else float(strength)
        self._f_width_at[i] = self._rng.uniform(0.3, 0.8)

    # ----- scheduling and failure/repair transitions -----

    def _schedule(self, idx: np.ndarray, t0: float) -> None:
        rng, k = self._rng, len(idx)
        lam = self._lam_s[idx]
        ttf = np.where(lam > 0, rng.exponential(1.0, k) / np.maximum(lam, 1e-300), np.inf)
        mode = rng.choice(len(MODES), size=k, p=self._mix).astype(np.int8)
        prec = np.zeros(k)
        for m, name in enumerate(MODES):
            sel = mode == m
            if sel.any() and m != M_SUDDEN:
                lo, hi = self.cfg.precursor_range_s or faults.PRECURSOR_RANGE_S[name]
                prec[sel] = _loguniform(rng, lo, hi, int(sel.sum()))
        fail = t0 + ttf
        self._f_mode[idx] = mode
        self._f_sub[idx] = rng.integers(0, 3, k)
        self._f_fail[idx] = fail
        self._f_pstart[idx] = np.where(mode == M_SUDDEN, np.inf, np.maximum(t0, fail - prec))
        self._f_strength[idx] = rng.uniform(0.25, 1.0, k) * self.cfg.precursor_strength
        self._f_width_at[idx] = rng.uniform(0.3, 0.8, k)

    def _label(self, i: int, fail_ts: float, repair_end: float) -> dict:
        ps = self._f_pstart[i]
        return {
            "host": self.hosts[i // self.G], "gpu_index": i % self.G, "uuid": self.uuids[i],
            "fail_ts": round(fail_ts, 3), "mode": MODES[self._f_mode[i]],
            "precursor_start_ts": None if not np.isfinite(ps) else round(float(ps), 3),
            "repair_end_ts": None if math.isnan(repair_end) else round(repair_end, 3),
        }  # fmt: skip

    def _fail(self, idx: np.ndarray) -> None:
        rng, S = self._rng, self._S
        mode, sub = self._f_mode[idx], self._f_sub[idx]
        fail_ts = self._host_ts[self._hidx[idx]]
        repair = faults.sample_repair_s(rng, mode, self.cfg.repair_time_scale)
        lost = np.zeros(len(idx), dtype=bool)
        for k, i in enumerate(idx.tolist()):
            m, s = int(mode[k]), int(sub[k])
            if m == M_MEMORY:  # DBE, the row that cannot be remapped, then contained/uncontained ECC error
                S[_ROW["ecc_dbe_volatile"], i] += 1 + s
                S[_ROW["ecc_dbe_aggregate"], i] += 1 + s
                S[_ROW["remapped_rows_uncorrectable"], i] += 1
                S[_ROW["remap_pending"], i] = 1
                xid = [48, 63, 94 if s == 0 else 95]
                if s == 2:  # no spare rows left
                    S[_ROW["remap_failure"], i] = 1
                    xid = [48, 64, 95]
            elif m == M_THERMAL:
                xid, lost[k] = [79], True  # thermal shutdown: off the bus
            elif m == M_POWER:
                xid, lost[k] = ([79], True) if s != 1 else ([62], False)
            elif m == M_INTERCONNECT:
                xid, lost[k] = ([74, 79] if s == 1 else [79]), True
            else:
                xid, lost[k] = ([79], True) if s == 0 else (([62], False) if s == 1 else ([], True))
            self._xid[i] = xid
            self._labels.append(self._label(i, float(fail_ts[k]), float(fail_ts[k] + repair[k])))
        self._down[idx] = True
        self._lost[idx] = lost
        self._down_until[idx] = fail_ts + repair
        self._f_fail[idx] = np.inf
        self._f_pstart[idx] = np.inf

    def _repair(self, idx: np.ndarray) -> None:
        """GPUs back were reset (volatile counters, pending remaps); a host back in service rebooted."""
        S = self._S
        self._down[idx] = False
        self._lost[idx] = False
        self._down_until[idx] = np.inf
        hosts_back = np.unique(self._hidx[idx])
        hosts_back = hosts_back[~self._down.reshape(self.H, self.G)[hosts_back].any(axis=1)]
        reset = np.union1d(idx, (hosts_back[:, None] * self.G + np.arange(self.G)).ravel())
        S[np.ix_(_VOLATILE, reset)] = 0
        S[_ROW["remap_pending"], reset] = 0
        S[_ROW["remap_failure"], idx] = 0
        S[_ROW["pcie_link_width"], idx] = self._width[idx]
        self._pv_us[reset] = 0
        self._tv_us[reset] = 0
        self._cool[idx] = 1.0
        self._temp[idx] = self._ambient()[self._hidx[idx]] + 5.0
        self._schedule(idx, self._t)

    # ----- physics -----

    def _ambient(self) -> np.ndarray:
        return self._amb0 + 2.0 * np.sin(2 * math.pi * self._t / DAY_S + self._amb_phase)  # day/night swing

    def _bursts(self, lam: np.ndarray, mean_size: float) -> np.ndarray:
        """Counter increments from Poisson bursts with geometric sizes; drawn only where lam > 0."""
        k = self._rng.poisson(lam * self.dt)
        nz = np.flatnonzero(k)
        if mean_size > 1 and nz.size:
            k[nz] = [int(self._rng.geometric(1.0 / mean_size, c).sum()) for c in k[nz].tolist()]
        return k

    def _advance(self) -> None:
        c, rng, n, H, G = self.cfg, self._rng, self.n, self.H, self.G
        t = self._t = self._t + self.dt
        self._seq += 1
        self._xid = {}
        jit = min(c.ts_jitter_s, 0.45 * self.dt)
        self._host_ts = t + (rng.uniform(-jit, jit, H) if jit > 0 else np.zeros(H))
        S, hidx = self._S, self._hidx

        if self._down.any():
            back = np.flatnonzero(self._down & (t >= self._down_until))
            if back.size:
                self._repair(back)
        failing = np.flatnonzero(t >= self._f_fail)  # down GPUs have f_fail = inf
        if failing.size:
            self._fail(failing)
        down = self._down

        # Jobs: every GPU of a host busy together; a host with a down GPU is drained until repaired.
        host_down = down.reshape(H, G).any(axis=1)
        flip = np.flatnonzero(t >= self._phase_end)
        if flip.size:
            start = flip[~self._busy[flip]]
            end = flip[self._busy[flip]]
            self._busy[start], self._busy[end] = True, False
            self._job_start[start] = t
            self._intensity[start] = rng.uniform(0.75, 1.12, start.size)
            self._mem_frac[start] = rng.uniform(0.6, 0.97, start.size)
            self._phase_end[start] = t + _loguniform(rng, *c.job_len_s, start.size)
            self._phase_end[end] = t + _loguniform(rng, *c.idle_len_s, end.size)
        if host_down.any():
            self._busy[host_down] = False
            self._phase_end[host_down] = t + self.dt
        stall = rng.random(H) < self.dt / 1800.0  # checkpoint/eval stalls inside jobs
        if stall.any():
            self._stall_until[stall] = t + rng.uniform(20.0, 90.0, int(stall.sum()))
        busy = self._busy[hidx]
        warm = busy & (((t - self._job_start) < WARMUP_S) | (self._stall_until > t))[hidx]

        z = rng.standard_normal((5, n))
        util = np.where(
            busy, np.where(warm, np.abs(z[0]) * 12.0, np.clip(97.0 + 2.0 * z[0], 80.0, 100.0)), 0.0
        )
        util = np.rint(util)
        util[down] = 0.0

        # Precursor ramps (0 -> 1 across the window) on the few GPUs that are in one.
        cool = self._cool
        p_noise = 1.5 + 5.0 * (util / 100.0)  # sensor and workload noise, watts (1 sigma)
        pre = np.flatnonzero(t >= self._f_pstart)
        ramp = np.clip(
            (t - self._f_pstart[pre]) / np.maximum(self._f_fail[pre] - self._f_pstart[pre], 1.0), 0, 1
        )
        pm, st = self._f_mode[pre], self._f_strength[pre]
        sbe_lam = np.zeros(n)
        replay_lam = np.zeros(n)
        crc_lam = np.zeros(n)
        if pre.size:
            th = pm == M_THERMAL  # fan wears out: it spins faster but moves less air
            cool[pre[th]] = np.maximum(1.0 - 0.55 * st[th] * ramp[th], 0.2)
            pw = pm == M_POWER
            p_noise[pre[pw]] *= 1.0 + 3.0 * st[pw] * ramp[pw]
            brake = pw & (rng.random(pre.size) < st * (0.3 + 6.0 * ramp**2) * self.dt / 600.0)
            self._brake_until[pre[brake]] = t + rng.uniform(2.0, 20.0, int(brake.sum()))
            mem = pm == M_MEMORY
            sbe_lam[pre[mem]] = st[mem] * 0.01 * (1.0 + 40.0 * ramp[mem] ** 2)
            span = np.maximum(self._f_fail[pre] - self._f_pstart[pre], 60.0)
            remap = mem & (rng.random(pre.size) < st * 6.0 * ramp * self.dt / span)  # ~3*st remaps per window
            for i in pre[remap].tolist():
                S[_ROW["remapped_rows_correctable"], i] += 1
                S[_ROW["remap_pending"], i] = 1
                self._xid[i] = [63]
            ic = pm == M_INTERCONNECT
            pcie = ic & (self._f_sub[pre] != 1)
            nvl = ic & (self._f_sub[pre] == 1)
            replay_lam[pre[pcie]] = st[pcie] * 0.005 * (1.0 + 60.0 * ramp[pcie] ** 2)
            crc_lam[pre[nvl]] = st[nvl] * 0.005 * (1.0 + 60.0 * ramp[nvl] ** 2)
            narrow = pcie & (ramp >= self._f_width_at[pre])
            S[_ROW["pcie_link_width"], pre[narrow]] = self._width[pre[narrow]] // 2
            rec = nvl & (rng.random(pre.size) < st * 0.002 * ramp * self.dt)
            S[_ROW["nvlink_recovery_errors"], pre[rec]] += 1
        blip = rng.random(H) < c.power_brake_per_host_day * self.dt / DAY_S
        if blip.any():
            self._brake_until[np.isin(hidx, np.flatnonzero(blip))] = t + rng.uniform(1.0, 5.0)

        # Clocks and power: thermal and brake slowdowns cut clocks; the power cap trims what is left.
        braking = self._brake_until > t
        sw_th = self._temp >= SW_THERMAL_C
        hw_th = self._temp >= HW_THERMAL_C
        cf = (1.0 - 0.15 * sw_th - 0.30 * hw_th) * np.where(braking, 0.35, 1.0)
        load = util / 100.0 * self._intensity[hidx]
        dyn = self._dyn_w * load * cf**1.3
        p_dem = self._idle_w + dyn + p_noise * z[1]
        lim = c.power_limit_w
        capped = p_dem > lim
        power = np.where(capped, lim - np.abs(z[2]) * 3.0, np.maximum(p_dem, 20.0))
        cf = cf * np.where(
            capped, np.clip((lim - self._idle_w) / np.maximum(p_dem - self._idle_w, 1.0), 0, 1), 1.0
        )
        if pre.size:
            # transient excursions past the limit, each followed by a brake
            exc = (pm == M_POWER) & (rng.random(pre.size) < st * 0.02 * ramp)
            if exc.any():
                power[pre[exc]] = lim * rng.uniform(1.02, 1.15, int(exc.sum()))
                self._brake_until[pre[exc]] = t + rng.uniform(2.0, 8.0, int(exc.sum()))

        # First-order thermal model, fan controller chasing temperature.
        fan_ff = 1.0 if c.fanless else 1.45 - 0.006 * self._fan
        target = self._ambient()[hidx] + self._r_th * fan_ff / cool * power
        self._temp += self._a_t * (target - self._temp) + 0.15 * z[3]
        f_target = np.clip(30.0 + 2.2 * (self._temp - 45.0), 30.0, 100.0)
        self._fan += self._a_f * (f_target - self._fan)

        active = busy & ~down
        sm = np.where(active, np.rint(MAX_CLOCK_MHZ * cf / 15.0) * 15.0, IDLE_CLOCK_MHZ)
        mem_ramp = np.minimum((t - self._job_start[hidx]) / WARMUP_S, 1.0)
        mem_used = np.where(
            active, self._mem_frac[hidx] * c.mem_total_mib * mem_ramp + self._mem_off, IDLE_MEM_MIB
        )
        util_mem = np.where(
            active, np.clip(40.0 * self._intensity[hidx] * cf + 4.0 * z[4], 0, 100) * util / 100, 0
        )
        throttle = (
            F.THROTTLE_GPU_IDLE * ~active
            | F.THROTTLE_SW_POWER_CAP * capped
            | F.THROTTLE_SW_THERMAL * sw_th
            | (F.THROTTLE_HW_THERMAL | F.THROTTLE_HW_SLOWDOWN) * hw_th
            | (F.THROTTLE_HW_POWER_BRAKE | F.THROTTLE_HW_SLOWDOWN) * braking
        )
        step_us = int(self.dt * 1e6)
        self._pv_us += step_us * (capped | braking)
        self._tv_us += step_us * (sw_th | hw_th)

        # Counters: background rates everywhere, precursor bursts on the failing few.
        sbe = (rng.random(n) < self._sbe_rate * self.dt) + self._bursts(sbe_lam, 3.3)
        S[_ROW["ecc_sbe_volatile"]] += sbe
        S[_ROW["ecc_sbe_aggregate"]] += sbe
        S[_ROW["pcie_replay"]] += (rng.random(n) < self._replay_rate * self.dt) + self._bursts(
            replay_lam, 5.0
        )
        crc = (rng.random(n) < self._crc_rate * self.dt) + self._bursts(crc_lam, 10.0)
        S[_ROW["nvlink_crc_errors"]] += crc
        if crc.any():
            S[_ROW["nvlink_replay_errors"]] += rng.binomial(crc, 0.3)
        benign = np.flatnonzero(rng.random(n) < self._remap_rate * self.dt)
        for i in benign.tolist():  # harmless remap on a trickle GPU: pending until the next reset
            S[_ROW["remapped_rows_correctable"], i] += 1
            S[_ROW["remap_pending"], i] = 1
            self._xid.setdefault(i, []).append(63)

        i64 = np.int64
        self._cols = {
            "temp_c": self._temp, "power_w": power, "mem_used_mib": mem_used.astype(i64),
            "util_gpu_pct": util.astype(i64), "sm_clock_mhz": sm.astype(i64), "fan_pct": self._fan,
            "util_mem_pct": np.rint(util_mem).astype(i64),
            "pcie_link_gen": np.where(active, 5, 1), "throttle_reasons": throttle,
        }  # fmt: skip

    # ----- rendering -----

    def _render(self) -> list[str]:
        """One JSON line per host, time-ordered (hosts sorted by jittered ts); sets self._order."""
        S, G, cols = self._S, self.G, self._cols
        dirty = np.flatnonzero((S != self._S_prev).any(axis=0))
        if dirty.size:
            np.copyto(self._S_prev, S)
            nint = len(_SLOW_INT)
            for i, row in zip(dirty.tolist(), S[:, dirty].T.tolist(), strict=True):
                self._gpu_head[i] = self._prefix[i] + _SLOW_FMT % (
                    *row[:nint],
                    *(_BOOL[v] for v in row[nint:]),
                )
        fan = (
            self._null_col
            if self.cfg.fanless
            else list(map(str, np.rint(cols["fan_pct"]).astype(np.int64).tolist()))
        )
        xid = self._empty_col.copy()
        for i, codes in self._xid.items():
            xid[i] = "[" + ",".join(map(str, codes)) + "]"
        gpus = [
            _DYN_FMT % row
            for row in zip(
                self._gpu_head, cols["temp_c"].tolist(), cols["power_w"].tolist(),
                cols["mem_used_mib"].tolist(), cols["util_gpu_pct"].tolist(), cols["sm_clock_mhz"].tolist(),
                fan,
                cols["util_mem_pct"].tolist(), cols["pcie_link_gen"].tolist(), self._pv_us.tolist(),
                self._tv_us.tolist(), cols["throttle_reasons"].tolist(), xid, strict=True,
            )
        ]  # fmt: skip
        for i in np.flatnonzero(self._lost).tolist():
            gpus[i] = self._lost_fmt[i] % xid[i]
        ts = self._host_ts.tolist()
        order = (
            np.argsort(self._host_ts, kind="stable").tolist() if self.cfg.ts_jitter_s > 0 else range(self.H)
        )
        self._order = order
        seq = self._seq
        return [
            f'{self._head[h]}{ts[h]:.3f},"seq":{seq},"gpus":[{",".join(gpus[h * G : (h + 1) * G])}]}}'
            for h in order
        ]

    def _step_lines(self) -> list[str]:
        self._advance()
        return self._render()


class _BackgroundWriter:
    """Writes byte chunks on a thread: file writes release the GIL, so disk time overlaps rendering."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._err: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="gpuwatch-sim-writer", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            if self._err is None:
                try:
                    self._f.write(chunk)
                except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                    self._err = e

    def write(self, chunk: bytes) -> None:
        if self._err is not None:
            raise self._err
        self._q.put(chunk)

    def __enter__(self) -> _BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._q.put(None)
        self._t.join()
        self._f.close()
        if self._err is not None and exc[0] is None:
            raise self._err


def simulate_to_dir(
    hosts: int, gpus_per_host: int, days: float, out: Path, seed: int = 0, interval_s: float = 1.0,
    config_overrides: dict | None = None, progress: Callable[[float], None] | None = None,
) -> dict:  # fmt: skip
    """Fast-forward a fleet for `days` and write out/samples.jsonl, out/labels.jsonl and out/meta.json.

    samples.jsonl: time-ordered `gpuwatch.samples/1` snapshots, one per line. labels.jsonl: one record per
    failure that happened (repair_end_ts may lie past the end), then one per precursor still running at the
    end (fail_ts in the future, repair_end_ts null). `progress(fraction)` is called about every 1 %.
    Returns {"gpu_samples", "seconds", "gpu_samples_per_s", "failures", "by_mode"}.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(config_overrides or {})
    overrides.setdefault("start_ts", 1_700_000_000.0)  # fixed default start keeps reruns byte-identical
    cfg = FleetConfig(hosts=hosts, gpus_per_host=gpus_per_host, seed=seed, interval_s=interval_s, **overrides)
    sim = FleetSimulator(cfg)
    steps = max(int(round(days * DAY_S / interval_s)), 0)
    every = max(steps // 100, 1)
    t_start = time.perf_counter()
    with _BackgroundWriter(out / "samples.jsonl") as w:
        buf: list[str] = []
        for k in range(steps):
            buf.extend(sim._step_lines())
            if len(buf) >= 2048:
                buf.append("")  # trailing newline
                w.write("\n".join(buf).encode())
                buf = []
            if progress is not None and k % every == 0:
                progress(k / steps)
        if buf:
            buf.append("")
            w.write("\n".join(buf).encode())
    labels = sim.drain_labels()
    pending = sim.pending_labels()
    with open(out / "labels.jsonl", "wb") as f:
        for lab in labels + pending:
            f.write(orjson.dumps(lab) + b"\n")
    seconds = time.perf_counter() - t_start
    n = steps * sim.n
    by_mode = {m: sum(1 for lab in labels if lab["mode"] == m) for m in MODES}
    stats = {
        "gpu_samples": n, "seconds": round(seconds, 3), "gpu_samples_per_s": round(n / max(seconds, 1e-9)),
        "failures": len(labels), "by_mode": by_mode,
    }  # fmt: skip
    meta = {
        "samples_schema": F.SAMPLES_SCHEMA, "seed": seed, "config": dataclasses.asdict(cfg),
        "start_ts": cfg.start_ts,
        "end_ts": sim.now, "steps": steps, "hosts": sim.hosts, "precursors_in_progress": len(pending),
        "fault_source": "StepFun InfiniteHBD trace (arXiv 2502.03885, Apache-2.0); see docs/simulator.md",
        **stats,
    }  # fmt: skip
    (out / "meta.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    if progress is not None:
        progress(1.0)
    return stats


def bench_simulator(hosts: int = 64, gpus_per_host: int = 8, days: float = 0.1, seed: int = 0) -> dict:
    """Throughput of `simulate_to_dir` (JSONL writing included) into a temporary folder; returns its stats."""
    with tempfile.TemporaryDirectory(prefix="gpuwatch-bench-") as tmp:
        stats = simulate_to_dir(hosts, gpus_per_host, days, Path(tmp), seed=seed)
        stats["bytes_per_gpu_sample"] = round(
            (Path(tmp) / "samples.jsonl").stat().st_size / max(stats["gpu_samples"], 1)
        )
    return stats
