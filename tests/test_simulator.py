"""Fleet simulator and fault model: contract types, determinism, precursor signatures, repairs, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.schemas import fields as F
from gpuwatch.simulator import faults
from gpuwatch.simulator.feed import SimulatedFeed
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator, simulate_to_dir

# A copy of the StepFun fault trace (Apache-2.0, see its LICENSE), so this check runs everywhere.
TRACE = Path(__file__).parent / "data" / "stepfun-fault-trace"
T0 = 1_700_000_000.0
LABEL_KEYS = {"host", "gpu_index", "uuid", "fail_ts", "mode", "precursor_start_ts", "repair_end_ts"}
FAIL_AT, PREC = 3000.0, 1800.0
MODE_HOST = {m: h for h, m in enumerate(faults.MODES)}  # one forced failure per host, on GPU 0


def _quiet(**kw: object) -> FleetConfig:
    """No random failures or benign noise, hosts always busy: forced failures stand out cleanly."""
    base = dict(
        hosts=5, gpus_per_host=2, seed=3, start_ts=T0, rate_scale=0.0,
        job_len_s=(1e7, 1e7), idle_len_s=(1.0, 1.0),
        hot_gpu_frac=0.0, sbe_trickle_frac=0.0, replay_trickle_frac=0.0, narrow_link_frac=0.0,
        remap_pending_frac=0.0, power_brake_per_host_day=0.0,
    )  # fmt: skip
    base.update(kw)
    return FleetConfig(**base)


def _series(snaps: list[dict], host: str, gpu: int) -> list[tuple[float, dict]]:
    return [(s["ts"], g) for s in snaps if s["host"] == host for g in s["gpus"] if g["gpu_index"] == gpu]


@pytest.fixture(scope="module")
def forced() -> tuple[list[dict], list[dict]]:
    ff = [(h, 0, m, FAIL_AT, PREC) for m, h in MODE_HOST.items()]
    sim = FleetSimulator(_quiet(forced_failures=ff, repair_time_scale=1e-3))
    snaps = [s for _ in range(int(FAIL_AT) + 200) for s in sim.step()]
    return snaps, sim.drain_labels()


def _window(snaps: list[dict], mode: str) -> tuple[list[dict], list[dict], dict]:
    """Samples of the failing GPU before the precursor, inside it, and the failure sample."""
    ser = _series(snaps, f"node-{MODE_HOST[mode]:04d}", 0)
    fail_t = T0 + FAIL_AT
    before = [g for t, g in ser if t < fail_t - PREC]
    inside = [g for t, g in ser if fail_t - PREC <= t < fail_t]
    at = next(g for t, g in ser if t >= fail_t)
    return before, inside, at


def _check_gpu(g: dict, fanless: bool = False) -> None:
    assert isinstance(g["gpu_index"], int) and isinstance(g["uuid"], str) and g["uuid"].startswith("GPU-")
    assert type(g["throttle_reasons"]) is int
    assert isinstance(g["xid"], list) and all(type(x) is int for x in g["xid"])
    for k in F.ALL_FLAGS:
        assert type(g[k]) is bool, k
    for k in F.ALL_NUMERIC:
        v = g[k]
        if g["lost"] or (fanless and k == "fan_pct"):
            assert v is None or isinstance(v, (int, float)), k
            continue
        if k in F.ALL_COUNTERS:
            assert type(v) is int and v >= 0, (k, v)
        else:
            assert type(v) in (int, float), (k, v)
    if fanless:
        assert g["fan_pct"] is None


def test_derived_constants_match_trace() -> None:
    d = faults.derive_defaults(TRACE)
    assert d["counts"] == faults.MODE_COUNTS
    assert d["mode_mix"] == faults.MODE_MIX
    assert d["rate_per_gpu_day"] == pytest.approx(faults.RATE_PER_GPU_DAY, rel=1e-3)
    assert d["frailty_shape"] == pytest.approx(faults.FRAILTY_SHAPE, abs=1e-3)
    assert {m: tuple(q) for m, q in d["repair_quantiles_h"].items()} == faults.REPAIR_QUANTILES_H


def test_repair_sampling_follows_quantiles() -> None:
    rng = np.random.default_rng(0)
    modes = np.full(20000, faults.MODES.index("power"))
    h = faults.sample_repair_s(rng, modes) / 3600.0
    q = faults.REPAIR_QUANTILES_H["power"]
    assert q[0] <= h.min() and h.max() <= q[-1]
    assert np.median(h) == pytest.approx(q[5], rel=0.1)
    half = faults.sample_repair_s(np.random.default_rng(0), modes, scale=0.5) / 3600.0
    assert np.allclose(half, h * 0.5)


def test_snapshots_match_contract() -> None:
    for fanless in (False, True):
        ff = [(0, 1, "interconnect", 30.0, 20.0), (1, 0, "memory", 40.0, 30.0)]
        sim = FleetSimulator(
            FleetConfig(hosts=3, gpus_per_host=4, start_ts=T0, fanless=fanless, forced_failures=ff)
        )
        seqs: dict[str, list[int]] = {}
        for k in range(80):
            out = sim.step_json()
            assert [h for h, _ in out] == sim.hosts
            for host, raw in out:
                snap = orjson.loads(raw)  # rejects NaN/Infinity tokens
                assert set(snap) == {"schema", "host", "ts", "seq", "gpus"}
                assert snap["schema"] == F.SAMPLES_SCHEMA and snap["host"] == host
                assert snap["ts"] == pytest.approx(T0 + k + 1)
                seqs.setdefault(host, []).append(snap["seq"])
                assert [g["gpu_index"] for g in snap["gpus"]] == list(range(4))
                for g in snap["gpus"]:
                    _check_gpu(g, fanless)
                    assert not LABEL_KEYS - {"host", "gpu_index", "uuid"} & set(g)
        assert all(np.all(np.diff(s) == 1) for s in seqs.values())
        lost = [g for s in sim.step() for g in s["gpus"] if g["lost"]]
        assert lost and lost[0]["temp_c"] is None


def test_deterministic_given_seed() -> None:
    def run(seed: int) -> tuple[list[bytes], list[dict]]:
        sim = FleetSimulator(FleetConfig(hosts=4, gpus_per_host=4, seed=seed, start_ts=T0, rate_scale=5e4))
        raw = [b for _ in range(300) for _, b in sim.step_json()]
        return raw, sim.drain_labels()

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a[0] != c[0]
    assert a[1], "rate_scale 5e4 should give failures within 300 s on 16 GPUs"


def test_uuids_stable_and_distinct() -> None:
    a = FleetSimulator(FleetConfig(hosts=3, start_ts=T0)).uuids
    assert a == FleetSimulator(FleetConfig(hosts=3, start_ts=T0, rate_scale=9.0)).uuids
    assert len(set(a)) == len(a) == 24


def test_labels_are_separate_records(forced: tuple[list[dict], list[dict]]) -> None:
    snaps, labels = forced
    assert sorted(lab["mode"] for lab in labels) == sorted(faults.MODES)
    for lab in labels:
        assert set(lab) == LABEL_KEYS
        assert lab["fail_ts"] == pytest.approx(T0 + FAIL_AT)
        assert lab["repair_end_ts"] > lab["fail_ts"]
        if lab["mode"] == "sudden":
            assert lab["precursor_start_ts"] is None
        else:
            assert lab["precursor_start_ts"] == pytest.approx(T0 + FAIL_AT - PREC)
    text = b"".join(orjson.dumps(s) for s in snaps)
    assert b"precursor" not in text and b"fail_ts" not in text and b"repair_end" not in text


def test_memory_precursor(forced: tuple[list[dict], list[dict]]) -> None:
    before, inside, at = _window(forced[0], "memory")
    assert before[-1]["ecc_sbe_volatile"] == before[0]["ecc_sbe_volatile"]
    assert inside[-1]["ecc_sbe_volatile"] - inside[0]["ecc_sbe_volatile"] > 50
    assert inside[-1]["remapped_rows_correctable"] > before[-1]["remapped_rows_correctable"]
    assert inside[-1]["remap_pending"]
    assert 48 in at["xid"] and at["ecc_dbe_volatile"] > inside[-1]["ecc_dbe_volatile"]


def test_interconnect_precursor(forced: tuple[list[dict], list[dict]]) -> None:
    before, inside, at = _window(forced[0], "interconnect")
    replay = inside[-1]["pcie_replay"] - inside[0]["pcie_replay"]
    crc = inside[-1]["nvlink_crc_errors"] - inside[0]["nvlink_crc_errors"]
    assert before[-1]["pcie_replay"] == before[0]["pcie_replay"]
    assert (replay > 20 and inside[-1]["pcie_link_width"] == 8) or crc > 20
    assert at["lost"] and 79 in at["xid"]


def test_thermal_precursor(forced: tuple[list[dict], list[dict]]) -> None:
    _, inside, at = _window(forced[0], "thermal")
    busy = [g for g in inside if g["util_gpu_pct"] >= 80]
    first, last = busy[: len(busy) // 10], busy[-len(busy) // 10 :]

    def k_per_w(gs: list[dict]) -> float:  # temperature per watt at comparable load
        return float(np.mean([g["temp_c"] / g["power_w"] for g in gs]))

    assert np.mean([g["temp_c"] for g in last]) > np.mean([g["temp_c"] for g in first]) + 10
    assert k_per_w(last) > 1.2 * k_per_w(first)
    assert any(g["throttle_reasons"] & F.THROTTLE_SW_THERMAL for g in last)
    assert np.mean([g["fan_pct"] for g in last]) > np.mean([g["fan_pct"] for g in first])
    assert at["lost"] and at["xid"] == [79]


def test_power_precursor(forced: tuple[list[dict], list[dict]]) -> None:
    before, inside, at = _window(forced[0], "power")
    brake = F.THROTTLE_HW_POWER_BRAKE
    assert not any(g["throttle_reasons"] & brake for g in before)
    assert sum(bool(g["throttle_reasons"] & brake) for g in inside) >= 5
    assert max(g["power_w"] for g in inside) > 700.0
    assert set(at["xid"]) & {79, 62}


def test_sudden_has_no_precursor(forced: tuple[list[dict], list[dict]]) -> None:
    before, inside, at = _window(forced[0], "sudden")
    keys = F.ALL_COUNTERS[:9] + ("pcie_link_width",)
    assert all(inside[-1][k] == before[0][k] for k in keys if "violation" not in k)
    bad = F.THROTTLE_HW_POWER_BRAKE | F.THROTTLE_SW_THERMAL | F.THROTTLE_HW_THERMAL
    assert not any(g["throttle_reasons"] & bad or g["xid"] for g in before + inside)
    assert at["lost"] or at["xid"] == [62]


def test_counters_monotone_except_after_repair() -> None:
    cfg = FleetConfig(hosts=4, gpus_per_host=4, seed=5, start_ts=T0, rate_scale=3e5, repair_time_scale=2e-4)
    sim = FleetSimulator(cfg)
    snaps = [s for _ in range(1500) for s in sim.step()]
    labels = sim.drain_labels()
    assert any(lab["repair_end_ts"] < snaps[-1]["ts"] for lab in labels), "need at least one completed repair"
    repairs: dict[str, list[float]] = {}
    for lab in labels:
        repairs.setdefault(lab["host"], []).append(lab["repair_end_ts"])
    resets = 0
    for host in sim.hosts:
        for gpu in range(4):
            last: dict | None = None
            last_ts = 0.0
            for ts, g in _series(snaps, host, gpu):
                if g["lost"]:
                    continue
                if last is not None:
                    repaired = any(last_ts < r <= ts for r in repairs.get(host, []))
                    for k in F.ALL_COUNTERS:
                        if g[k] < last[k]:
                            assert repaired and "aggregate" not in k, (host, gpu, k, ts)
                            resets += 1
                last, last_ts = g, ts
    assert resets > 0


def test_schedule_failure_validation() -> None:
    sim = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=2, start_ts=T0, rate_scale=0.0))
    with pytest.raises(ValueError):
        sim.schedule_failure(0, 0, "cosmic", 10.0, 5.0)
    with pytest.raises(ValueError):
        sim.schedule_failure(1, 0, "memory", 10.0, 5.0)
    sim.schedule_failure(0, 1, "sudden", 2.0, 0.0)
    for _ in range(3):
        sim.step()
    assert [lab["gpu_index"] for lab in sim.drain_labels()] == [1]
    with pytest.raises(ValueError):
        sim.schedule_failure(0, 1, "memory", 10.0, 5.0)


def test_jittered_snapshots_stay_time_ordered() -> None:
    sim = FleetSimulator(FleetConfig(hosts=6, gpus_per_host=1, start_ts=T0, ts_jitter_s=0.3))
    ts = [s["ts"] for _ in range(50) for s in sim.step()]
    assert ts == sorted(ts) and len(set(ts)) > 50


def test_simulate_to_dir(tmp_path: Path) -> None:
    seen: list[float] = []
    over = {"rate_scale": 3e4, "repair_time_scale": 1e-3, "ts_jitter_s": 0.2}
    stats = simulate_to_dir(3, 4, 0.01, tmp_path, seed=2, config_overrides=over, progress=seen.append)
    assert stats["gpu_samples"] == 864 * 12 and stats["failures"] == sum(stats["by_mode"].values()) > 0
    assert seen[-1] == 1.0
    lines = (tmp_path / "samples.jsonl").read_bytes().splitlines()
    assert len(lines) == 864 * 3
    ts = [orjson.loads(line)["ts"] for line in lines]
    assert ts == sorted(ts)
    for line in lines[::97]:
        for g in orjson.loads(line)["gpus"]:
            _check_gpu(g)
    labels = [orjson.loads(x) for x in (tmp_path / "labels.jsonl").read_bytes().splitlines()]
    meta = orjson.loads((tmp_path / "meta.json").read_bytes())
    assert len(labels) == stats["failures"] + meta["precursors_in_progress"]
    assert all(set(lab) == LABEL_KEYS for lab in labels)
    assert meta["config"]["rate_scale"] == 3e4 and meta["seed"] == 2
    again = tmp_path / "again"
    simulate_to_dir(3, 4, 0.01, again, seed=2, config_overrides=over)
    assert (again / "samples.jsonl").read_bytes() == b"\n".join(lines) + b"\n"


def test_meta_lists_the_gpus_born_with_a_lookalike(tmp_path: Path) -> None:
    quiet = {"hot_gpu_frac": 0.0, "sbe_trickle_frac": 0.0, "replay_trickle_frac": 0.0, "narrow_link_frac": 0.0,
             "remap_pending_frac": 0.0}  # fmt: skip
    simulate_to_dir(2, 4, 0.002, tmp_path / "quiet", seed=3, config_overrides=quiet)
    assert orjson.loads((tmp_path / "quiet" / "meta.json").read_bytes())["lookalike_gpus"] == []
    simulate_to_dir(2, 4, 0.002, tmp_path / "hot", seed=3, config_overrides={**quiet, "hot_gpu_frac": 1.0})
    meta = orjson.loads((tmp_path / "hot" / "meta.json").read_bytes())
    first = orjson.loads((tmp_path / "hot" / "samples.jsonl").read_bytes().splitlines()[0])
    host0 = {g["uuid"] for g in first["gpus"]}
    assert host0 <= set(meta["lookalike_gpus"]) and len(meta["lookalike_gpus"]) == 8
    assert set(meta["lookalike_gpus_by_kind"]["hot_gpu"]) == set(meta["lookalike_gpus"])
    assert meta["lookalike_gpus_by_kind"]["sbe_trickle"] == []


def test_a_feed_starts_its_agents_at_moments_spread_over_join_over_s() -> None:
    def first_seen(join_over_s: float) -> dict[str, float]:
        sim = FleetSimulator(FleetConfig(hosts=16, seed=3, start_ts=1_000_000.0))
        feed = SimulatedFeed(sim, producer=None, topic="unused", join_over_s=join_over_s)  # type: ignore[arg-type]
        seen: dict[str, float] = {}
        for _ in range(30):
            for host, value in feed.snapshots():
                seen.setdefault(host, orjson.loads(value)["ts"])
        return seen

    together = first_seen(0.0)
    assert len(together) == 16 and set(together.values()) == {1_000_001.0}
    spread = first_seen(20.0)
    assert set(spread) == set(together)  # every agent has started after 20 s
    starts = sorted(spread.values())
    assert starts[0] < 1_000_006.0 and starts[-1] > 1_000_015.0 and len(set(starts)) >= 8
    assert spread == first_seen(20.0)  # the same moments for the same fleet seed
