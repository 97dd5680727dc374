"""Training, offline scoring and evaluation end to end on a tiny simulated fleet, and the replay cadence."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from gpuwatch.apps.cli import build_parser
from gpuwatch.schemas.codecs import decode_risk, decode_snapshot
from gpuwatch.schemas.fields import ALL_NUMERIC
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator, simulate_to_dir
from gpuwatch.streams.model import Scorer, load_artifact, weights_digest
from gpuwatch.streams.operating_point import MIN_RECORDS
from gpuwatch.streams.processor import Inbound, RiskProcessor
from gpuwatch.streams.window import FEATURE_NAMES, WindowStore, _nan_to
from gpuwatch.training.baselines import RULES, GbdtBaseline, ThresholdRules, rule_hits
from gpuwatch.training.cli import train_command
from gpuwatch.training.eval_cli import as_recording, eval_command
from gpuwatch.training.evaluate import PERSISTENCE_CHOICES_S, RiskTable, event_metrics, join_labels
from gpuwatch.training.score import replay, score_command


def _fleet(out: Path, seed: int) -> None:
    # Two hosts of four GPUs for three hours at 5 s, two failures with long precursors, plus random ones.
    simulate_to_dir(2, 4, days=3 / 24, out=out, seed=seed, interval_s=5.0, config_overrides={
        "rate_scale": 3000.0, "repair_time_scale": 0.005,
        "forced_failures": [(0, 1, "memory", 7200.0, 3600.0), (1, 2, "interconnect", 9000.0, 3600.0)],
    })  # fmt: skip


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_train_score_eval_end_to_end(tmp_path: Path) -> None:
    _fleet(tmp_path / "train", 1)
    _fleet(tmp_path / "val", 2)
    _fleet(tmp_path / "val2", 4)
    _fleet(tmp_path / "test", 3)
    model = tmp_path / "model.pt"
    assert train_command(_args(
        "train", "--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val"), "--val-data",
        str(tmp_path / "val2"), "--out", str(model), "--epochs", "1", "--sample-every", "60", "--seed", "3",
        "--data-seed", "0",
    )) == 0  # fmt: skip
    artifact = load_artifact(model)
    assert artifact.features == FEATURE_NAMES
    assert 0.0 < artifact.threshold < 1.0 and artifact.temperature > 0
    assert artifact.data_fingerprint
    assert artifact.metrics["threshold_from"].startswith("alarm: the highest recall with alarm precision")
    assert artifact.metrics["threshold_from"].endswith("on validation fleets val + val2")
    chosen_for = artifact.metrics["operating_points_chosen_for"]
    assert chosen_for["failures_per_gpu_day"] == 1.943e-4 and chosen_for["costs"]["job_gpus"] == 1024
    # the calibration base rate is recorded, so risk can be restated at a real fleet's
    assert 0.0 < artifact.calibration_prevalence < 1.0
    # persistence is chosen in seconds of sample time, one of the candidates
    assert artifact.alarm_records == MIN_RECORDS and artifact.alarm_for_s in PERSISTENCE_CHOICES_S
    if artifact.migrate_threshold is not None:  # a drain operating point is never looser than the alarm's
        assert artifact.migrate_threshold >= artifact.threshold and artifact.migrate_for_s >= artifact.alarm_for_s
    # Both validation fleets pooled: each has the two forced failures with precursors.
    assert artifact.metrics["validation_events"]["failures_with_precursor"] >= 4
    assert artifact.metrics["data_seed"] == 0 and artifact.metrics["train_config"]["seed"] == 3
    assert artifact.metrics["validated_intervals_s"] == [5.0] and artifact.validated_interval_s == 5.0
    assert model.with_suffix(".gbdt.txt").exists()

    risk_path = tmp_path / "risk.jsonl"
    assert score_command(_args(
        "score", "--input", str(tmp_path / "test" / "samples.jsonl"), "--output", str(risk_path),
        "--model", str(model), "--json", str(tmp_path / "score.json"),
    )) == 0  # fmt: skip
    records = [decode_risk(line) for line in risk_path.read_bytes().splitlines()]
    assert records and all(r.model == artifact.version and 0 <= r.risk <= 1 for r in records)
    # Sampled every 5 s and rescored every 5 s: one record per GPU-sample.
    summary = orjson.loads((tmp_path / "score.json").read_bytes())
    assert summary["risk_records"] == summary["gpu_samples"] == len(records)

    report_path = tmp_path / "eval.json"
    assert eval_command(_args("eval", "--data", str(tmp_path / "test"), "--model", str(model),
                              "--json", str(report_path))) == 0  # fmt: skip
    report = orjson.loads(report_path.read_bytes())
    for key in ("pr_auc", "precision", "recall", "f1", "median_lead_min", "ece", "baseline_threshold_f1",
                "baseline_gbdt_f1"):  # fmt: skip
        assert key in report
    assert set(report["scorers"]) == {"lstm", "threshold", "gbdt"}
    # the eval's predictions are the scored records, less those of failed GPUs (not predictions)
    assert report["data"]["risk_records"] + report["data"]["failed_records"] == len(records)
    assert report["data"]["failed_records"] == sum(r.failed for r in records) > 0
    assert report["scorers"]["lstm"]["failures_with_precursor"] >= 2  # the two forced failures at least
    assert report["alarm_records"] == artifact.alarm_records >= 1
    assert report["sampling"] == {"interval_s": 5.0, "validated_intervals_s": [5.0], "slower_than_validated": False}
    # The policy was replayed on the model's records and on the threshold rules' alarms
    assert set(report["system"]) == {"lstm", "threshold"}
    for action in ("checkpoint", "migrate", "reboot"):
        assert report["system"]["lstm"]["actions"][action]["after_failure"] == 0
    assert report["system"]["lstm"]["actions"]["repair"]["repairs_not_after_a_failure"] == 0
    assert report["system"]["lstm"]["value"]["oracle_gpu_h_per_1000_gpu_days_real"] > 0
    assert report["scorers"]["gbdt"]["alarm_records"] == GbdtBaseline.load(model.with_suffix(".gbdt.txt"),
                                                                           artifact).alarm_records  # fmt: skip
    # The eval's alarms are the stream's: its alarm episodes are those of the scored records' own `alarm` flags,
    # though it states risk at the fleet's own failure rate (the operating point compares the score).
    live = [r for r in records if not r.failed]
    flags = RiskTable.from_columns([r.uuid for r in live], np.array([r.ts for r in live]),
                                   {"m": np.array([float(r.alarm) for r in live])},
                                   {"m": np.zeros(len(live), dtype=np.int64)})  # fmt: skip
    lab = join_labels(flags, as_recording(tmp_path / "test").failures(), artifact.horizon_s)
    by_flags = event_metrics(lab, lab.risk["m"], 0.5, 600.0)
    assert by_flags["alarm_episodes"] == report["scorers"]["lstm"]["alarm_episodes"] > 0
    assert by_flags["caught_with_precursor"] == report["scorers"]["lstm"]["caught_with_precursor"]

    # New operating points for trained weights, without retraining: same weights, chosen on another fleet.
    repicked = tmp_path / "repicked.pt"
    assert train_command(_args(
        "train", "--operating-point-of", str(model), "--val-data", str(tmp_path / "test"), "--out", str(repicked),
    )) == 0  # fmt: skip
    again = load_artifact(repicked)
    assert again.version == artifact.version and again.temperature == artifact.temperature
    assert all(torch.equal(again.state_dict[k], v) for k, v in artifact.state_dict.items())
    assert again.metrics["validation_events"]["alarm_records"] == again.alarm_records
    assert again.metrics["operating_point_of"] == str(model)
    assert repicked.with_suffix(".gbdt.txt").exists()
    with pytest.raises(SystemExit, match="needs --val-data"):
        train_command(_args("train", "--operating-point-of", str(model), "--out", str(repicked)))
    with pytest.raises(SystemExit, match="--operating-point-of .*missing.pt is not a file"):
        train_command(_args("train", "--operating-point-of", str(tmp_path / "missing.pt"), "--val-data",
                            str(tmp_path / "test"), "--out", str(repicked)))  # fmt: skip


@pytest.mark.parametrize(("interval_s", "slower"), [(60.0, False), (120.0, True)])
def test_score_and_eval_say_when_a_recording_is_sampled_more_slowly_than_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], interval_s: float, slower: bool
) -> None:
    """The shipped model's points were chosen on fleets sampled every 5 to 60 s: a recording at 120 s gets a
    warning line from score and eval, and eval's report says so; one at 60 s does not."""
    simulate_to_dir(2, 2, days=2 / 24, out=tmp_path, seed=5, interval_s=interval_s)
    assert load_artifact().validated_interval_s == 60.0
    assert score_command(_args("score", "--input", str(tmp_path / "samples.jsonl"), "--output",
                               str(tmp_path / "risk.jsonl"), "--workers", "1")) == 0  # fmt: skip
    assert eval_command(_args("eval", "--data", str(tmp_path), "--json", str(tmp_path / "eval.json"))) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    if slower:
        assert [w.split(":")[0] for w in warnings] == ["gpuwatch score", "gpuwatch eval"]
        assert all(f"sampled every {interval_s:g} s, slower than the 60 s model" in w for w in warnings)
    else:
        assert warnings == []
    report = orjson.loads((tmp_path / "eval.json").read_bytes())
    assert report["sampling"] == {"interval_s": interval_s, "validated_intervals_s": [5.0, 30.0, 60.0],
                                  "slower_than_validated": slower}  # fmt: skip


