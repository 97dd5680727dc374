"""Vectorised fleet simulator: `gpuwatch.samples/1` snapshots of a GPU fleet, with failures and labels.

All state lives in numpy arrays of shape (n_gpus,) or (n_hosts,); one `step()` advances every GPU by
`interval_s`. Ground truth never enters the samples: it leaves through `drain_labels()` only.
Hardware profiles (`simulator/hardware.py`) set each host's GPU model; benign look-alikes, each behind
its own knob, are catalogued in `simulator/lookalikes.py`.
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

from gpuwatch.schemas import fields as F
from gpuwatch.simulator import faults, lookalikes
from gpuwatch.simulator.hardware import LEGACY, HardwareProfile, profile

MODES = faults.MODES
M_MEMORY, M_THERMAL, M_POWER, M_INTERCONNECT, M_SUDDEN = range(5)
DAY_S = 86400.0
SW_THERMAL_C, HW_THERMAL_C = 87.0, 92.0
WARMUP_S = 60.0  # a job loads data and allocates memory before it saturates the GPU
FAST_TAU_S = 0.7  # the die's own thermal time constant (H200 recording: ~70 % of a power step within 1 s)
# Look-alike event shapes (rates are FleetConfig knobs; docs/simulator.md explains each).
APP_FAULT_XIDS = (31, 13, 43)  # MMU fault, graphics engine exception, GPU stopped processing: the app's fault
APP_FAULT_P = (0.5, 0.3, 0.2)
APP_KILL_XID = 45  # preemptive cleanup: a process killed with work in flight
REBOOT_S, DRIVER_RELOAD_S, SWAP_S = (180.0, 600.0), (20.0, 90.0), (1800.0, 5400.0)
LIMIT_FRAC, LIMIT_HOURS = (0.55, 0.85), (2.0, 24.0)  # operator power caps: share of the max limit, duration
START_BUSY_POWER = 0.85  # a busy GPU's starting temperature is set as if it drew this share of its power limit
AMBIENT_RISE_C, AMBIENT_HOLD_S, AMBIENT_RAMP_S = (4.0, 12.0), (1200.0, 7200.0), (300.0, 900.0)
SBE_BURST_MEAN, SBE_BURST_REMAP_P = 30.0, 0.25
_RX_STREAM = 0x5EED  # root of the look-alike generators: knobs at 0 leave the legacy stream untouched
_RX_KINDS = ("hardware", "jobs", "boot", "limit", "ambient", "app", "sbe", "board")  # one generator each


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
    # Board of the legacy profile "h100-fan" (the other profiles carry their own limit and memory).
    power_limit_w: float = 700.0
    mem_total_mib: int = 81559
    # Hardware: a profile name or {name: share} drawn per host (hosts are homogeneous); simulator/hardware.py.
    hardware: str | dict[str, float] = LEGACY
    # More benign look-alikes, all off by default (their real prevalence: simulator/lookalikes.py).
    power_cap_job_frac: float | None = None  # share of jobs at the power cap throughout; None: the profile's
    app_xid_per_host_day: float = 0.0  # jobs ending in an application XID (13/31/43/45), one GPU or all
    reboot_per_host_day: float = 0.0  # host reboots and driver reloads: silence, then volatile counters reset
    power_limit_change_per_host_day: float = 0.0  # an operator lowers a host's power limit for hours
    board_swap_per_host_day: float = 0.0  # maintenance window, then one GPU is a new board (new uuid)
    board_replace_frac: float = 0.0  # share of repairs after which the GPU is a new board
    sbe_burst_per_gpu_day: float = 0.0  # one-off SBE bursts (sometimes a row remap) that never recur
    ambient_excursion_per_host_day: float = 0.0  # a host's inlet air warms 4-12 °C for up to two hours
    # What a power cap does to a thermal or power precursor (an assumption, docs/simulator.md): while the cap
    # cuts the power the GPU would draw by a share c, the precursor advances at max(0, 1 - c / this) of its pace.
    throttle_halt_cut: float = 0.3

    @classmethod
    def realistic(cls, **overrides: object) -> FleetConfig:
        """A fleet with the realistic hardware mix and every look-alike at its stated prevalence."""
        return cls(**{**lookalikes.realistic_overrides(), **overrides})  # type: ignore[arg-type]


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
_DYN_FMT = "%s" + "".join(f'"{k}":{f},' for k, f in _DYN) + '"lost":false,"throttle_reasons":%d,"xid":%s}'
_NUMERIC_ALL = _STATIC_NUM + _SLOW_INT + tuple(k for k, _ in _DYN)
_LOST_FMT = "".join(f'"{k}":null,' for k in _NUMERIC_ALL) + "".join(f'"{k}":false,' for k in _SLOW_FLAG)
_LOST_FMT = _LOST_FMT.replace("%", "%%") + '"lost":true,"throttle_reasons":0,"xid":%s}'
_BOOL = ("false", "true")


def _slow_fmt(nulls: frozenset[str]) -> str:
    """Format of a GPU's slow fields; fields its board leaves null read null (`%.0s` still takes the arg)."""
    ints = "".join(f'"{k}":%.0snull,' if k in nulls else f'"{k}":%d,' for k in _SLOW_INT)
    return ints + "".join(f'"{k}":%.0snull,' if k in nulls else f'"{k}":%s,' for k in _SLOW_FLAG)


