"""The in-memory simulate-and-score path computes what `gpuwatch simulate` + `gpuwatch score` compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.simulator.fleet import simulate_to_dir
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import RiskProcessor
from gpuwatch.training.fleet_replay import FleetRisk, shard_seed, simulate_and_score
from gpuwatch.training.score import replay


def _rows(fleet: FleetRisk) -> list[tuple]:
    host = fleet.host
    return [
        (fleet.hosts[host[i]], int(fleet.gpu_index[g]), fleet.uuids[g], fleet.ts[i], fleet.risk[i],
         FAILURE_MODES[fleet.mode[i]], fleet.history_s[i])
        for i, g in enumerate(fleet.gpu.tolist())
    ]  # fmt: skip


def test_in_memory_fleet_scores_what_simulate_and_score_write(tmp_path: Path) -> None:
    overrides = {"rate_scale": 3000.0, "repair_time_scale": 0.005, "ts_jitter_s": 0.3,
                 "forced_failures": [(1, 2, "thermal", 70.0, 50.0), (2, 0, "memory", 400.0, 600.0)]}  # fmt: skip
    days = 150 / 86400
    simulate_to_dir(3, 4, days, tmp_path, seed=4, interval_s=1.0, config_overrides=overrides)
    processor = RiskProcessor(Scorer(load_artifact(), "cpu"), rescore_interval_s=5.0, stage="score")
    records = [orjson.loads(v) for r in replay(tmp_path / "samples.jsonl", processor) for _, v in r.risk]
    labels = [orjson.loads(line) for line in (tmp_path / "labels.jsonl").read_bytes().splitlines()]

    seen: list = []
    fleet = simulate_and_score(3, 4, days, seed=4, interval_s=1.0, config_overrides=overrides, shards=1,
                               progress=seen.append)  # fmt: skip
    expected = [
        (r["host"], r["gpu_index"], r["uuid"], r["ts"], r["risk"], r["mode"], r["history_s"]) for r in records
    ]
    assert _rows(fleet) == expected  # exactly: same floats, same order
    assert fleet.labels == labels
    assert {lab["mode"] for lab in labels} >= {"thermal", "memory"}  # a failure and a running precursor
    assert fleet.gpu_samples == 150 * 12 and fleet.model == records[0]["model"]
    assert fleet.horizon_s == records[0]["horizon_s"]
    assert seen[-1].fraction == 1.0 and seen[-1].gpu_samples == fleet.gpu_samples
    assert seen[-1].risk_records == len(fleet.risk) == len(records)


@pytest.mark.slow
def test_shards_are_independent_fleets_assembled_in_order() -> None:
    fleet = simulate_and_score(4, 2, 40 / 86400, seed=3, shards=2)
    assert fleet.shards == 2 and fleet.seeds == [shard_seed(3, 0, 2), shard_seed(3, 1, 2)]
    assert fleet.hosts == ["node-s0-0000", "node-s0-0001", "node-s1-0000", "node-s1-0001"]
    assert len(set(fleet.uuids)) == 8 and fleet.gpu_samples == 40 * 8
    # Shard 1 is the fleet its seed and host names give on its own, scored by one process.
    alone = simulate_and_score(2, 2, 40 / 86400, seed=fleet.seeds[1], shards=1,
                               config_overrides={"host_prefix": "node-s1"})  # fmt: skip
    rows = _rows(fleet)
    assert [r for r in rows if r[0].startswith("node-s1")] == _rows(alone)
    assert np.all(np.diff((fleet.host >= 2).astype(int)) >= 0)  # shard 0's records, then shard 1's