def test_data_seed_keeps_the_sequences_and_split_while_seed_changes_the_weights(tmp_path: Path) -> None:
    _fleet(tmp_path / "train", 1)
    common = ["train", "--data", str(tmp_path / "train"), "--epochs", "1", "--sample-every", "60"]
    seeds = {"a": ["--seed", "0"], "b": ["--seed", "5", "--data-seed", "0"], "c": ["--seed", "5"]}
    runs = {}
    for name, seed_args in seeds.items():
        out = str(tmp_path / f"{name}.pt")
        assert train_command(_args(*common, *seed_args, "--no-gbdt", "--out", out)) == 0
        runs[name] = load_artifact(tmp_path / f"{name}.pt")
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert (a.metrics["data_seed"], b.metrics["data_seed"], c.metrics["data_seed"]) == (0, 0, 5)
    # Same data seed: the same sequences, split the same way; another weight seed: other weights.
    assert a.metrics["train_sequences"] == b.metrics["train_sequences"]
    assert a.metrics["val_sequences"] == b.metrics["val_sequences"]
    assert not torch.equal(a.state_dict["lstm.weight_ih_l0"], b.state_dict["lstm.weight_ih_l0"])
    # Same data, other weights: another model name (the data fingerprint, then the weights' digest).
    assert a.version != b.version and a.version.rsplit("-", 1)[0] == b.version.rsplit("-", 1)[0]
    assert b.version.endswith("-" + weights_digest(b.state_dict))
    # Without --data-seed the weight seed also draws the sequences and the split (as before --data-seed).
    assert (c.metrics["train_sequences"], c.metrics["val_sequences"]) != (
        a.metrics["train_sequences"], a.metrics["val_sequences"],
    )


