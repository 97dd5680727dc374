"""Train, eval and score count the recording lines they set aside and say which was first; a bad labels line
stops them with one line naming it."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import pytest

from gpuwatch.apps.cli import build_parser
from gpuwatch.simulator.fleet import simulate_to_dir
from gpuwatch.streams.model import load_artifact
from gpuwatch.training.cli import train_command
from gpuwatch.training.dataset import DeadLetterCount, RecordingError, build_sequences
from gpuwatch.training.eval_cli import eval_command
from gpuwatch.training.score import score_command


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def spoiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two hosts of four GPUs for an hour at 30 s with a failure, and three lines that do not decode: lines 3
    (not JSON), 10 (a snapshot with a wrong type) and the last (cut short)."""
    out = tmp_path_factory.mktemp("spoiled")
    simulate_to_dir(2, 4, days=1 / 24, out=out, seed=5, interval_s=30.0, config_overrides={
        "rate_scale": 3000.0, "repair_time_scale": 0.005, "forced_failures": [(0, 1, "memory", 2400.0, 1200.0)],
    })  # fmt: skip
    lines = (out / "samples.jsonl").read_bytes().splitlines()
    wrong = orjson.loads(lines[8])
    wrong["ts"] = "soon"
    lines[8] = orjson.dumps(wrong)
    lines.insert(2, b"{not json")
    lines.append(lines[-1][: len(lines[-1]) // 2])
    (out / "samples.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return out


def _first(out: Path) -> str:
    return f"{out / 'samples.jsonl'}:3 "


def test_training_sequences_count_the_lines_left_out(spoiled: Path) -> None:
    dead = DeadLetterCount()
    build_sequences(spoiled / "samples.jsonl", spoiled / "labels.jsonl", sample_every_s=60.0, deadletters=dead)
    assert dead.lines == 3 and dead.first.startswith(_first(spoiled))
    assert dead.describe() == f"3 lines dead-lettered (first: {dead.first})"


def test_train_reports_them_on_stderr_and_in_the_artifact(
    spoiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.pt"
    argv = ["train", "--data", str(spoiled), "--out", str(model), "--epochs", "1", "--sample-every", "60", "--no-gbdt"]
    assert train_command(_args(*argv)) == 0
    err = capsys.readouterr().err
    assert f"{spoiled / 'samples.jsonl'}: 3 lines dead-lettered (first: {_first(spoiled)}" in err
    dead = load_artifact(model).metrics["deadletters"]
    assert dead["lines"] == 3 and dead["first"].startswith(_first(spoiled))


def test_eval_reports_them_on_stderr_and_in_the_json(
    spoiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "eval.json"
    assert eval_command(_args("eval", "--data", str(spoiled), "--json", str(report))) == 0
    captured = capsys.readouterr()
    assert f"{spoiled / 'samples.jsonl'}: 3 lines dead-lettered (first: {_first(spoiled)}" in captured.err
    assert "samples: 3 lines dead-lettered (first: " in captured.out
    dead = orjson.loads(report.read_bytes())["data"]["deadletters"]
    assert dead["lines"] == 3 and dead["first"].startswith(_first(spoiled))


def test_score_reports_the_first_with_the_count(
    spoiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, summary = tmp_path / "risk.jsonl", tmp_path / "score.json"
    argv = ["score", "--input", str(spoiled / "samples.jsonl"), "--output", str(out), "--json", str(summary)]
    assert score_command(_args(*argv, "--workers", "1")) == 0
    assert f"gpuwatch score: 3 lines dead-lettered (first: {_first(spoiled)}" in capsys.readouterr().err
    figures = orjson.loads(summary.read_bytes())
    assert figures["deadletters"] == 3 and figures["deadletter_first"].startswith(_first(spoiled))


def test_a_bad_labels_line_is_one_line_naming_it(
    spoiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "samples.jsonl").write_bytes((spoiled / "samples.jsonl").read_bytes())
    (data / "labels.jsonl").write_bytes((spoiled / "labels.jsonl").read_bytes() + b'{"uuid": "GPU-x", "mode": "fan"}\n')
    line = len((data / "labels.jsonl").read_bytes().splitlines())
    message = (f"{data / 'labels.jsonl'}:{line}: not a failure label (no field 'fail_ts'); each line needs uuid, "
               "fail_ts and mode, as `gpuwatch simulate` writes them")  # fmt: skip
    assert eval_command(_args("eval", "--data", str(data))) == 2
    assert capsys.readouterr().err.strip() == f"gpuwatch eval: {message}"
    with pytest.raises(SystemExit, match="^gpuwatch train: " + message.replace("(", r"\(").replace(")", r"\)")):
        train_command(_args("train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--no-gbdt"))


def test_a_recording_with_nothing_usable_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "samples.jsonl").write_bytes(b"garbage\n")
    (tmp_path / "labels.jsonl").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"produced no sequences \(empty, too short or all invalid; 1 lines "
                                         r"dead-lettered \(first: .*samples.jsonl:1 "):  # fmt: skip
        train_command(_args("train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--no-gbdt"))
    with pytest.raises(RecordingError):
        build_sequences(tmp_path / "samples.jsonl", tmp_path / "labels.jsonl")
