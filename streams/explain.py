"""Why this GPU: the few input signals that have moved furthest from normal, in operator words and numbers.

Deterministic and model-agnostic: an explanation ranks what the window state says about the GPU's raw signals,
not the model's gradients, so it reads the same whatever model scored and costs a few array reads per GPU. Each
signal is compared with what is normal for this GPU: its own slow baseline where the window keeps one (error
rates, thermal resistance), else the other GPUs of its host (they share the job and the air), else a fixed
level where any amount is abnormal (row remaps, a DBE, a narrowed link). How far it is from normal becomes a
`severity` on one scale for every signal (1 = clearly abnormal; docs/model.md, "Why this GPU" gives each
signal's scale), and the signals are ranked by it.

`explain(store, slots)` is called by the stream worker for GPUs in alarm only; `severities` is the vectorised
core (also what the evaluation ranks). Both take window slots (`streams.window.WindowStore`).
"""

from __future__ import annotations

import math

import numpy as np

from gpuwatch.schemas.records import Reason

from .window import _B_THERMAL_R, _SIG, EWMA_TAUS_S, FEATURE_NAMES, WindowStore

# The signals an explanation can name, and the failure mode whose precursor each is (None: a consequence that
# several modes share: XIDs). Order is the column order of `severities`.
SIGNALS: tuple[str, ...] = (
    "sbe_rate", "dbe", "row_remaps", "pcie_replays", "nvlink_errors", "pcie_link_width",
    "hotter_than_peers", "hotter_than_usual", "thermal_throttle",
    "power_brake", "power_swings", "power_over_limit", "clock_cut", "xids",
)  # fmt: skip
SIGNAL_MODE: dict[str, str | None] = {
    "sbe_rate": "memory", "dbe": "memory", "row_remaps": "memory",
    "pcie_replays": "interconnect", "nvlink_errors": "interconnect", "pcie_link_width": "interconnect",
    "hotter_than_peers": "thermal", "hotter_than_usual": "thermal", "thermal_throttle": "thermal",
    "power_brake": "power", "power_swings": "power", "power_over_limit": "power", "clock_cut": "power",
    "xids": None,
}  # fmt: skip
N_REASONS = 3  # reasons carried per record
MIN_SEVERITY = 0.5  # a signal below this is within normal and is not named

# Floors of the error-rate ratios, events per hour: a GPU at its baseline reads severity 0, and a rate must
# reach several times (its baseline + the floor) to count. A ratio of RATE_RATIO_AT_1 is severity 1.
RATE_FLOOR_PER_H = 2.0
RATE_RATIO_AT_1 = 8.0
REMAPS_PER_H_AT_1 = 1.0  # one row remap (or retired page) within the hour is severity 1
DBE_PER_H_AT_1 = 0.05
HOTTER_C_AT_1 = 5.0  # °C hotter than its neighbours (beyond its usual offset) at the same power
HOTTER_OWN_C_AT_1 = 8.0  # °C hotter than its own baseline at this power (ambient swings move this one too)
SHARE_AT_1 = 0.10  # throttled for heat 10 % more of the time than usual
BRAKE_AT_1 = 0.02  # braking 2 % of the time while its neighbours do not (a healthy GPU's is ~0: host blips cancel)
SWINGS_RATIO_AT_1 = 2.0  # power swings between samples twice those of its neighbours
SWINGS_FLOOR_W = 5.0
OVER_LIMIT_AT_1 = 0.002  # mean excess over the power limit, as a share of the limit (spikes of 2-15 %)
XIDS_PER_H_AT_1 = 2.0
CLOCK_CUT_AT_1 = 0.15  # SM clock 15 % further below its peak than its neighbours', under load, not hot

_TEN_MIN, _HOUR = EWMA_TAUS_S.index(600.0), EWMA_TAUS_S.index(3600.0)
_WIDTH_COL = FEATURE_NAMES.index("pcie_width_ratio")
_TEMP_COL = FEATURE_NAMES.index("temp")
_COL = {name: i for i, name in enumerate(SIGNALS)}
_CHUNK = 256
_PEERED = np.array([_SIG[n] for n in ("throttle_thermal", "power_jitter", "clock_deficit", "thermal_dev")])
_PEERED_COOL = np.array([False, True, True, False])  # neighbours counted while they do not throttle for heat


