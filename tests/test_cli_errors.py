"""Bad input to the `gpuwatch` command gives one line on stderr naming the input and the fix, a non-zero exit
status and no traceback; the command runs as an operator runs it, in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from gpuwatch.embedded import EmbeddedServer
from gpuwatch.schemas import redis_keys as k


def gpuwatch(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUWATCH_")}
    return subprocess.run(
        [sys.executable, "-P", "-m", "gpuwatch.apps.cli", *argv],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The only line of stderr (asserting there is one and no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("target", ["node-1:abc", "node-1:", ":3", "node-1:-1"])
def test_risk_of_a_malformed_target(redis_server: EmbeddedServer, target: str) -> None:
    done = gpuwatch("risk", target, GPUWATCH_REDIS_URL=redis_server.url)
    assert done.returncode == 2
    assert one_line(done) == (
        f"gpuwatch risk: {target!r} is not HOST or HOST:GPU; give e.g. node-0003 or node-0003:5 (GPU: an index 0, 1, ...)"
    )


def test_risk_with_redis_unreachable() -> None:
    done = gpuwatch("risk", "node-1:3", GPUWATCH_REDIS_URL="redis://127.0.0.1:1/0")
    assert done.returncode == 1
    assert one_line(done).startswith("gpuwatch risk: cannot read redis://127.0.0.1:1/0 (")


def test_config_naming_a_directory(tmp_path: Path) -> None:
    done = gpuwatch("--config", str(tmp_path), "risk", "node-1")
    assert done.returncode == 2
    assert one_line(done) == (
        f"gpuwatch: configuration error: config file {tmp_path} is a directory; give the path of a TOML file in it"
    )


def test_config_values_of_the_wrong_type_or_range(tmp_path: Path) -> None:
    for line, message in [
        ("partitions = 2.7", "partitions = 2.7: must be an integer >= 1"),
        ("alarm_threshold = true", "alarm_threshold = true: must be a number in [0, 1]"),
        ("alarm_threshold = 5", "alarm_threshold = 5: must be a number in [0, 1]"),
    ]:
        path = tmp_path / "gpuwatch.toml"
        path.write_text(line + "\n")
        done = gpuwatch("--config", str(path), "sink")
        assert done.returncode == 2
        assert one_line(done).startswith(f"gpuwatch: configuration error: config file {path}: {message}")


def test_risk_of_a_gpu_whose_hash_has_no_ts(redis_server: EmbeddedServer, redis_client: redis.Redis) -> None:
    redis_client.hset(k.gpu_key("node-1", 3), mapping={"host": "node-1", "gpu_index": "3", "risk": "0.5"})
    done = gpuwatch("risk", "node-1:3", GPUWATCH_REDIS_URL=redis_server.url)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["ts"], answer["age_s"], answer["stale"], answer["risk"]) == (None, None, True, 0.5)


def test_score_of_a_missing_input_leaves_no_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    done = gpuwatch("score", "--input", str(tmp_path / "MISSING"), "--output", str(out / "r.jsonl"),
                    "--actions", str(out / "a.jsonl"), "--json", str(out / "s.json"))  # fmt: skip
    assert done.returncode == 2
    assert one_line(done) == (
        f"gpuwatch score: --input {tmp_path / 'MISSING'} is neither a file nor an archive; record one with "
        "`gpuwatch simulate --out DIR` (DIR/samples.jsonl) or pass a `gpuwatch archive` location"
    )
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("model", ["MISSING", "a-directory", "corrupt.pt"])
def test_eval_of_a_model_that_cannot_be_read(tmp_path: Path, model: str) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "corrupt.pt").write_bytes(b"not a model")
    done = gpuwatch("eval", "--model", str(tmp_path / model), "--data", str(tmp_path), "--json",
                    str(tmp_path / "out" / "eval.json"))  # fmt: skip
    assert done.returncode == 2
    assert one_line(done).startswith(
        {"MISSING": f"gpuwatch eval: model artifact {tmp_path / model} does not exist; train one",
         "a-directory": f"gpuwatch eval: model artifact {tmp_path / model} is a directory; give the .pt file",
         "corrupt.pt": f"gpuwatch eval: cannot read model artifact {tmp_path / model}: not a model file torch "
                       "loads"}[model]  # fmt: skip
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--interval", "0"], ["--interval", "nan"], ["--seconds", "5"]])
def test_bench_archive_live_with_a_fleet_it_cannot_simulate(argv: list[str]) -> None:
    done = gpuwatch("bench", "archive", "--live", *argv)
    assert done.returncode == 2
    line = one_line(done)
    assert line.startswith("gpuwatch bench archive --live: --") and "give" in line


@pytest.mark.parametrize("what", ["explain", "score", "forecast"])
def test_bench_with_a_negative_fleet_size(what: str) -> None:
    done = gpuwatch("bench", what, "--gpus", "-1")
    assert done.returncode == 2
    assert one_line(done).startswith(f"gpuwatch bench {what}: --gpus -1")


def test_bench_throttle_with_a_throttle_kind_it_does_not_know() -> None:
    done = gpuwatch("bench", "throttle", "--throttle-kind", "fans")
    assert done.returncode == 2
    assert one_line(done) == "gpuwatch bench throttle: --throttle-kind fans: give one of power, clocks"