def test_replay_scores_the_same_samples_as_a_live_worker() -> None:
    """Offline replay vs one snapshot per batch (a live worker at 1 Hz): same GPUs, same ts, same risk."""
    sim = FleetSimulator(
        FleetConfig(hosts=3, gpus_per_host=4, seed=5, start_ts=1_700_000_000.0, interval_s=1.0)
    )
    lines = [value for _ in range(40) for _, value in sim.step_json()]
    artifact = load_artifact()
    live = RiskProcessor(Scorer(artifact, "cpu"), rescore_interval_s=5.0)
    expected = [decode_risk(v) for line in lines for _, v in live.process([Inbound(line)]).risk]

    with tempfile.NamedTemporaryFile(suffix=".jsonl") as fh:
        fh.write(b"\n".join(lines) + b"\n")
        fh.flush()
        offline = RiskProcessor(Scorer(artifact, "cpu"), rescore_interval_s=5.0)
        got = [decode_risk(v) for result in replay(Path(fh.name), offline) for _, v in result.risk]
    key = lambda r: (r.uuid, r.ts)  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))
    assert len(expected) == 12 * 8  # 40 s at 1 Hz, scored at 0, 5, ..., 35 s
    risk_live = {key(r): r.risk for r in expected}
    assert all(r.risk == pytest.approx(risk_live[key(r)], abs=1e-5) for r in got)