def _log_ratio(value: np.ndarray, ref: np.ndarray, floor: float, at_1: float) -> np.ndarray:
    return np.maximum(np.log((value + floor) / (ref + floor)) / math.log(at_1), 0.0)


def _peer_means(store: WindowStore, slots: np.ndarray, cols: np.ndarray, cool: np.ndarray) -> np.ndarray:
    """(len(slots), len(cols)): the mean 10-minute EWMA of `cols` over the other tracked GPUs of each slot's host
    (NaN when it has none). Where `cool` is set for a column, a neighbour counts only for the share of the time
    it was not throttling for heat (a hot board's clocks and power bounce: not the norm). Reads only the GPUs of
    the hosts of `slots`."""
    n = len(store.uuids)
    codes = store.host_code[slots]
    host_codes = store.host_code[:n]
    row_of_host = np.full(int(host_codes.max()) + 1, -1, dtype=np.int64)
    row_of_host[codes] = np.arange(len(slots))  # one row per wanted host (the last slot of it)
    mates = np.flatnonzero((row_of_host[host_codes] >= 0) & (store.n_seen[:n] > 0))
    # (wanted rows) x (mates) membership: both are few (the GPUs in alarm, and their hosts' GPUs)
    member = (row_of_host[host_codes[mates]][None, :] == row_of_host[codes][:, None]).astype(np.float64)
    ew = store.ewma[mates, _TEN_MIN][:, cols].astype(np.float64)
    hot = store.ewma[mates, _TEN_MIN, _SIG["throttle_thermal"]].astype(np.float64)
    weight = np.where(cool[None, :], np.clip(1.0 - hot / SHARE_AT_1, 0.0, 1.0)[:, None], 1.0)
    own = store.ewma[slots, _TEN_MIN][:, cols].astype(np.float64)
    own_hot = store.ewma[slots, _TEN_MIN, _SIG["throttle_thermal"]].astype(np.float64)
    own_weight = np.where(cool[None, :], np.clip(1.0 - own_hot / SHARE_AT_1, 0.0, 1.0)[:, None], 1.0)
    count = member @ weight - own_weight  # less the GPU itself
    total = member @ (weight * ew) - own_weight * own
    return np.where(count > 1e-6, total / np.maximum(count, 1e-6), np.nan)


