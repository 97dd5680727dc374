"""Simulator hardware profiles and benign look-alikes: fields, nulls and ranges per board, the H200 profile
against a real H200 recording, precursors on every board, each look-alike present when its knob is on and
absent when off, the look-alike catalogue, and the legacy output frozen byte for byte."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.schemas import fields as F
from gpuwatch.schemas.codecs import decode_snapshot
from gpuwatch.simulator import lookalikes
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator, simulate_to_dir
from gpuwatch.simulator.hardware import LEGACY, PROFILES, REALISTIC_MIX

T0 = 1_700_000_000.0
RECORDING = Path(__file__).parent / "data" / "h200-healthy" / "samples.jsonl"
QUIET = dict(lookalikes.QUIET, rate_scale=0.0)
# Short jobs and gaps, so a short run sees both idle and loaded GPUs.
SHORT_JOBS = dict(job_len_s=(600.0, 1200.0), idle_len_s=(300.0, 600.0))
APP_XIDS = {13, 31, 43, 45}


def _run(cfg: FleetConfig, steps: int, every: int = 1, decode_every: int = 1) -> list[list[dict]]:
    """Snapshots of every `every`-th step (all hosts that reported); every `decode_every`-th kept step goes
    through the samples codec too."""
    sim = FleetSimulator(cfg)
    out = []
    for k in range(steps):
        raw = sim.step_json()
        if k % every == 0:
            if len(out) % decode_every == 0:
                for _, b in raw:
                    decode_snapshot(b)
            out.append([orjson.loads(b) for _, b in raw])
    return out


def _gpus(steps: list[list[dict]]) -> list[dict]:
    return [g for snaps in steps for s in snaps for g in s["gpus"] if not g["lost"]]


def _slots(steps: list[list[dict]]) -> dict[tuple[str, int], list[dict]]:
    """Each GPU slot's (host, gpu_index) samples in time order, with the snapshot's ts and seq."""
    out: dict[tuple[str, int], list[dict]] = {}
    for snaps in steps:
        for s in snaps:
            for g in s["gpus"]:
                out.setdefault((s["host"], g["gpu_index"]), []).append({**g, "ts": s["ts"], "seq": s["seq"]})
    return out


def _series(steps: list[list[dict]], host: str, gpu: int) -> list[dict]:
    return _slots(steps).get((host, gpu), [])


# ----- profiles -----


@pytest.mark.parametrize("name", list(PROFILES))
def test_profile_fields_nulls_and_ranges(name: str) -> None:
    p = PROFILES[name]
    cfg = FleetConfig(hosts=3, gpus_per_host=4, seed=5, start_ts=T0, interval_s=5.0, hardware=name,
                      power_cap_job_frac=0.5, **QUIET, **SHORT_JOBS)  # fmt: skip
    gpus = _gpus(_run(cfg, 1440))
    nulls = p.null_fields
    for g in gpus[::7]:
        assert {k for k in F.ALL_NUMERIC + F.ALL_FLAGS if g[k] is None} == nulls, name
    assert {g["power_limit_w"] for g in gpus} == {p.power_limit_w}
    assert {g["mem_total_mib"] for g in gpus} == {p.mem_total_mib}
    assert {g["mem_clock_mhz"] for g in gpus} == {p.mem_clock_mhz}
    assert {g["pcie_link_gen_max"] for g in gpus} == {p.pcie_gen_max}
    idle = [g for g in gpus if g["throttle_reasons"] == F.THROTTLE_GPU_IDLE]
    busy = [g for g in gpus if g["util_gpu_pct"] >= 80]
    capped = [g for g in busy if g["throttle_reasons"] & F.THROTTLE_SW_POWER_CAP]
    assert len(idle) > 100 and len(busy) > 100 and len(capped) > 50, (len(idle), len(busy), len(capped))
    assert {g["sm_clock_mhz"] for g in idle} == {p.idle_clock_mhz}
    assert {g["pcie_link_gen"] for g in idle} == {p.pcie_gen_idle}
    assert {g["pcie_link_gen"] for g in busy} == {p.pcie_gen_max}
    assert all(p.idle_w[0] - 8 <= g["power_w"] <= p.idle_w[1] + 8 for g in idle)
    assert all(g["power_w"] <= p.power_limit_w for g in gpus)
    assert all(p.power_limit_w - 20 <= g["power_w"] for g in capped)
    assert max(g["sm_clock_mhz"] for g in busy) == p.max_clock_mhz
    assert all(g["sm_clock_mhz"] % 15 == 0 for g in busy)
    assert np.median([g["sm_clock_mhz"] for g in capped]) < p.max_clock_mhz  # the cap takes clock away
    assert all(15 <= g["temp_c"] <= 95 for g in gpus)
    if p.temp_int:
        assert all(float(g["temp_c"]).is_integer() for g in gpus)
    if p.fan:
        assert all(30 <= g["fan_pct"] <= 100 for g in gpus)


def test_mixed_hardware_is_drawn_per_host() -> None:
    cfg = FleetConfig(hosts=40, gpus_per_host=2, seed=3, start_ts=T0, hardware=dict(REALISTIC_MIX))
    sim = FleetSimulator(cfg)
    assert set(sim.host_hardware) == set(REALISTIC_MIX)
    by_host = {s["host"]: {g["mem_total_mib"] for g in s["gpus"]} for s in sim.step()}
    for h, name in zip(sim.hosts, sim.host_hardware, strict=True):
        assert by_host[h] == {PROFILES[name].mem_total_mib}  # hosts are homogeneous
    with pytest.raises(ValueError, match="unknown hardware profile"):
        FleetSimulator(FleetConfig(hosts=1, hardware="b200-nvl"))


def _recording() -> dict[str, list[dict]]:
    gpus = [orjson.loads(line)["gpus"][0] for line in RECORDING.read_bytes().splitlines()]
    return {
        "all": gpus,
        "idle": [g for g in gpus if g["throttle_reasons"] == F.THROTTLE_GPU_IDLE],
        "capped": [
            g for g in gpus if g["throttle_reasons"] == F.THROTTLE_SW_POWER_CAP and g["util_gpu_pct"] >= 99
        ],
        "membound": [g for g in gpus if g["util_mem_pct"] >= 99],
    }


def _within(values: list[float], ref: list[float], slack: float) -> bool:
    """The median of `values` lies in the range of `ref`, widened by `slack` on each side."""
    return min(ref) - slack <= float(np.median(values)) <= max(ref) + slack


def test_h200_profile_matches_the_real_recording() -> None:
    rec = _recording()
    assert len(rec["idle"]) > 100 and len(rec["capped"]) > 100 and len(rec["membound"]) > 30
    cfg = FleetConfig(
        hosts=12, gpus_per_host=4, seed=8, start_ts=T0, interval_s=2.0, hardware="h200-sxm", **QUIET
    )
    steps = _run(cfg, 3 * 1800, every=5, decode_every=10)
    sim = _gpus(steps)
    idle = [g for g in sim if g["throttle_reasons"] == F.THROTTLE_GPU_IDLE]
    capped = [g for g in sim if g["throttle_reasons"] == F.THROTTLE_SW_POWER_CAP and g["util_gpu_pct"] >= 95]
    membound = [g for g in sim if g["util_mem_pct"] >= 90 and g["util_gpu_pct"] >= 95]
    assert len(idle) > 500 and len(capped) > 500 and len(membound) > 100

    def values(gs: list[dict], k: str) -> list[float]:
        return [g[k] for g in gs]

    # The board as NVML reports it, constant in the recording.
    for k in ("power_limit_w", "mem_total_mib", "mem_clock_mhz", "pcie_link_gen", "pcie_link_gen_max"):
        assert set(values(sim, k)) == set(values(rec["all"], k)), k  # PCIe stays at gen 5 at idle too
    for k in ("fan_pct", "retired_pages", "retired_pages_pending"):
        assert set(values(sim, k)) == {None}, k
    # Idle: the clock, memory and utilisation of the recording; temperature and power around it.
    for k in ("sm_clock_mhz", "mem_used_mib", "util_gpu_pct"):
        mode = max(
            set(values(rec["idle"], k)), key=values(rec["idle"], k).count
        )  # not the seconds after a job
        assert set(values(idle, k)) == {mode}, k
    assert _within(values(idle, "temp_c"), values(rec["idle"], "temp_c"), 2.0)
    assert _within(values(idle, "power_w"), values(rec["idle"], "power_w"), 3.0)
    # Heavy compute: pinned just under the 700 W cap with SW_POWER_CAP, clocks down, as hot as the recording.
    assert _within(values(capped, "power_w"), values(rec["capped"], "power_w"), 2.0)
    assert min(values(capped, "power_w")) >= min(values(rec["capped"], "power_w")) - 6.0
    assert _within(values(capped, "temp_c"), values(rec["capped"], "temp_c"), 3.0)
    assert _within(values(capped, "util_mem_pct"), values(rec["capped"], "util_mem_pct"), 6.0)
    lo, hi = np.percentile(values(capped, "sm_clock_mhz"), [10, 90])
    assert (
        lo <= min(values(rec["capped"], "sm_clock_mhz")) and max(values(rec["capped"], "sm_clock_mhz")) <= hi
    )
    # Memory-bound work: full clock, no throttle, well under the cap (the recording's copy phase: 492 W).
    assert {g["sm_clock_mhz"] for g in membound} == {1980} and {g["throttle_reasons"] for g in membound} == {
        0
    }
    assert _within(values(membound, "power_w"), values(rec["membound"], "power_w"), 100.0)
    # Violation time rises by the time spent capped: ~1 s per second, as in the recording.
    rec_rate = np.diff(values(rec["capped"], "power_violation_us"))
    assert 0.9e6 <= np.median(rec_rate) <= 1.1e6
    rates = []
    for ser in _slots(steps).values():
        for a, b in zip(ser, ser[1:]):
            if a["throttle_reasons"] == b["throttle_reasons"] == F.THROTTLE_SW_POWER_CAP:
                rates.append((b["power_violation_us"] - a["power_violation_us"]) / (b["ts"] - a["ts"]))
    assert rates and 0.9e6 <= np.median(rates) <= 1.1e6


# ----- precursors on every board -----

FAIL_AT, PREC = 2400.0, 1500.0
MODE_HOST = {"memory": 0, "thermal": 1, "power": 2, "interconnect": 3}


@pytest.fixture(scope="module", params=[p for p in PROFILES if p != LEGACY])
def forced(request: pytest.FixtureRequest) -> tuple[str, dict[str, tuple[list[dict], list[dict], dict]]]:
    name = request.param
    ff = [(h, 0, m, FAIL_AT, PREC) for m, h in MODE_HOST.items()]
    always_busy = dict(job_len_s=(1e7, 1e7), idle_len_s=(1.0, 1.0))
    cfg = FleetConfig(hosts=4, gpus_per_host=2, seed=4, start_ts=T0, hardware=name, forced_failures=ff,
                      repair_time_scale=1e-3, **always_busy, **QUIET)  # fmt: skip
    steps = _run(cfg, int(FAIL_AT) + 60, decode_every=20)
    windows = {}
    slots = _slots(steps)
    for mode, h in MODE_HOST.items():
        ser = slots[(f"node-{h:04d}", 0)]
        before = [g for g in ser if g["ts"] < T0 + FAIL_AT - PREC]
        inside = [g for g in ser if T0 + FAIL_AT - PREC <= g["ts"] < T0 + FAIL_AT]
        at = next(g for g in ser if g["ts"] >= T0 + FAIL_AT)
        windows[mode] = (before, inside, at, ser[-1])
    return name, windows


def test_thermal_precursor_on_every_board(forced: tuple[str, dict]) -> None:
    name, w = forced
    _, inside, at, _ = w["thermal"]
    busy = [g for g in inside if g["util_gpu_pct"] >= 80]
    first, last = busy[: len(busy) // 10], busy[-len(busy) // 10 :]

    def k_per_w(
        gs: list[dict],
    ) -> float:  # temperature per watt at comparable load: cooling lost, no fan signal
        return float(np.mean([g["temp_c"] / g["power_w"] for g in gs]))

    assert k_per_w(last) > 1.2 * k_per_w(first), name
    assert any(g["throttle_reasons"] & (F.THROTTLE_SW_THERMAL | F.THROTTLE_HW_THERMAL) for g in last), name
    assert at["lost"] and at["xid"] == [79]


def test_memory_precursor_on_every_board(forced: tuple[str, dict]) -> None:
    name, w = forced
    before, inside, at, repaired = w["memory"]
    retire = PROFILES[name].retired_pages  # Volta counts retired pages where later boards remap rows
    rows, pending = ("retired_pages", "retired_pages_pending") if retire else ("remapped_rows_correctable",
                                                                                "remap_pending")  # fmt: skip
    assert inside[-1]["ecc_sbe_volatile"] - inside[0]["ecc_sbe_volatile"] > 50, name
    assert inside[-1][rows] > before[-1][rows] and inside[-1][pending], name
    assert 48 in at["xid"] and at["ecc_dbe_volatile"] > inside[-1]["ecc_dbe_volatile"]
    assert bool({94, 95} & set(at["xid"])) == PROFILES[name].containment
    # The repair reset the GPU: the pending remap (retirement) took effect, the count stays.
    assert not repaired["lost"] and not repaired[pending] and repaired[rows] == at[rows]


def test_interconnect_and_power_precursors_on_every_board(forced: tuple[str, dict]) -> None:
    name, w = forced
    _, inside, at, _ = w["interconnect"]
    replay = inside[-1]["pcie_replay"] - inside[0]["pcie_replay"]
    if PROFILES[name].nvlink:
        crc = inside[-1]["nvlink_crc_errors"] - inside[0]["nvlink_crc_errors"]
        assert (replay > 20 and inside[-1]["pcie_link_width"] == 8) or crc > 20, name
    else:  # no NVLink: the link trouble shows on PCIe
        assert replay > 20 and inside[-1]["pcie_link_width"] == 8, name
    assert at["lost"] and 79 in at["xid"]
    before, inside, at, _ = w["power"]
    brake = F.THROTTLE_HW_POWER_BRAKE
    assert not any(g["throttle_reasons"] & brake for g in before)
    assert sum(bool(g["throttle_reasons"] & brake) for g in inside) >= 5, name
    assert max(g["power_w"] for g in inside) > PROFILES[name].power_limit_w


def test_link_failures_on_boards_without_nvlink_are_pcie() -> None:
    def xids(name: str) -> set[int]:
        cfg = FleetConfig(hosts=4, gpus_per_host=4, seed=9, start_ts=T0, interval_s=5.0, hardware=name,
                          mode_mix={"interconnect": 1.0}, rate_scale=2e5, repair_time_scale=1e-3,
                          precursor_range_s=(60.0, 300.0),
                          host_frailty=False, **lookalikes.QUIET)  # fmt: skip
        sim = FleetSimulator(cfg)
        for i in range(16):  # the forced path, then the random schedule after each repair
            sim.schedule_failure(i // 4, i % 4, "interconnect", 30.0 + 10 * i, 20.0)
        seen = {x for _ in range(720) for s in sim.step() for g in s["gpus"] for x in g["xid"]}
        assert len(sim.drain_labels()) > 10
        return seen

    assert 74 in xids("h100-sxm")  # NVLink boards lose a third of their links over NVLink (XID 74)
    assert xids("h100-pcie") == {79}  # without NVLink every link failure is PCIe: the GPU falls off the bus


# ----- look-alikes: present when the knob is on, absent when off -----


def _lookalike_run(
    knobs: dict, hardware: str = "h200-sxm", steps: int = 1440, **kw: object
) -> list[list[dict]]:
    cfg = FleetConfig(hosts=6, gpus_per_host=4, seed=21, start_ts=T0, interval_s=5.0, hardware=hardware,
                      **{**QUIET, **SHORT_JOBS, **kw, **knobs})  # fmt: skip
    return _run(cfg, steps, decode_every=10)


@pytest.fixture(scope="module")
def baseline() -> list[list[dict]]:
    """Two hours of a quiet h200 fleet with every look-alike knob at its default (off)."""
    return _lookalike_run({"sbe_trickle_frac": 0.5})


def _app_xids(steps: list[list[dict]]) -> list[tuple[dict, int]]:
    return [
        (g, len(s["gpus"])) for snaps in steps for s in snaps for g in s["gpus"] if APP_XIDS & set(g["xid"])
    ]


def test_app_xids(baseline: list[list[dict]]) -> None:
    assert not _app_xids(baseline)
    hits = _app_xids(_lookalike_run({"app_xid_per_host_day": 48.0}))
    assert len(hits) > 10
    assert {x for g, _ in hits for x in g["xid"]} <= APP_XIDS
    assert {31, 45} <= {x for g, _ in hits for x in g["xid"]}
    assert all(g["util_gpu_pct"] == 0 for g, _ in hits)  # the job is gone by the time the XID is logged


def test_reboots_silence_hosts_and_reset_counters(baseline: list[list[dict]]) -> None:
    def gaps_and_resets(steps: list[list[dict]]) -> tuple[int, int, int]:
        short = sum(len(snaps) < 6 for snaps in steps)
        seq_restarts = resets = 0
        slots = _slots(steps)
        for h in range(6):
            ser = slots[(f"node-{h:04d}", 1)]
            for a, b in zip(ser, ser[1:]):
                seq_restarts += b["seq"] < a["seq"]
                resets += b["ecc_sbe_volatile"] < a["ecc_sbe_volatile"] or b["power_violation_us"] < a[
                    "power_violation_us"]  # fmt: skip
        return short, seq_restarts, resets

    assert gaps_and_resets(baseline) == (0, 0, 0)
    assert all(np.all(np.diff([s["seq"] for s in _series(baseline, "node-0000", 0)]) == 1) for _ in [0])
    short, restarts, resets = gaps_and_resets(
        _lookalike_run({"reboot_per_host_day": 24.0, "sbe_trickle_frac": 0.5})
    )
    assert short > 20 and restarts > 2 and resets > 2


def test_power_limit_changes(baseline: list[list[dict]]) -> None:
    assert {g["power_limit_w"] for g in _gpus(baseline)} == {700.0}
    gpus = _gpus(_lookalike_run({"power_limit_change_per_host_day": 12.0}))
    lowered = [g for g in gpus if g["power_limit_w"] < 700.0]
    assert lowered and all(385.0 <= g["power_limit_w"] <= 600.0 for g in lowered)
    assert all(g["power_w"] <= g["power_limit_w"] for g in lowered)
    assert any(g["throttle_reasons"] & F.THROTTLE_SW_POWER_CAP for g in lowered)


def _uuids_per_slot(steps: list[list[dict]]) -> dict[tuple[str, int], set[str]]:
    out: dict[tuple[str, int], set[str]] = {}
    for snaps in steps:
        for s in snaps:
            for g in s["gpus"]:
                out.setdefault((s["host"], g["gpu_index"]), set()).add(g["uuid"])
    return out


def test_board_swaps(baseline: list[list[dict]]) -> None:
    assert all(len(u) == 1 for u in _uuids_per_slot(baseline).values())
    steps = _lookalike_run({"board_swap_per_host_day": 8.0, "sbe_trickle_frac": 0.5}, steps=2880)
    swapped = [k for k, u in _uuids_per_slot(steps).items() if len(u) > 1]
    assert swapped
    host, gpu = swapped[0]
    ser = _series(steps, host, gpu)
    new = next(k for k in range(1, len(ser)) if ser[k]["uuid"] != ser[k - 1]["uuid"])
    assert ser[new]["ts"] - ser[new - 1]["ts"] >= 1800.0  # a maintenance window first
    assert ser[new]["ecc_sbe_aggregate"] <= 1 < ser[new - 1]["ecc_sbe_aggregate"]  # a fresh board's counters


def test_board_replacement_after_repairs() -> None:
    kw = dict(rate_scale=3e4, repair_time_scale=2e-4, host_frailty=False)
    for frac, expect in ((0.0, False), (1.0, True)):
        cfg = FleetConfig(hosts=4, gpus_per_host=4, seed=6, start_ts=T0, board_replace_frac=frac, **kw)
        sim = FleetSimulator(cfg)
        seen: dict[tuple[str, int], set[str]] = {}
        for _ in range(2000):
            for s in sim.step():
                for g in s["gpus"]:
                    seen.setdefault((s["host"], g["gpu_index"]), set()).add(g["uuid"])
        repaired = [lab for lab in sim.drain_labels() if lab["repair_end_ts"] < sim.now]
        assert repaired
        changed = {k for k, u in seen.items() if len(u) > 1}
        assert bool(changed) == expect
        if expect:
            assert {(lab["host"], lab["gpu_index"]) for lab in repaired} == changed


def _max_sbe_jump(steps: list[list[dict]]) -> int:
    return max(
        int(np.max(np.diff([g["ecc_sbe_volatile"] for g in ser]), initial=0))
        for ser in _slots(steps).values()
    )


def test_sbe_bursts() -> None:
    assert _max_sbe_jump(_lookalike_run({})) <= 1  # the background rate adds at most one SBE a sample
    assert _max_sbe_jump(_lookalike_run({"sbe_burst_per_gpu_day": 4.0})) >= 10


def test_ambient_excursions_warm_a_whole_host() -> None:
    off = _lookalike_run({})
    on = _lookalike_run({"ambient_excursion_per_host_day": 8.0})
    # The excursion draws from its own generator, so the rest of the fleet is the same: compare sample by
    # sample (steps x GPUs).
    rise = np.array([[g2["temp_c"] - g1["temp_c"] for s1, s2 in zip(a, b)
                      for g1, g2 in zip(s1["gpus"], s2["gpus"])] for a, b in zip(off, on)])  # fmt: skip
    assert rise.min() >= -1.0 and rise.max() >= 4.0
    warm_step = int(np.argmax(rise.max(axis=1)))
    host = int(np.argmax(rise[warm_step])) // 4
    assert (rise[warm_step, host * 4 : host * 4 + 4] >= 2.0).all()  # every GPU of the host, not one


def test_power_capped_jobs() -> None:
    def capped_share(steps: list[list[dict]]) -> float:
        busy = [g for g in _gpus(steps) if g["util_gpu_pct"] >= 80]
        return sum(bool(g["throttle_reasons"] & F.THROTTLE_SW_POWER_CAP) for g in busy) / len(busy)

    assert capped_share(_lookalike_run({}, hardware=LEGACY, steps=1440)) < 0.3
    assert capped_share(_lookalike_run({"power_cap_job_frac": 1.0}, hardware=LEGACY, steps=1440)) > 0.8
    assert capped_share(_lookalike_run({"power_cap_job_frac": 0.0}, steps=1440)) < 0.05


# ----- catalogue and presets -----


def test_catalogue_names_real_knobs() -> None:
    knobs = {f.name for f in dataclasses.fields(FleetConfig)}
    new = {"power_cap_job_frac", "app_xid_per_host_day", "reboot_per_host_day",
           "power_limit_change_per_host_day", "board_swap_per_host_day", "board_replace_frac",
           "sbe_burst_per_gpu_day", "ambient_excursion_per_host_day"}  # fmt: skip
    lookalike_knobs = new | set(lookalikes.QUIET)
    covered: set[str] = set()
    for x in lookalikes.LOOKALIKES.values():
        assert set(x.rich) | set(x.real) | set(x.needs) <= knobs, x.name
        assert len(x.rich) == 1 and set(x.rich) == set(x.real) and x.why and x.unit, x.name
        # One knob per look-alike, in the unit of its prevalence: rich run and real fleet are that knob's values.
        (rich,), (real,) = x.rich.values(), x.real.values()
        assert rich == x.rich_prevalence and 0 < x.weight <= 1, x.name
        assert real == x.prevalence or (real is None and x.prevalence == lookalikes.MIX_CAP_JOB_SHARE), x.name
        covered |= set(x.rich)
    assert covered == lookalike_knobs
    default = FleetConfig()
    for k in new:
        assert getattr(default, k) in (0.0, None), k  # new look-alikes are off by default


def test_realistic_preset_runs() -> None:
    cfg = FleetConfig.realistic(hosts=8, gpus_per_host=4, seed=2, start_ts=T0, interval_s=10.0)
    assert cfg.hardware == REALISTIC_MIX
    for x in lookalikes.LOOKALIKES.values():
        assert all(getattr(cfg, k) == v for k, v in x.real.items()), x.name
    gpus = _gpus(_run(cfg, 720))
    assert {g["mem_total_mib"] for g in gpus} <= {p.mem_total_mib for p in PROFILES.values()}
    rich = FleetConfig(**lookalikes.rich_overrides("app_xid"))
    assert rich.app_xid_per_host_day == 24.0 and rich.hot_gpu_frac == 0.0


# ----- legacy output -----

# Digests of the legacy simulator's output, taken before hardware profiles and look-alikes existed: with every
# new knob at its default, a fleet must come out byte for byte the same (training data stays reproducible).
LEGACY_DIR_SHA256 = "1ef3c4ecbae5158c568d38837fb102a8bddf6d937a3c31130fdcee8739192786"
LEGACY_FANLESS_SHA256 = "18691d4bd66d64090be8a4b124eedf7b47531d5dcde6b6949b5e52d53a0c91c0"


def test_legacy_output_is_unchanged(tmp_path: Path) -> None:
    over = {"rate_scale": 2e5, "repair_time_scale": 1e-3, "ts_jitter_s": 0.2, "host_frailty": False}
    stats = simulate_to_dir(3, 4, 0.01, tmp_path, seed=11, interval_s=2.0, config_overrides=over)
    assert stats["failures"] == 2  # with repairs: the failure and repair paths are covered too
    data = (tmp_path / "samples.jsonl").read_bytes() + (tmp_path / "labels.jsonl").read_bytes()
    assert hashlib.sha256(data).hexdigest() == LEGACY_DIR_SHA256
    sim = FleetSimulator(
        FleetConfig(hosts=2, gpus_per_host=3, seed=12, start_ts=1.7e9, fanless=True, rate_scale=5e4)
    )
    h = hashlib.sha256()
    for _ in range(300):
        for _, b in sim.step_json():
            h.update(b)
    assert h.hexdigest() == LEGACY_FANLESS_SHA256