def test_replay_dead_letters_an_implausible_reading_as_a_live_worker_does() -> None:
    # One implementation online and offline: a value no GPU can report never reaches a window in either.
    sim = FleetSimulator(
        FleetConfig(hosts=2, gpus_per_host=4, seed=6, start_ts=1_700_000_000.0, interval_s=1.0)
    )
    lines = [value for _ in range(12) for _, value in sim.step_json()]
    bad = orjson.loads(lines[7])
    bad["gpus"][1]["temp_c"] = 1e300
    lines[7] = orjson.dumps(bad)
    artifact = load_artifact()
    live = RiskProcessor(Scorer(artifact, "cpu"), rescore_interval_s=5.0)
    live_results = [live.process([Inbound(line, "live", 0, i)]) for i, line in enumerate(lines)]
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as fh:
        fh.write(b"\n".join(lines) + b"\n")
        fh.flush()
        offline_results = list(replay(Path(fh.name), RiskProcessor(Scorer(artifact, "cpu"), rescore_interval_s=5.0)))
    for results in (live_results, offline_results):
        errors = [orjson.loads(d)["error"] for r in results for d in r.deadletters]
        assert errors == ["gpus[1].temp_c: 1e+300 is beyond any real reading (|x| > 1e+15); not applied"]
        assert sum(r.samples for r in results) == (len(lines) - 1) * 4


def test_peer_features_single_out_the_gpu_that_runs_hot() -> None:
    """Raising one GPU's temperature by 15 °C moves its temp_peer by +1.5 and each peer's by -15/3/10."""
    sim = FleetSimulator(
        FleetConfig(hosts=1, gpus_per_host=4, seed=2, start_ts=1_700_000_000.0, interval_s=5.0)
    )
    snaps = [decode_snapshot(sim.step_json()[0][1]) for _ in range(5)]
    temp_col = ALL_NUMERIC.index("temp_c")
    out = []
    for offset in (0.0, 15.0):
        store = WindowStore()
        for snap in snaps:
            numeric = snap.numeric.copy()
            numeric[2, temp_col] += offset
            slots = store.slots_for(snap.uuids, [snap.host] * 4, snap.gpu_index)
            store.update(slots, np.full(4, snap.ts), numeric, snap.flags, snap.throttle, snap.xids)
        out.append(store.current[slots, FEATURE_NAMES.index("temp_peer")].astype(np.float64))
    assert out[1] - out[0] == pytest.approx([-0.5, -0.5, 1.5, -0.5], abs=1e-4)


def test_the_folds_nan_replacement_is_numpys() -> None:
    """The window's fast stand-in for np.nan_to_num gives its values and dtype, infinities included."""
    for dtype in (np.float64, np.float32):
        x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e300 if dtype == np.float64 else 3e38, -2.5], dtype=dtype)
        for nan in (0.0, 0.3):
            got, want = _nan_to(x, nan), np.nan_to_num(x, nan=nan)
            assert got.dtype == want.dtype and np.array_equal(got, want)
        assert np.isnan(x[0])  # the input is left alone


def test_threshold_rules_fire_on_what_they_say() -> None:
    seqs = np.zeros((3, 16, len(FEATURE_NAMES)), dtype=np.float32)
    seqs[:, :, FEATURE_NAMES.index("log_min_since_xid")] = np.log1p(24 * 60.0) / 7.0  # no recent XID
    seqs[:, :, FEATURE_NAMES.index("pcie_width_ratio")] = 1.0
    seqs[0, -11:, FEATURE_NAMES.index("temp")] = 0.88  # 88 °C for the last 5 minutes
    seqs[1, -1, FEATURE_NAMES.index("remap_pending")] = 1.0
    hits = rule_hits(seqs)
    names = [r.name for r in RULES]
    assert hits[0].tolist() == [n == "gpu_hot" for n in names]
    assert hits[1].tolist() == [n == "row_remap" for n in names]
    assert not hits[2].any()
    risk, mode = ThresholdRules(load_artifact()).score(seqs)
    assert risk.tolist() == [1.0, 1.0, 0.0]