def severities(store: WindowStore, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(severity, value, reference), each (len(slots), len(SIGNALS)) float64, for the GPUs in `slots`.

    `value` is the signal now in the unit its text uses, `reference` what it is compared with (own baseline,
    neighbours, or 0). Vectorised over `slots`; the cost is a few reads of the window state per GPU plus one
    pass over the GPUs of their hosts.
    """
    if len(slots) > _CHUNK:  # the neighbour means hold a (GPUs) x (their hosts' GPUs) matrix: keep it small
        parts = [severities(store, slots[i : i + _CHUNK]) for i in range(0, len(slots), _CHUNK)]
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]
    ew10 = store.ewma[slots, _TEN_MIN].astype(np.float64)
    ew1h = store.ewma[slots, _HOUR].astype(np.float64)
    base = store.baseline[slots].astype(np.float64)
    cur = store.current[slots]
    n = len(slots)
    sev, val, ref = np.zeros((n, len(SIGNALS))), np.zeros((n, len(SIGNALS))), np.zeros((n, len(SIGNALS)))

    def put(name: str, s: np.ndarray, v: np.ndarray, r: np.ndarray | float = 0.0) -> None:
        j = _COL[name]
        sev[:, j], val[:, j], ref[:, j] = s, v, r

    # Error rates (events per hour) against the GPU's own slow baseline: a trickling GPU is normal for itself.
    for name, sig, b in (("sbe_rate", "sbe", 0), ("pcie_replays", "pcie", 1), ("nvlink_errors", "nvlink", 2)):
        v, r = 60.0 * ew10[:, _SIG[sig]], 60.0 * np.maximum(base[:, b], 0.0)
        put(name, _log_ratio(v, r, RATE_FLOOR_PER_H, RATE_RATIO_AT_1), v, r)
    dbe = 60.0 * ew1h[:, _SIG["dbe"]]
    put("dbe", np.log1p(dbe / DBE_PER_H_AT_1) / math.log(2.0), dbe)
    remaps = 60.0 * ew1h[:, _SIG["remap"]]
    put("row_remaps", np.log1p(remaps / REMAPS_PER_H_AT_1) / math.log(2.0), remaps)
    width = cur[:, _WIDTH_COL].astype(np.float64)
    put("pcie_link_width", np.clip(2.0 * (1.0 - width), 0.0, None), 100.0 * width, 100.0)

    peers = np.nan_to_num(_peer_means(store, slots, _PEERED, _PEERED_COOL), nan=0.0)
    # Temperature in °C at the same power: the window keeps thermal resistance R = (T - 25) / (P + 60) against
    # its own baseline, so a change of R reads as dR * (P + 60) = dR * (T - 25) / R degrees at the present load.
    temp = 100.0 * cur[:, _TEMP_COL].astype(np.float64)
    r_now = base[:, _B_THERMAL_R] + ew10[:, _SIG["thermal_dev"]] / 10.0
    watts = np.where(r_now > 1e-3, np.maximum(temp - 25.0, 0.0) / np.maximum(r_now, 1e-3), 0.0)  # P + 60
    peer_c = ew10[:, _SIG["thermal_peer"]].astype(np.float64)  # the window keeps it in °C at the present power
    # against its own baseline, beyond what its neighbours warmed too (a warm spell in the room warms them all)
    own_c = ew10[:, _SIG["thermal_dev"]] / 10.0 * watts
    mates_c = peers[:, 3] / 10.0 * watts
    put("hotter_than_peers", np.maximum(peer_c / HOTTER_C_AT_1, 0.0), peer_c)
    put("hotter_than_usual", np.maximum((own_c - np.maximum(mates_c, 0.0)) / HOTTER_OWN_C_AT_1, 0.0), own_c, mates_c)

    # throttling more than its neighbours and more than its own last hour: a hot-running board that always
    # throttles is normal for itself (its rising temperature is what the two signals above catch)
    thr, thr_usual = ew10[:, _SIG["throttle_thermal"]], np.maximum(peers[:, 0], ew1h[:, _SIG["throttle_thermal"]])
    put("thermal_throttle", np.maximum((thr - thr_usual) / SHARE_AT_1, 0.0), 100.0 * thr, 100.0 * thr_usual)
    # A GPU throttling for heat brakes (the HW slowdown bit) and its power swings as its clocks bounce: those
    # are its heat's doing, not its power delivery's, so the power signals count only the time it is not.
    not_hot = np.clip(1.0 - thr / SHARE_AT_1, 0.0, 1.0)
    brake = np.maximum(ew10[:, _SIG["own_brake"]] - thr, 0.0)  # braking while the host's other GPUs do not
    put("power_brake", brake / BRAKE_AT_1, 100.0 * brake)
    # the last minute or the last ten, whichever swings more: a power precursor grows fast near its end
    ew1m = store.ewma[slots, 0, _SIG["power_jitter"]].astype(np.float64)
    swings, swings_p = 100.0 * np.maximum(ew10[:, _SIG["power_jitter"]], ew1m), 100.0 * peers[:, 1]
    put("power_swings", not_hot * _log_ratio(swings, swings_p, SWINGS_FLOOR_W, SWINGS_RATIO_AT_1), swings, swings_p)
    over = ew10[:, _SIG["power_excursion"]] / 10.0
    put("power_over_limit", over / OVER_LIMIT_AT_1, 100.0 * over)
    xids = 60.0 * ew1h[:, _SIG["xid"]]
    put("xids", np.log1p(xids / XIDS_PER_H_AT_1) / math.log(2.0), xids)
    # clocks cut under load more than its neighbours', while not throttling for heat: what is left to cut them is
    # power management (the cap, a brake), so this counts as power; a hot GPU's lower clocks are its heat's
    clk, clk_p = ew10[:, _SIG["clock_deficit"]], peers[:, 2]
    put("clock_cut", not_hot * np.maximum((clk - clk_p) / CLOCK_CUT_AT_1, 0.0), 100.0 * clk, 100.0 * clk_p)
    np.nan_to_num(sev, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return sev, val, ref


def _g(x: float) -> str:
    """Two significant digits, no exponent for everyday sizes: 0.42, 3.1, 40, 1200."""
    if not math.isfinite(x):
        return "?"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.2g}" if abs(x) >= 0.01 else "0"


def reason_text(signal: str, value: float, reference: float) -> str:
    """The operator's sentence for one signal (value and reference in the units `severities` gives)."""
    times = f"{value / reference:.0f}x" if reference > 0 and value / reference >= 10 else (
        f"{value / reference:.1f}x" if reference > 0 else "")  # fmt: skip
    if signal in ("sbe_rate", "pcie_replays", "nvlink_errors"):
        what = {"sbe_rate": "SBE rate", "pcie_replays": "PCIe replay rate", "nvlink_errors": "NVLink error rate"}[signal]
        base = f"{times} its own baseline ({_g(reference)}/h)" if times else "its own baseline is 0/h"
        return f"{what} {_g(value)}/h, {base}"
    if signal == "dbe":
        return f"double-bit ECC errors: {_g(value)}/h over the last hour"
    if signal == "row_remaps":
        return f"row remaps / retired pages: {_g(value)}/h over the last hour"
    if signal == "pcie_link_width":
        return f"PCIe link running at {_g(value)}% of its width"
    if signal == "hotter_than_peers":
        return f"runs {_g(value)} °C hotter than its neighbours at the same power (beyond its usual offset)"
    if signal == "hotter_than_usual":
        return f"runs {_g(value)} °C hotter than its own baseline at this power (neighbours {_g(reference)} °C)"
    if signal == "thermal_throttle":
        return f"thermal throttling {_g(value)}% of the last 10 min (usually {_g(reference)}%: last hour, neighbours)"
    if signal == "power_brake":
        return f"HW power brake {_g(value)}% of the last 10 min while its neighbours ran free"
    if signal == "power_swings":
        return f"power swings {_g(value)} W between samples, {times or 'vs'} its neighbours' ({_g(reference)} W)"
    if signal == "power_over_limit":
        return f"power over its limit: {_g(value)}% of the limit on average over 10 min"
    if signal == "xids":
        return f"XIDs {_g(value)}/h over the last hour"
    if signal == "clock_cut":
        return f"SM clock {_g(value)}% below its peak under load, not for heat (neighbours {_g(reference)}%)"
    raise ValueError(f"unknown signal {signal!r}; expected one of {SIGNALS}")


def explain(store: WindowStore, slots: np.ndarray, k: int = N_REASONS) -> list[list[Reason]]:
    """Per slot, up to `k` reasons (severity >= MIN_SEVERITY), most severe first; [] when nothing stands out.

    Meant for the few GPUs in alarm: the ranking is vectorised, the texts are built per named reason.
    """
    if not len(slots):
        return []
    sev, val, ref = severities(store, slots)
    order = np.argsort(-sev, axis=1, kind="stable")[:, :k]
    out: list[list[Reason]] = []
    for i in range(len(slots)):
        reasons = []
        for j in order[i].tolist():
            s = float(sev[i, j])
            if s < MIN_SEVERITY:
                break
            name, v, r = SIGNALS[j], float(val[i, j]), float(ref[i, j])
            reasons.append(Reason(signal=name, text=reason_text(name, v, r), value=round(v, 4),
                                  reference=round(r, 4), severity=round(s, 3)))  # fmt: skip
        out.append(reasons)
    return out
