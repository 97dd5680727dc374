"""`gpuwatch score --workers N`: N processes, each owning a share of the hosts, write what one process writes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.apps.cli import build_parser
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator, simulate_to_dir
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import RiskProcessor
from gpuwatch.training.score import replay, score_command
from gpuwatch.training.score_shards import score_sharded

_WALL = re.compile(rb'"(scored_at|failed_at)":[-0-9.e+]+')
# torch's CPU matmul rounds a row differently depending on how many rows share the batch (the risk head's
# 32 -> 1 product, by up to a float32 ulp of the logit): a worker scores fewer GPUs per batch than one process.
RISK_ULPS = 1e-6


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def _without_wall_times(path: Path) -> bytes:
    return _WALL.sub(b"", path.read_bytes())


def _assert_same_records(got: bytes, expected: bytes) -> None:
    """The same risk records in the same order: every field equal but `scored_at`, and risk up to RISK_ULPS."""
    a = [orjson.loads(line) for line in got.splitlines()]
    b = [orjson.loads(line) for line in expected.splitlines()]
    assert len(a) == len(b)
    for r in a + b:
        del r["scored_at"]
    for key in ("risk", "score"):  # the score and the risk derived from it share the last-bit difference
        got_v = np.array([r.pop(key, np.nan) for r in a])
        exp_v = np.array([r.pop(key, np.nan) for r in b])
        assert np.array_equal(np.isnan(got_v), np.isnan(exp_v))
        assert np.nan_to_num(np.abs(got_v - exp_v)).max(initial=0.0) <= RISK_ULPS
    assert a == b


def _recording(path: Path, rejected: bool = True, moved: bool = True) -> None:
    """Five hosts at 1 Hz with jittered ts (so batches are cut by other hosts' lines too), garbage, blank
    lines, a CRLF line end, no newline at the end, an implausible value and a duplicate; with `rejected`, a snapshot the codec rejects whose host and
    ts read; with `moved`, a host reporting GPUs of the host the first worker owns (one uuid, two hosts)."""
    sim = FleetSimulator(FleetConfig(hosts=5, gpus_per_host=4, seed=11, start_ts=1_700_000_000.0,
                                     ts_jitter_s=0.4))  # fmt: skip
    lines = [raw for _ in range(45) for _, raw in sim.step_json()]
    first_host = orjson.loads(lines[0])["host"]  # the first host seen goes to worker 0, a sixth to worker 1
    if rejected:
        bad_type = orjson.loads(lines[31])
        bad_type["gpus"][0]["temp_c"] = "hot"
        lines[31] = orjson.dumps(bad_type)
    implausible = orjson.loads(lines[52])
    implausible["gpus"][2]["power_w"] = 1e300
    lines[52] = orjson.dumps(implausible)
    lines[70:70] = [lines[70]]  # a duplicate
    if moved:
        i = next(i for i in range(80, 100) if orjson.loads(lines[i])["host"] == first_host)
        other = orjson.loads(lines[i])
        other["host"] = "node-0099"
        lines[i + 1 : i + 1] = [orjson.dumps(other)]  # the same GPUs and ts under another host: stale
    lines[10:10] = [b"not json", b"", b" \t "]
    lines[40] += b"\r"  # a CRLF line ending: JSON reads the \r as white space
    path.write_bytes(b"\n".join(lines))  # the last line without a newline


@pytest.mark.slow
def test_workers_write_what_one_process_writes(tmp_path: Path) -> None:
    _recording(tmp_path / "samples.jsonl")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"risk-{workers}.jsonl"
        assert score_command(_args("score", "--input", str(tmp_path / "samples.jsonl"), "--output", str(out),
                                   "--workers", str(workers))) == 0  # fmt: skip
        outputs[workers] = (out, out.with_suffix(".deadletter.jsonl"))
    (risk_1, dead_1), (risk_2, dead_2) = outputs[1], outputs[2]
    assert risk_1.read_bytes().count(b"\n") > 150
    _assert_same_records(risk_2.read_bytes(), risk_1.read_bytes())
    errors = [orjson.loads(line)["error"] for line in dead_1.read_bytes().splitlines()]
    assert (
        len(errors) == 5
    )  # garbage, the rejected type, the implausible value, the duplicate, the moved GPUs
    assert _without_wall_times(dead_2) == _without_wall_times(dead_1)


@pytest.mark.slow
@pytest.mark.parametrize(("rejected", "moved", "why"), [
    (True, False, "1 line(s) the light parse misread (e.g. rejected by the codec), 0 GPU uuid(s)"),
    (False, True, "0 line(s) the light parse misread (e.g. rejected by the codec), 4 GPU uuid(s)"),
])  # fmt: skip
def test_workers_score_again_when_a_light_parse_cannot_tell(
    tmp_path: Path, rejected: bool, moved: bool, why: str
) -> None:
    _recording(tmp_path / "odd.jsonl", rejected, moved)
    said: list[str] = []
    odd = score_sharded(
        tmp_path / "odd.jsonl", tmp_path / "odd.risk", tmp_path / "odd.dl", workers=2, say=said.append
    )
    assert odd.passes == 2 and len(said) == 1 and why in said[0]
    processor = RiskProcessor(Scorer(load_artifact(), "cpu"), rescore_interval_s=5.0, stage="score")
    one = b"".join(v + b"\n" for r in replay(tmp_path / "odd.jsonl", processor) for _, v in r.risk)
    _assert_same_records((tmp_path / "odd.risk").read_bytes(), one)


@pytest.mark.slow
def test_workers_score_once_when_hosts_are_independent(tmp_path: Path) -> None:
    simulate_to_dir(3, 4, days=60 / 86400, out=tmp_path / "clean", seed=2)
    clean = score_sharded(tmp_path / "clean" / "samples.jsonl", tmp_path / "clean.risk", tmp_path / "clean.dl",
                          workers=3)  # fmt: skip
    assert clean.passes == 1 and clean.deadletters == 0 and clean.samples == 60 * 12
    (tmp_path / "empty.jsonl").write_bytes(b"")
    empty = score_sharded(tmp_path / "empty.jsonl", tmp_path / "empty.risk", tmp_path / "empty.dl", workers=2)
    assert (empty.samples, empty.records, empty.lines) == (0, 0, 0) and (
        tmp_path / "empty.risk"
    ).read_bytes() == b""


def test_score_refuses_bad_arguments_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.jsonl"
    assert score_command(_args("score", "--input", str(missing), "--output", str(tmp_path / "r.jsonl"))) == 2
    assert capsys.readouterr().err.strip() == (
        f"gpuwatch score: --input {missing} is neither a file nor an archive; record one with `gpuwatch simulate "
        "--out DIR` (DIR/samples.jsonl) or pass a `gpuwatch archive` location"
    )
    (tmp_path / "s.jsonl").write_bytes(b"")
    assert score_command(_args("score", "--input", str(tmp_path / "s.jsonl"), "--output", str(tmp_path / "r.jsonl"),
                               "--workers", "-2")) == 2  # fmt: skip
    assert (
        capsys.readouterr().err.strip() == "gpuwatch score: --workers must be 0 (one per CPU) or more, got -2"
    )
    assert score_command(_args("score", "--input", str(tmp_path / "s.jsonl"), "--output", str(tmp_path / "r.jsonl"),
                               "--model", str(tmp_path / "no.pt"))) == 2  # fmt: skip
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(f"gpuwatch score: model artifact {tmp_path / 'no.pt'} does not")
    )


def test_a_replay_cut_by_host_scores_what_one_second_batches_score(tmp_path: Path) -> None:
    """Batches cut before a host's second snapshot hold a whole sampling interval of the fleet (here 30 s), yet
    every GPU is folded and scored at the same samples, to the same risk, as with the batches of 1 s the replay
    used to cut."""
    from gpuwatch.streams.processor import BatchResult
    from gpuwatch.training.score import chunk_messages, file_messages

    sim = FleetConfig(hosts=4, gpus_per_host=2, seed=5, start_ts=1_700_000_000.0, interval_s=30.0, ts_jitter_s=9.0)
    path = tmp_path / "samples.jsonl"
    simulator = FleetSimulator(sim)
    path.write_bytes(b"".join(raw + b"\n" for _ in range(40) for _, raw in simulator.step_json()))

    def records(batches: list) -> bytes:
        """One batch lists its records in slot order, so larger batches order them otherwise: sort by GPU, ts."""
        rows = sorted((orjson.loads(v) for result in batches for _, v in result.risk), key=lambda r: (r["uuid"], r["ts"]))
        return b"".join(orjson.dumps(r) + b"\n" for r in rows)

    by_host = list(replay(path, RiskProcessor(Scorer(load_artifact(), "cpu"), rescore_interval_s=5.0)))
    one_second = []
    processor = RiskProcessor(Scorer(load_artifact(), "cpu"), rescore_interval_s=5.0)
    for snaps, sources, dead, _ in chunk_messages(file_messages(path), str(path), 1.0):
        result = BatchResult(deadletters=dead)
        processor.fold(snaps, sources, result)
        one_second.append(result)
    assert len(by_host) * 3 < len(one_second)  # far fewer, larger batches
    got, expected = records(by_host), records(one_second)
    assert got.count(b"\n") == 4 * 2 * 40
    _assert_same_records(got, expected)