# A field added to schemas/fields.py must be rendered here too; fail at import rather than ship bad samples.
if set(_NUMERIC_ALL) != set(F.ALL_NUMERIC) or set(_SLOW_FLAG) | {"lost"} != set(F.ALL_FLAGS):
    raise ImportError("simulator render layout is out of date with schemas/fields.py")


def _gpu_uuid(seed: int, host: str, index: int, board: int = 0) -> str:
    key = f"{seed}/{host}/{index}" + (f"/{board}" if board else "")  # board > 0: a replacement board
    h = hashlib.sha1(key.encode()).hexdigest()
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
        # Hardware draws and each kind of look-alike event have their own generator, so turning a knob on
        # leaves the rest of the fleet's random streams (and a legacy fleet's output) as they were.
        seeds = np.random.SeedSequence([c.seed, _RX_STREAM]).spawn(len(_RX_KINDS))
        self._rx = {k: np.random.default_rng(s) for k, s in zip(_RX_KINDS, seeds, strict=True)}
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
        self._init_hardware()
        self._init_lookalikes()
        col = self._col

        # Static heterogeneity: hosts differ in ambient, GPUs in heatsink, idle power and time constant.
        self._amb0 = rng.uniform(18.0, 32.0, H)
        self._amb_phase = rng.uniform(0, 2 * math.pi, H)
        self._r_th = rng.normal(col(lambda p: p.r_th[0]), col(lambda p: p.r_th[1]))
        hot = rng.random(n) < c.hot_gpu_frac
        self._r_th[hot] *= rng.uniform(1.6, 2.3, int(hot.sum()))
        self._idle_w = rng.uniform(col(lambda p: p.idle_w[0]), col(lambda p: p.idle_w[1]))
        self._dyn_w = rng.uniform(col(lambda p: p.dyn_w[0]), col(lambda p: p.dyn_w[1]))
        self._a_t = 1.0 - np.exp(-self.dt / rng.uniform(col(lambda p: p.tau_s[0]), col(lambda p: p.tau_s[1])))
        self._a_f = 1.0 - math.exp(-self.dt / 8.0)  # fan controller lag
        self._mem_off = rng.integers(-300, 300, n)
        self._sbe_rate = np.full(n, 2e-6)  # per second; most GPUs see a handful of SBEs per year
        trickle = rng.random(n) < c.sbe_trickle_frac
        self._sbe_rate[trickle] = rng.uniform(5e-4, 1e-2, int(trickle.sum()))
        self._remap_rate = np.where(trickle, 1.0 / (5 * DAY_S), 0.0)
        self._replay_rate = np.full(n, 1e-6)
        self._crc_rate = np.full(n, 3e-7)
        marg = rng.random(n) < c.replay_trickle_frac
        on_nvl = (rng.random(n) < 0.5) & self._has_nvl  # a board without NVLink trickles on its PCIe link
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
        # GPUs born with a benign look-alike, by kind (simulator/lookalikes.py names): what an evaluation needs
        # to tell a false action on a look-alike from one on a plain GPU. Events (brake blips, application
        # XIDs, reboots, ...) come and go on any GPU and are not listed.
        self.static_lookalikes: dict[str, np.ndarray] = {
            "hot_gpu": hot, "sbe_trickle": trickle, "replay_trickle": marg, "narrow_link": self._width == 8,
            "remap_pending": S[_ROW["remap_pending"]] > 0,
        }  # fmt: skip
        # Boards that retire pages instead of remapping rows: the same history, counted as retired pages.
        ret = np.flatnonzero(self._row_pend != _ROW["remap_pending"])
        if ret.size:
            S[_ROW["retired_pages"], ret] = (
                S[_ROW["remapped_rows_correctable"], ret] + S[_ROW["remapped_rows_uncorrectable"], ret]
            )
            S[_ROW["retired_pages_pending"], ret] = S[_ROW["remap_pending"], ret]
            S[np.ix_([_ROW[k] for k in ("remapped_rows_correctable", "remapped_rows_uncorrectable",
                                        "remap_pending")], ret)] = 0  # fmt: skip
        self._S_prev = np.full_like(S, -1)
        self._pv_us = np.zeros(n, dtype=np.int64)
        self._tv_us = np.zeros(n, dtype=np.int64)

        # Load state per host.
        self._busy = rng.random(H) < 0.75
        self._phase_end = self._t + np.where(
            self._busy, rng.uniform(0, 1, H) * c.job_len_s[1], rng.uniform(0, 1, H) * c.idle_len_s[1]
        )
        self._job_start = np.full(H, self._t - 3600.0)
        self._intensity = np.zeros(H)
        self._mem_level = np.zeros(H)  # memory-bus utilisation of the job at full clock, %
        self._new_jobs(np.arange(H))
        self._mem_frac = rng.uniform(0.6, 0.97, H)
        self._stall_until = np.zeros(H)
        amb = self._ambient()[self._hidx]
        if self._t_off is None:
            self._temp = amb + self._r_th * np.where(self._busy[self._hidx], 600.0, 70.0)
        else:
            busy_w = np.where(self._busy[self._hidx], START_BUSY_POWER * self._lim, self._idle_w)
            self._temp = amb + self._t_off + self._r_th * busy_w
        self._temp_fast = None if self._fast_frac is None else self._temp.copy()
        self._temp_rep = self._temp  # what NVML reports: slow + fast parts (in legacy the same array)
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
        self._prefix = [self._make_prefix(i) for i in range(n)]
        self._lost_fmt = [p.split('"power_limit_w"')[0].replace("%", "%%") + _LOST_FMT for p in self._prefix]
        self._gpu_head = [""] * n  # static prefix + slow fields, re-rendered when the slow fields change
        self._head = [f'{{"schema":"{F.SAMPLES_SCHEMA}","host":"{h}","ts":' for h in self.hosts]
        self._xid: dict[int, list[int]] = {}
        self._null_col, self._empty_col = ["null"] * n, ["[]"] * n
        self._cols: dict[str, np.ndarray] = {}
        self._host_ts = np.full(H, self._t)

    def _init_hardware(self) -> None:
        """Profile per host (`hardware`: a name, or {name: share} drawn per host), board values per GPU."""
        c, H, G = self.cfg, self.H, self.G
        if isinstance(c.hardware, str):
            names, host_hw = [c.hardware], np.zeros(H, dtype=np.int64)
        else:
            names = [k for k, v in c.hardware.items() if v > 0]
            if not names:
                raise ValueError("hardware needs a positive share for at least one profile")
            share = np.array([float(c.hardware[k]) for k in names])
            host_hw = self._rx["hardware"].choice(len(names), size=H, p=share / share.sum())
        profs = self._profiles = [profile(k) for k in names]
        self.host_hardware = [names[k] for k in host_hw.tolist()]
        hw = self._hw_of_gpu = np.repeat(host_hw, G)
        col = self._col
        legacy = col(lambda p: p.name == LEGACY)
        self._lim0 = np.where(legacy, float(c.power_limit_w), col(lambda p: p.power_limit_w))
        self._lim = self._lim0.copy()  # the power limit now (an operator may lower it for a while)
        self._mem_total = np.where(legacy, int(c.mem_total_mib), col(lambda p: p.mem_total_mib))
        self._max_clk = col(lambda p: float(p.max_clock_mhz))
        self._clk_cap = np.ones(self.n)  # a clock lock's ceiling, share of the maximum clock (1: not locked)
        self._idle_clk = col(lambda p: float(p.idle_clock_mhz))
        self._mem_clk = col(lambda p: p.mem_clock_mhz)
        self._gen_max = col(lambda p: p.pcie_gen_max)
        self._gen_idle = col(lambda p: p.pcie_gen_idle)
        self._idle_mem = col(lambda p: p.idle_mem_mib)
        self._cap_margin = col(lambda p: p.cap_margin_w)
        self._pn0, self._pn1 = col(lambda p: p.p_noise_w[0]), col(lambda p: p.p_noise_w[1])
        self._has_nvl = col(lambda p: p.nvlink)
        self._no_nvl = None if self._has_nvl.all() else ~self._has_nvl
        self._has_fan = col(lambda p: p.fan) & (not c.fanless)  # `fanless` hides every fan
        self._fan_all, self._fan_none = bool(self._has_fan.all()), not self._has_fan.any()
        off = col(lambda p: p.temp_offset_c)
        self._t_off = off if off.any() else None
        fast = col(lambda p: p.fast_frac)
        self._fast_frac = fast if fast.any() else None
        self._a_fast = 1.0 - math.exp(-self.dt / FAST_TAU_S)
        tint = col(lambda p: p.temp_int)
        self._temp_int = tint if tint.any() else None
        self._contained = col(lambda p: p.containment)
        # Where memory repairs are counted: remapped rows (Ampere and later) or retired pages (Volta).
        retire = col(lambda p: p.retired_pages and not p.row_remap)
        self._row_corr = np.where(retire, _ROW["retired_pages"], _ROW["remapped_rows_correctable"])
        self._row_unc = np.where(retire, _ROW["retired_pages"], _ROW["remapped_rows_uncorrectable"])
        self._row_pend = np.where(retire, _ROW["retired_pages_pending"], _ROW["remap_pending"])
        fmts = [_slow_fmt(p.null_fields) for p in profs]
        self._slow_fmt = [fmts[k] for k in hw.tolist()]
        # Per host: share of jobs at the power cap (heavy) and intensity ranges; None: the legacy single draw.
        fr = [c.power_cap_job_frac if c.power_cap_job_frac is not None else p.heavy_job_frac for p in profs]
        self._heavy_frac = None if all(f is None for f in fr) else np.array([f or 0.0 for f in fr])[host_hw]
        self._int_lo = np.array([p.intensity[0] for p in profs])[host_hw]
        self._int_hi = np.array([p.intensity[1] for p in profs])[host_hw]
        self._hvy_lo = np.array([p.heavy_intensity[0] for p in profs])[host_hw]
        self._hvy_hi = np.array([p.heavy_intensity[1] for p in profs])[host_hw]
        self._mem_legacy = np.array([p.name == LEGACY for p in profs])[host_hw]

    def _col(self, get: Callable[[HardwareProfile], object]) -> np.ndarray:
        """Per-GPU column of a profile value."""
        return np.array([get(p) for p in self._profiles])[self._hw_of_gpu]

    def _init_lookalikes(self) -> None:
        """State of the look-alike events; it stays unused while their knobs are 0."""
        c, H, n = self.cfg, self.H, self.n
        self._silent_until = (
            np.zeros(H) if c.reboot_per_host_day > 0 or c.board_swap_per_host_day > 0 else None
        )  # a host sends nothing while it reboots
        self._rejoin = np.zeros(H, dtype=bool)  # silent hosts whose counters reset when they report again
        self._rejoin_seq0 = np.zeros(H, dtype=bool)  # ...and whose agent restarts its seq at 0
        self._swap_gpu = np.full(H, -1)  # GPU that comes back as a new board, -1: none
        self._seq_base: np.ndarray | None = None  # per-host seq offset once an agent has restarted
        self._lim_until = np.full(H, np.inf)  # when an operator's lowered power limit ends
        self._amb_x = np.zeros((4, H))  # ambient excursions: start, end, peak, 0 = none
        self._amb_x[:2] = -np.inf
        self._xid_due: list[tuple[float, int, int]] = []  # application XIDs on their way to a sample
        self._board = np.zeros(n, dtype=np.int64)  # replacement count per slot (0: the original board)
        self._events_on = (
            self._silent_until is not None or c.power_limit_change_per_host_day > 0
            or c.ambient_excursion_per_host_day > 0 or c.app_xid_per_host_day > 0
        )  # fmt: skip

    def _new_jobs(self, hosts: np.ndarray) -> None:
        """Intensity and memory-bus level of jobs starting on `hosts` (heavy: demand above the cap)."""
        if self._heavy_frac is None:  # the legacy draw, one range
            self._intensity[hosts] = self._rng.uniform(self._int_lo[hosts], self._int_hi[hosts])
            self._mem_level[hosts] = 40.0 * self._intensity[hosts]
            return
        rx = self._rx["jobs"]
        heavy = rx.random(hosts.size) < self._heavy_frac[hosts]
        lo = np.where(heavy, self._hvy_lo[hosts], self._int_lo[hosts])
        hi = np.where(heavy, self._hvy_hi[hosts], self._int_hi[hosts])
        self._intensity[hosts] = self._rng.uniform(lo, hi)
        # Compute-bound (heavy) jobs keep the memory bus at a fifth to a third (the recording: 24 %); others
        # anywhere up to a saturated bus (the recording's copy phase: 100 % at 492 W).
        level = np.where(heavy, rx.uniform(18.0, 35.0, hosts.size), rx.uniform(20.0, 110.0, hosts.size))
        self._mem_level[hosts] = np.where(self._mem_legacy[hosts], 40.0 * self._intensity[hosts], level)

    def _make_prefix(self, i: int) -> str:
        """Static part of GPU i's JSON: index, uuid, board limits (redone when the limit or board changes)."""
        return (
            f'{{"gpu_index":{i % self.G},"uuid":"{self.uuids[i]}","power_limit_w":{float(self._lim[i]):.1f},'
            f'"mem_total_mib":{int(self._mem_total[i])},"mem_clock_mhz":{int(self._mem_clk[i])},'
            f'"pcie_link_width_max":16,"pcie_link_gen_max":{int(self._gen_max[i])},'
        )

    # ----- public API -----

    @property
    def hazard_per_gpu_day(self) -> np.ndarray:
        """Each GPU's failure rate while it is up (failures per GPU-day: base rate x rate_scale x its host's
        frailty): the truth a fleet forecast is checked against."""
        return self._lam_s * DAY_S

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
        if m == M_INTERCONNECT and self._f_sub[i] == 1 and not self._has_nvl[i]:
            self._f_sub[i] = 0  # no NVLink on this board: its link trouble is PCIe
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
        sub = rng.integers(0, 3, k)
        if self._no_nvl is not None:  # boards without NVLink: interconnect trouble is on the PCIe link
            sub = np.where((mode == M_INTERCONNECT) & (sub == 1) & self._no_nvl[idx], 0, sub)
        self._f_sub[idx] = sub
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
                S[self._row_unc[i], i] += 1
                S[self._row_pend[i], i] = 1
                xid = [48, 63, 94 if s == 0 else 95] if self._contained[i] else [48, 63]
                if s == 2:  # no spare rows left (or the page cannot be retired)
                    S[_ROW["remap_failure"], i] = 1
                    xid = [48, 64, 95] if self._contained[i] else [48, 64]
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
        self._reset_volatile(reset)
        S[_ROW["remap_failure"], idx] = 0
        S[_ROW["pcie_link_width"], idx] = self._width[idx]
        self._cool[idx] = 1.0
        self._temp[idx] = self._ambient()[self._hidx[idx]] + 5.0
        if self._temp_fast is not None:
            self._temp_fast[idx] = self._temp[idx]
            self._temp_rep = self._temp + self._fast_frac * (self._temp_fast - self._temp)
        self._schedule(idx, self._t)
        if self.cfg.board_replace_frac > 0:
            for i in idx[self._rx["board"].random(idx.size) < self.cfg.board_replace_frac].tolist():
                self._new_board(i)

    def _reset_volatile(self, gpus: np.ndarray) -> None:
        """A GPU reset: volatile counters and violation times to 0, pending remaps/retirements applied."""
        S = self._S
        S[np.ix_(_VOLATILE, gpus)] = 0
        S[_ROW["remap_pending"], gpus] = 0
        S[_ROW["retired_pages_pending"], gpus] = 0
        self._pv_us[gpus] = 0
        self._tv_us[gpus] = 0

    def _new_board(self, i: int) -> None:
        """Slot i gets a new board: a new uuid, counters from 0, a normal heat sink and no error trickles."""
        self._board[i] += 1
        self.uuids[i] = _gpu_uuid(self.cfg.seed, self.hosts[i // self.G], i % self.G, int(self._board[i]))
        self._S[:, i] = 0
        self._width[i] = 16
        self._S[_ROW["pcie_link_width"], i] = 16
        self._pv_us[i] = self._tv_us[i] = 0
        p = self._profiles[self._hw_of_gpu[i]]
        self._r_th[i] = self._rx["board"].normal(p.r_th[0], p.r_th[1])
        self._sbe_rate[i], self._remap_rate[i] = 2e-6, 0.0
        self._replay_rate[i], self._crc_rate[i] = 1e-6, 3e-7
        self._prefix[i] = self._make_prefix(i)
        self._lost_fmt[i] = self._prefix[i].split('"power_limit_w"')[0].replace("%", "%%") + _LOST_FMT
        self._S_prev[:, i] = -1  # re-render its head

    # ----- physics -----

    def _ambient(self) -> np.ndarray:
        amb = self._amb0 + 2.0 * np.sin(2 * math.pi * self._t / DAY_S + self._amb_phase)  # day/night swing
        if self.cfg.ambient_excursion_per_host_day > 0:  # a warm spell: ramp up, hold, ramp down
            start, end, peak = self._amb_x[0], self._amb_x[1], self._amb_x[2]
            up = np.clip((self._t - start) / AMBIENT_RAMP_S[0], 0.0, 1.0)
            down = np.clip((end - self._t) / AMBIENT_RAMP_S[1], 0.0, 1.0)
            amb = amb + peak * np.minimum(up, down)
        return amb

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
        if failing.size and self._silent_until is not None:  # a silent host fails once it reports again
            failing = failing[self._silent_until[hidx[failing]] <= t]
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
            self._new_jobs(start)
            self._mem_frac[start] = rng.uniform(0.6, 0.97, start.size)
            self._phase_end[start] = t + _loguniform(rng, *c.job_len_s, start.size)
            self._phase_end[end] = t + _loguniform(rng, *c.idle_len_s, end.size)
        if host_down.any():
            self._busy[host_down] = False
            self._phase_end[host_down] = t + self.dt
        if self._events_on:
            self._host_events(t, host_down)
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
        p_noise = self._pn0 + self._pn1 * (util / 100.0)  # sensor and workload noise, watts (1 sigma)
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
            for i in pre[remap].tolist():  # a row remapped (a page retired on boards without row remapping)
                S[self._row_corr[i], i] += 1
                S[self._row_pend[i], i] = 1
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
        sw_th = self._temp_rep >= SW_THERMAL_C
        hw_th = self._temp_rep >= HW_THERMAL_C
        cf = (1.0 - 0.15 * sw_th - 0.30 * hw_th) * np.where(braking, 0.35, 1.0)
        load = util / 100.0 * self._intensity[hidx]
        dyn = self._dyn_w * load * cf**1.3
        p_dem = p_free = self._idle_w + dyn + p_noise * z[1]
        if self._clk_cap.min() < 1.0:  # a clock lock caps the clocks first; the power they need follows
            cf = np.minimum(cf, self._clk_cap)
            p_dem = self._idle_w + self._dyn_w * load * cf**1.3 + p_noise * z[1]
        lim = self._lim
        capped = p_dem > lim
        power = np.where(capped, lim - self._cap_margin - np.abs(z[2]) * 3.0, np.maximum(p_dem, 20.0))
        cf = cf * np.where(
            capped, np.clip((lim - self._idle_w) / np.maximum(p_dem - self._idle_w, 1.0), 0, 1), 1.0
        )
        if pre.size:
            self._slow_precursors(pre, p_free, np.minimum(p_dem, lim))
            # transient excursions past the limit, each followed by a brake
            exc = (pm == M_POWER) & (rng.random(pre.size) < st * 0.02 * ramp)
            if exc.any():
                power[pre[exc]] = lim[pre[exc]] * rng.uniform(1.02, 1.15, int(exc.sum()))
                self._brake_until[pre[exc]] = t + rng.uniform(2.0, 8.0, int(exc.sum()))

        # First-order thermal model (plus the die's fast part on modern boards), fan controller chasing it.
        if self._fan_all:
            fan_ff = 1.45 - 0.006 * self._fan
        elif self._fan_none:
            fan_ff = 1.0
        else:
            fan_ff = np.where(self._has_fan, 1.45 - 0.006 * self._fan, 1.0)
        target = self._ambient()[hidx] + self._r_th * fan_ff / cool * power
        if self._t_off is not None:  # passive boards: server fans run slow at low load, so idle sits warm
            target += self._t_off / cool
        self._temp += self._a_t * (target - self._temp) + 0.15 * z[3]
        if self._temp_fast is not None:
            self._temp_fast += self._a_fast * (target - self._temp_fast)
            self._temp_rep = self._temp + self._fast_frac * (self._temp_fast - self._temp)
        f_target = np.clip(30.0 + 2.2 * (self._temp_rep - 45.0), 30.0, 100.0)
        self._fan += self._a_f * (f_target - self._fan)

        active = busy & ~down
        sm = np.where(active, np.rint(self._max_clk * cf / 15.0) * 15.0, self._idle_clk)
        if self._clk_cap.min() < 1.0:  # a locked ceiling is never exceeded by the rounding to 15 MHz steps
            ceiling = np.floor(self._max_clk * self._clk_cap / 15.0) * 15.0
            sm = np.minimum(sm, np.maximum(ceiling, self._idle_clk))
        mem_ramp = np.minimum((t - self._job_start[hidx]) / WARMUP_S, 1.0)
        mem_used = np.where(
            active, self._mem_frac[hidx] * self._mem_total * mem_ramp + self._mem_off, self._idle_mem
        )
        util_mem = np.where(active, np.clip(self._mem_level[hidx] * cf + 4.0 * z[4], 0, 100) * util / 100, 0)
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
            S[self._row_corr[i], i] += 1
            S[self._row_pend[i], i] = 1
            self._xid.setdefault(i, []).append(63)
        if c.sbe_burst_per_gpu_day > 0:
            self._sbe_bursts()
        if self._xid_due:
            self._deliver_xids(t)

        temp = self._temp_rep
        if self._temp_int is not None:  # NVML reports whole degrees
            temp = np.where(self._temp_int, np.rint(temp), temp)
        i64 = np.int64
        self._cols = {
            "temp_c": temp, "power_w": power, "mem_used_mib": mem_used.astype(i64),
            "util_gpu_pct": util.astype(i64), "sm_clock_mhz": sm.astype(i64), "fan_pct": self._fan,
            "util_mem_pct": np.rint(util_mem).astype(i64),
            "pcie_link_gen": np.where(active, self._gen_max, self._gen_idle), "throttle_reasons": throttle,
        }  # fmt: skip

    # ----- benign look-alike events (rare: Python loops run over the few hosts or GPUs they hit) -----

    def _host_events(self, t: float, host_down: np.ndarray) -> None:
        """Reboots, board swaps, operator power caps, warm spells and application crashes, by their knobs."""
        c, H, G = self.cfg, self.H, self.G
        p = self.dt / DAY_S
        quiet = ~host_down  # hosts in service that report
        if self._silent_until is not None:
            back = np.flatnonzero(self._rejoin & (self._silent_until <= t))
            for h in back.tolist():
                self._rejoin_host(h)
            silent = self._silent_until > t
            self._busy[silent] = False  # no job runs on a host that is rebooting
            self._phase_end[silent] = np.maximum(self._phase_end[silent], self._silent_until[silent])
            quiet &= ~silent
            rx = self._rx["boot"]
            boot = quiet & (rx.random(H) < c.reboot_per_host_day * p)
            swap = quiet & ~boot & (rx.random(H) < c.board_swap_per_host_day * p)
            for h in np.flatnonzero(boot | swap).tolist():
                if swap[h]:  # a maintenance window, then one slot holds a new board
                    self._silence(h, t + rx.uniform(*SWAP_S), True, h * G + int(rx.integers(G)))
                elif rx.random() < 1 / 3:  # driver reload: the agent keeps running, its seq keeps counting
                    self._silence(h, t + rx.uniform(*DRIVER_RELOAD_S), False, -1)
                else:
                    self._silence(h, t + rx.uniform(*REBOOT_S), True, -1)
            quiet &= ~(boot | swap)
        if c.power_limit_change_per_host_day > 0:
            for h in np.flatnonzero(self._lim_until <= t).tolist():
                self._set_limit(h, None)
                self._lim_until[h] = np.inf
            rx = self._rx["limit"]
            cap = np.flatnonzero(
                np.isinf(self._lim_until) & (rx.random(H) < c.power_limit_change_per_host_day * p)
            )
            for h in cap.tolist():
                self._set_limit(h, float(rx.uniform(*LIMIT_FRAC)))
                self._lim_until[h] = t + rx.uniform(*LIMIT_HOURS) * 3600.0
        if c.ambient_excursion_per_host_day > 0:
            rx = self._rx["ambient"]
            warm = np.flatnonzero(
                (self._amb_x[1] <= t) & (rx.random(H) < c.ambient_excursion_per_host_day * p)
            )
            if warm.size:
                hold = rx.uniform(*AMBIENT_HOLD_S, warm.size)
                self._amb_x[0, warm] = t
                self._amb_x[1, warm] = t + AMBIENT_RAMP_S[0] + hold + AMBIENT_RAMP_S[1]
                self._amb_x[2, warm] = rx.uniform(*AMBIENT_RISE_C, warm.size)
        if c.app_xid_per_host_day > 0:
            crash = np.flatnonzero(
                quiet & self._busy & (self._rx["app"].random(H) < c.app_xid_per_host_day * p)
            )
            for h in crash.tolist():
                self._app_crash(h, t)

    def _silence(self, h: int, until: float, seq_restart: bool, swap_gpu: int) -> None:
        """Host h stops reporting until `until` (its job is killed); it rejoins with reset counters."""
        self._silent_until[h] = until
        self._rejoin[h] = True
        self._rejoin_seq0[h] = seq_restart
        self._swap_gpu[h] = swap_gpu
        self._busy[h] = False
        self._phase_end[h] = until + _loguniform(self._rx["boot"], *self.cfg.idle_len_s, 1)[0]

    def _rejoin_host(self, h: int) -> None:
        """Host h reports again after a reboot or reload: GPUs reset, a swapped slot holds a new board."""
        gpus = np.arange(h * self.G, (h + 1) * self.G)
        gpus = gpus[~self._down[gpus]]  # a GPU down for repair keeps its own state
        self._reset_volatile(gpus)
        i = int(self._swap_gpu[h])
        if i >= 0 and not self._down[i]:  # a new board, with its own hazard (the old one's left with it)
            self._new_board(i)
            self._cool[i] = 1.0
            self._schedule(np.array([i]), self._t)
        if self._rejoin_seq0[h]:  # the agent restarted with the host: its seq starts again at 0
            if self._seq_base is None:
                self._seq_base = np.zeros(self.H, dtype=np.int64)
            self._seq_base[h] = self._seq
        self._rejoin[h] = False
        self._swap_gpu[h] = -1

    def _set_limit(self, h: int, frac: float | None) -> None:
        """Host h's power limit to `frac` of its maximum, in 25 W steps as operators set it; None: restore."""
        gpus = np.arange(h * self.G, (h + 1) * self.G)
        lim0 = self._lim0[gpus]
        self._lim[gpus] = lim0 if frac is None else np.maximum(np.round(lim0 * frac / 25.0) * 25.0, 100.0)
        for i in gpus.tolist():
            self._prefix[i] = self._make_prefix(i)
            self._S_prev[:, i] = -1

    def set_power_limit(self, host_idx: int, gpu_idx: int, frac: float | None) -> float:
        """Sets GPU (host_idx, gpu_idx)'s power limit to `frac` of its default (None: back to the default), as
        the node agent's throttle does; returns the limit in watts. Samples report it in power_limit_w, the
        power the GPU draws is capped at it, and a thermal or power precursor slows while the cap bites."""
        if not (0 <= host_idx < self.H and 0 <= gpu_idx < self.G):
            raise ValueError(f"no GPU ({host_idx}, {gpu_idx}) in a {self.H}x{self.G} fleet")
        if frac is not None and not 0.0 < frac <= 1.0:
            raise ValueError(f"power limit share {frac!r} is not in (0, 1]")
        i = host_idx * self.G + gpu_idx
        self._lim[i] = self._lim0[i] if frac is None else max(float(self._lim0[i]) * frac, 100.0)
        self._prefix[i] = self._make_prefix(i)
        self._S_prev[:, i] = -1
        return float(self._lim[i])

    def lock_clocks(self, host_idx: int, gpu_idx: int, frac: float | None) -> float:
        """Locks GPU (host_idx, gpu_idx)'s SM clock at most `frac` of its maximum (None: unlocked), as the node
        agent's clock throttle does; returns the ceiling in MHz. Samples report the lower clock when it binds; the
        power the GPU draws follows its clock (dynamic power ~ clock^1.3, the simulator's law for every slowdown),
        so it runs cooler, and a thermal or power precursor slows as under a power cap of the same saving."""
        if not (0 <= host_idx < self.H and 0 <= gpu_idx < self.G):
            raise ValueError(f"no GPU ({host_idx}, {gpu_idx}) in a {self.H}x{self.G} fleet")
        if frac is not None and not 0.0 < frac <= 1.0:
            raise ValueError(f"clock share {frac!r} is not in (0, 1]")
        i = host_idx * self.G + gpu_idx
        self._clk_cap[i] = 1.0 if frac is None else frac
        return float(self._max_clk[i] * self._clk_cap[i])

    def _slow_precursors(self, pre: np.ndarray, p_free: np.ndarray, p_held: np.ndarray) -> None:
        """A power cap or clock lock that cuts a thermal or power precursor GPU's power by a share c (from what it
        would draw, `p_free`, to `p_held`) slows its precursor to max(0, 1 - c / throttle_halt_cut) of its pace:
        the precursor window and the failure move later."""
        pm = self._f_mode[pre]
        held = (self._lim[pre] < self._lim0[pre]) | (self._clk_cap[pre] < 1.0)
        sel = pre[((pm == M_THERMAL) | (pm == M_POWER)) & held]
        if not sel.size:
            return
        cut = 1.0 - np.minimum(p_held[sel] / np.maximum(p_free[sel], 1.0), 1.0)
        pace = np.clip(1.0 - cut / max(self.cfg.throttle_halt_cut, 1e-9), 0.0, 1.0)
        delay = self.dt * (1.0 - pace)
        self._f_fail[sel] += delay
        self._f_pstart[sel] += delay

    def _app_crash(self, h: int, t: float) -> None:
        """The job on host h dies of its own fault (XID 13/31/43 on one GPU) or is killed (XID 45 on all)."""
        rx, G = self._rx["app"], self.G
        self._busy[h] = False
        self._phase_end[h] = t + _loguniform(rx, *self.cfg.idle_len_s, 1)[0]
        due = t + rx.uniform(0.5, 2.5)  # the driver logs the XID a second or two later (recording: ~2 s)
        if rx.random() < 0.6:
            g = h * G + int(rx.integers(G))
            self._xid_due.append((due, g, int(rx.choice(APP_FAULT_XIDS, p=APP_FAULT_P))))
            if rx.random() < 0.5:  # the launcher then tears down the job's other ranks with work in flight
                self._xid_due.extend(
                    (due + 1.0, j, APP_KILL_XID) for j in range(h * G, (h + 1) * G) if j != g
                )
        else:
            self._xid_due.extend((due, j, APP_KILL_XID) for j in range(h * G, (h + 1) * G))

    def _deliver_xids(self, t: float) -> None:
        """Application XIDs whose time has come go into this step's samples."""
        keep = []
        for due, i, code in self._xid_due:
            if due <= t:
                if not self._down[i]:
                    self._xid.setdefault(i, []).append(code)
            else:
                keep.append((due, i, code))
        self._xid_due = keep

    def _sbe_bursts(self) -> None:
        """One-off SBE bursts (a particle strike, a transient) on random GPUs; a quarter remap their row."""
        rx, S = self._rx["sbe"], self._S
        k = rx.binomial(self.n, min(self.cfg.sbe_burst_per_gpu_day * self.dt / DAY_S, 1.0))
        if not k:
            return
        for i in rx.choice(self.n, size=min(k, self.n), replace=False).tolist():
            if self._down[i]:
                continue
            size = int(rx.geometric(1.0 / SBE_BURST_MEAN))
            S[_ROW["ecc_sbe_volatile"], i] += size
            S[_ROW["ecc_sbe_aggregate"], i] += size
            if rx.random() < SBE_BURST_REMAP_P:
                S[self._row_corr[i], i] += 1
                S[self._row_pend[i], i] = 1
                self._xid.setdefault(i, []).append(63)

    # ----- rendering -----

    def _render(self) -> list[str]:
        """One JSON line per host, time-ordered (hosts sorted by jittered ts); sets self._order."""
        S, G, cols = self._S, self.G, self._cols
        dirty = np.flatnonzero((S != self._S_prev).any(axis=0))
        if dirty.size:
            np.copyto(self._S_prev, S)
            nint = len(_SLOW_INT)
            for i, row in zip(dirty.tolist(), S[:, dirty].T.tolist(), strict=True):
                self._gpu_head[i] = self._prefix[i] + self._slow_fmt[i] % (
                    *row[:nint],
                    *(_BOOL[v] for v in row[nint:]),
                )
        if self._fan_none:
            fan = self._null_col
        else:
            fan = list(map(str, np.rint(cols["fan_pct"]).astype(np.int64).tolist()))
            if not self._fan_all:
                for i in np.flatnonzero(~self._has_fan).tolist():
                    fan[i] = "null"
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
        order: list[int] | range = (
            np.argsort(self._host_ts, kind="stable").tolist() if self.cfg.ts_jitter_s > 0 else range(self.H)
        )
        if self._silent_until is not None:  # a rebooting host sends nothing
            alive = (self._silent_until <= self._t).tolist()
            order = [h for h in order if alive[h]]
        self._order = order
        if self._seq_base is None:
            seq = self._seq
            return [
                f'{self._head[h]}{ts[h]:.3f},"seq":{seq},"gpus":[{",".join(gpus[h * G : (h + 1) * G])}]}}'
                for h in order
            ]
        seqs = (self._seq - self._seq_base).tolist()  # agents restarted with their host count from 0
        return [
            f'{self._head[h]}{ts[h]:.3f},"seq":{seqs[h]},"gpus":[{",".join(gpus[h * G : (h + 1) * G])}]}}'
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
    first_uuids = list(sim.uuids)  # a replaced board gets a new uuid; look-alikes were drawn for these
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
        "start_ts": cfg.start_ts, "host_hardware": sim.host_hardware,
        "end_ts": sim.now, "steps": steps, "hosts": sim.hosts, "precursors_in_progress": len(pending),
        "fault_source": "StepFun InfiniteHBD trace (arXiv 2502.03885, Apache-2.0); see docs/simulator.md",
        # uuids (as first issued) of the GPUs born with a static look-alike, and by kind
        "lookalike_gpus": sorted({first_uuids[i] for m in sim.static_lookalikes.values() for i in np.flatnonzero(m)}),
        "lookalike_gpus_by_kind": {k: [first_uuids[i] for i in np.flatnonzero(m)]
                                   for k, m in sim.static_lookalikes.items()},
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
