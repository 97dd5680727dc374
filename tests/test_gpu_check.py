"""`gpuwatch bench gpu`, the check that needs a real GPU, run here against the stand-in NVML: what it reads,
that it sees an XID the driver raises, that its recording is what `gpuwatch score` reads, and its one-line
refusal on a machine without a GPU. The figures themselves come from a GPU machine (docs/gpu-check.md)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

import gpuwatch.producers.agent as agent_module
from gpuwatch.apps.bench import gpu
from gpuwatch.apps.cli import main
from gpuwatch.producers.nvml import NvmlUnavailable
from gpuwatch.schemas.codecs import decode_snapshot
from gpuwatch.simulator.fake_nvml import FakeNvml

DATA = Path(__file__).parent / "data" / "h200-healthy"


def test_nvml_check_reads_every_gpu_through_the_contract() -> None:
    out = gpu.nvml_check(FakeNvml(3), reads=5)
    assert out["gpus"] == 3 and out["reads"] == 5
    assert out["contract_ok"] and out["unexpected_nvml_errors"] == 0
    assert "fan_pct" in out["null_fields_gpu0"]  # the stand-in's H100 SXM has no fan, as the real one
    assert out["read_all_gpus"]["p50_ms"] <= out["read_all_gpus"]["max_ms"]


def test_xid_check_finds_the_xid_that_was_provoked() -> None:
    fake = FakeNvml(2)

    def provoke() -> dict:
        fake.inject_xid(1, 31)
        return {"how": "stand-in"}

    out = gpu.xid_check(fake, provoke, wait_s=5)
    assert out["event_set_available"] and out["how"] == "stand-in"
    assert out["xids_in_samples"] == ["gpu 1: XID 31"]
    assert out["collector_xids"] == 1


def test_xid_check_reports_none_when_nothing_arrives() -> None:
    out = gpu.xid_check(FakeNvml(1), lambda: {}, wait_s=0.5)
    assert out["xids_in_samples"] == [] and out["seconds_to_sample"] is None


def test_record_trace_writes_snapshots_score_can_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "load_pynvml", lambda: FakeNvml(2))
    monkeypatch.setattr(gpu, "_LOAD", "print('load running', flush=True)\nimport time\ntime.sleep(60)")
    monkeypatch.setattr(gpu, "provoke_xid", lambda: {"how": "stand-in"})
    path = tmp_path / "trace.jsonl"
    out = gpu.record_trace(str(path), seconds=3, interval_s=0.5,
                           schedule=((0, "idle"), (1, "compute"), (2, "xid")))  # fmt: skip
    lines = path.read_bytes().splitlines()
    assert out["snapshots"] == len(lines) >= 5
    assert [decode_snapshot(v).seq for v in lines] == list(range(len(lines)))
    phases = orjson.loads(Path(f"{path}.phases.json").read_bytes())["phases"]
    assert [p["phase"] for p in phases] == ["idle", "compute", "xid"]
    assert phases[2]["how"] == "stand-in"
    assert main(["score", "--input", str(path), "--output", str(tmp_path / "risk.jsonl")]) == 0


def test_the_h200_recording_is_valid_and_holds_the_xid() -> None:
    lines = (DATA / "samples.jsonl").read_bytes().splitlines()
    snaps = [orjson.loads(v) for v in lines]
    for v in lines:
        decode_snapshot(v)
    assert len(snaps) == 360 and {s["gpus"][0]["uuid"] for s in snaps} == {snaps[0]["gpus"][0]["uuid"]}
    assert [x for s in snaps for x in s["gpus"][0]["xid"]] == [31]
    assert max(s["gpus"][0]["power_w"] for s in snaps) > 650  # the compute phases ran at the power cap


def test_bench_gpu_without_a_gpu_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def missing() -> None:
        raise NvmlUnavailable("NVML is not usable here: libnvidia-ml.so.1 was not found")

    monkeypatch.setattr(agent_module, "load_pynvml", missing)
    assert main(["bench", "gpu"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpuwatch bench gpu: NVML is not usable here")
    assert "Traceback" not in "\n".join(err)


def test_the_shipped_model_does_not_alarm_on_the_healthy_h200(tmp_path: Path) -> None:
    # A real H200 at idle, at its 700 W cap under bf16 matrix products, memory-bound, and after an application's
    # XID 31 (docs/gpu-check.md): nothing failed, so nothing may alarm. The model shipped before this test alarmed
    # on 37 of its 61 records; the h200-sxm simulator profile was fitted to this recording, so this is a check
    # that the model learnt it, not a held-out result.
    out = tmp_path / "risk.jsonl"
    assert main(["score", "--input", str(DATA / "samples.jsonl"), "--output", str(out), "--workers", "1"]) == 0
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    # One record per scoring: the first sample, then each sample at least 5 s (rescore_interval_s) after the
    # last one scored (the replay folds each snapshot in its own batch, as a live worker at 1 Hz does).
    ts = [orjson.loads(v)["ts"] for v in (DATA / "samples.jsonl").read_bytes().splitlines()]
    scored = [ts[0]]
    for t in ts[1:]:
        if t - scored[-1] >= 5.0:
            scored.append(t)
    assert [r["ts"] for r in records] == scored
    assert not any(r["failed"] for r in records)  # XID 31 is the application's fault
    assert not any(r["alarm"] for r in records), max(r["score"] for r in records)


def test_nvml_check_lists_each_query_as_read_unsupported_or_failed() -> None:
    from gpuwatch.simulator.fake_nvml import NVMLError_NoPermission

    fake = FakeNvml(2)

    def nvmlDeviceGetPowerUsage(handle: object) -> int:  # noqa: N802 - pynvml's name
        raise NVMLError_NoPermission()

    fake.nvmlDeviceGetPowerUsage = nvmlDeviceGetPowerUsage  # type: ignore[method-assign]
    out = gpu.nvml_check(fake, reads=2)
    q = out["queries"]
    assert q["nvmlDeviceGetTemperature"] == "read"
    assert q["nvmlDeviceGetFanSpeed"] == "unsupported"  # the stand-in's H100 SXM has no fan
    assert q["nvmlDeviceGetPowerUsage"].startswith("failed: ") and "ermission" in q["nvmlDeviceGetPowerUsage"]
    assert q["nvmlDeviceGetFieldValues"] == "read" and q["field pcie_replay"] == "read"
    assert out["queries_by_status"]["failed"] == 1 and out["unexpected_nvml_errors"] > 0
    assert sum(out["queries_by_status"].values()) == len(q)
