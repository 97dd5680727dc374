"""`gpuwatch train --archive`: retraining on a fleet's own archive, split by time, refused when labels are too few."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.apps.cli import main
from gpuwatch.archive.labels import LabelStore
from gpuwatch.archive.storage import Storage
from gpuwatch.archive.writer import import_recording
from gpuwatch.simulator.fleet import simulate_to_dir
from gpuwatch.streams.model import load_artifact
from gpuwatch.training.dataset import Failures
from gpuwatch.training.retrain import (
    MIN_TRAIN_FAILURES,
    MIN_VALIDATION_FAILURES,
    NotEnoughLabels,
    count_labels,
    time_split,
    wilson_half_width,
)

DAY = 86400.0
T0 = 1_700_000_000.0


def test_training_ends_a_horizon_before_the_validation_window_which_holds_the_last_days() -> None:
    s = time_split(T0, T0 + 14 * DAY, validate_days=7, horizon_s=3600.0)
    assert s.split == T0 + 7 * DAY and s.end == T0 + 14 * DAY
    assert s.train_until == s.split - 3600.0 and s.start < s.train_until
    with pytest.raises(NotEnoughLabels, match="leaves nothing to train on"):
        time_split(T0, T0 + 2 * DAY, validate_days=2, horizon_s=3600.0)
    with pytest.raises(NotEnoughLabels, match="positive number"):
        time_split(T0, T0 + 2 * DAY, validate_days=0, horizon_s=3600.0)


def test_the_minimums_come_from_recalls_interval_and_the_held_back_split() -> None:
    assert wilson_half_width(0.5, MIN_VALIDATION_FAILURES) <= 0.25 < wilson_half_width(0.5, MIN_VALIDATION_FAILURES - 1)
    assert (MIN_TRAIN_FAILURES, MIN_VALIDATION_FAILURES) == (25, 12)


def _failures(times: list[float], precursor: bool = True) -> Failures:
    lines = [orjson.dumps({"uuid": f"GPU-{i}", "fail_ts": t, "mode": "memory",
                           "precursor_start_ts": t - 600 if precursor else None}) for i, t in enumerate(times)]  # fmt: skip
    return Failures.parse(lines, "test")


def test_failures_are_counted_on_their_side_of_the_split_and_too_few_are_refused() -> None:
    s = time_split(T0, T0 + 14 * DAY, validate_days=7, horizon_s=3600.0)
    before = [T0 + DAY + i for i in range(MIN_TRAIN_FAILURES)]
    after = [s.split + i for i in range(MIN_VALIDATION_FAILURES)]
    counts = count_labels(_failures(before + after + [s.end + 60.0]), s)  # the last: a precursor still running
    assert (counts.train, counts.validation, counts.precursors_known) == (MIN_TRAIN_FAILURES, MIN_VALIDATION_FAILURES, True)
    counts.check()
    with pytest.raises(NotEnoughLabels, match=f"11 in the validation window \\(need {MIN_VALIDATION_FAILURES}"):
        count_labels(_failures(before + after[1:]), s).check()
    # Labels derived from telemetry do not know precursors: every failure counts then.
    assert not count_labels(_failures(before + after, precursor=False), s).precursors_known


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A small fleet failing very often, archived, with the simulator's labels imported into the label store."""
    base = tmp_path_factory.mktemp("retrain")
    simulate_to_dir(2, 8, 0.5, base / "sim", seed=16, interval_s=60.0,
                    config_overrides={"rate_scale": 60000.0, "repair_time_scale": 0.003, "host_frailty": False})  # fmt: skip
    location = str(base / "archive")
    import_recording(str(base / "sim" / "samples.jsonl"), Storage(location))
    labels = [orjson.loads(x) for x in (base / "sim" / "labels.jsonl").read_bytes().splitlines()]
    LabelStore(Storage(location)).append("import", labels)
    return location, base / "sim" / "labels.jsonl"


def test_retraining_fine_tunes_on_the_past_and_chooses_on_the_last_days(archive: tuple[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    location, _ = archive
    out = tmp_path / "fleet.pt"
    argv = ["train", "--archive", location, "--validate-days", "0.15", "--epochs", "1", "--sample-every", "120",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    model = load_artifact(out)
    about = model.metrics["retrained"]
    window = about["data_window"]
    assert window["start"] < window["train_until"] == window["split"] - 3600.0 < window["end"]
    assert window["end"] - window["split"] == pytest.approx(0.15 * DAY)
    assert about["parent"]["version"] == load_artifact().version
    assert about["labels"]["train"] >= MIN_TRAIN_FAILURES and about["labels"]["validation"] >= MIN_VALIDATION_FAILURES
    # Calibrated and operated at this fleet's own rate, on the validation window.
    assert model.calibration_map is not None and model.calibration_prevalence > 0.02
    chosen_for = model.metrics["operating_points_chosen_for"]
    assert chosen_for["failures_per_gpu_day"] == pytest.approx(about["fleet_failure_rate_per_gpu_day"])
    assert 0 < chosen_for["validation_gpu_days"] <= 16 * 0.15
    report = orjson.loads(out.with_suffix(".json").read_bytes())
    assert report["model"] == model.version and report["parent"]["init"] == "shipped"
    assert np.isfinite(report["validation"]["recall"])


def test_too_few_labels_are_refused_in_one_line(archive: tuple[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    location, labels = archive
    few = tmp_path / "few.jsonl"
    few.write_bytes(b"\n".join(labels.read_bytes().splitlines()[:10]) + b"\n")
    out = tmp_path / "none.pt"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--archive", location, "--labels", str(few), "--validate-days", "0.15", "--out", str(out)])
    message = str(exc.value.code)
    assert message.startswith("gpuwatch train: ") and "too few labels" in message and "need 25" in message
    assert len(message.splitlines()) == 1 and not out.exists()
