"""The run report renders from recorded data into one self-contained HTML file with its plots."""

from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpuwatch.apps.report import (
    FailedGpu,
    ReportData,
    ReportUnavailable,
    RunRecorder,
    lead_time_s,
    render_report,
)
from gpuwatch.schemas.records import Remediation, Risk

T0 = 1_750_000_000.0


def failing_gpu(name: int, mode: str, warn_s: float | None, fail_ts: float) -> FailedGpu:
    """Score flat at 0.03, then (if `warn_s`) a jump to 0.95 and an alarm `warn_s` seconds before the failure."""
    ts = np.arange(fail_ts - 1800, fail_ts + 1, 5.0)
    score = np.full(len(ts), 0.03)
    alarm = np.zeros(len(ts), dtype=bool)
    remediation: list[tuple[float, str]] = []
    if warn_s is not None:
        score[ts >= fail_ts - warn_s] = 0.95
        alarm[ts >= fail_ts - warn_s] = True
        remediation = [(fail_ts - warn_s + 10, "checkpoint"), (fail_ts - warn_s + 70, "migrate")]
    return FailedGpu(
        f"node-{name}",
        name,
        mode,
        fail_ts,
        list(zip(ts.tolist(), score.tolist(), alarm.tolist())),
        remediation,
        precursor_ts=fail_ts - 400,
    )


def report_data() -> ReportData:
    failed = [
        failing_gpu(1, "memory", 240.0, T0),
        failing_gpu(2, "thermal", 90.0, T0 + 20),
        failing_gpu(3, "power", None, T0 + 40),
    ]
    rng = np.random.default_rng(1)
    events = [
        {"ts": t, "host": g.host, "gpu_index": g.gpu_index, "action": a, "risk": 0.95}
        for g in failed
        for t, a in g.remediation
    ]
    events.append({"ts": T0 - 50, "host": "node-9", "gpu_index": 4, "action": "checkpoint", "risk": 0.88})
    return ReportData(
        failed=failed,
        fleet_risk=np.r_[rng.beta(0.5, 40, 1000), 0.95, 0.95, 0.03],
        events=events,
        summary=[("GPUs simulated", "1,003")],
        title="test run",
        threshold=0.66,
        op="model:0.66x2",
        fleet_alarms=2,
    )


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_has_the_failed_gpu_plot_and_the_fleet_distribution(tmp_path: Path) -> None:
    import matplotlib.image

    out = render_report(report_data(), tmp_path / "sub" / "report.html")
    page = out.read_text()
    pngs = embedded_pngs(page)
    assert len(pngs) == 2, "expected the failed-GPU plot and the fleet distribution"
    for png in pngs:
        img = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert img.shape[0] > 300 and img.shape[1] > 600, img.shape
        # The failure line and the threshold are drawn in red (#d62728): a blank plot has none.
        red = (np.abs(img[..., 0] - 0xD6 / 255) < 0.05) & (np.abs(img[..., 1] - 0x27 / 255) < 0.05)
        assert red.sum() > 200
    assert "<h1>test run</h1>" in page
    assert "GPUs simulated" in page
    # Per failed GPU: how early it was flagged, and what was done.
    assert "<td>node-1:1</td><td>memory</td>" in page and "<td>4.0 min</td>" in page
    assert "<td>1.5 min</td>" in page
    assert "<td>node-3:3</td><td>power</td>" in page and "<td>no alarm</td>" in page
    assert "operating point model:0.66x2" in page
    assert "checkpoint at -3.8 min, migrate at -2.8 min" in page
    # Every remediation event is listed, including one on a GPU that did not fail.
    assert page.count("<td>checkpoint</td>") == 3
    assert "<td>node-9:4</td><td>checkpoint</td><td>0.88</td><td>no</td>" in page


def test_lead_time_runs_from_the_first_alarm_of_the_episode_running_at_the_failure() -> None:
    def gpu(alarms: list[float], fail_ts: float = 2000.0) -> FailedGpu:
        ts = np.arange(0.0, fail_ts + 1, 10.0)
        return FailedGpu("h", 0, "memory", fail_ts, [(t, 0.9 if t in alarms else 0.1, t in alarms) for t in ts])

    assert lead_time_s(gpu([100.0, 500.0, 1000.0, 1900.0])) == 100.0  # 1000 -> 1900 is 15 min: a new episode at 1900
    assert lead_time_s(gpu([1000.0, 1500.0, 1900.0])) == 1000.0  # alarms less than 10 min apart: one episode
    assert lead_time_s(gpu([1900.0, 2000.0])) == 100.0
    assert lead_time_s(gpu([1300.0])) is None  # the episode ended (10 min without an alarm) before the failure
    assert lead_time_s(gpu([])) is None


def test_report_without_failures_still_renders(tmp_path: Path) -> None:
    page = render_report(ReportData(failed=[], fleet_risk=[0.01, 0.02]), tmp_path / "r.html").read_text()
    assert "No GPU failed" in page
    assert len(embedded_pngs(page)) == 1


def test_missing_matplotlib_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(ReportUnavailable, match=r"pip install 'gpuwatch\[report\]'"):
        render_report(report_data(), tmp_path / "r.html")


def _risk(host: str, gpu: int, ts: float, risk: float, **optional: Any) -> Risk:
    return Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts, risk=risk, horizon_s=3600.0, mode="none",
                model="m", scored_at=ts, **optional)


def test_run_recorder_keeps_a_bounded_series_per_gpu_and_builds_report_data() -> None:
    recorder = RunRecorder(max_points_per_gpu=5)
    for i in range(8):
        recorder.add_risk([_risk("n1", 0, T0 + 5 * i, 1e-5, score=i / 10, alarm=i >= 6, op="model:0.55x1"),
                           _risk("n2", 3, T0 + 5 * i, 1e-7, score=0.01)])  # fmt: skip
    # after the failure: a failed record (no score) is not a prediction and is left out
    recorder.add_risk([_risk("n1", 0, T0 + 45, 1.0, failed=True)])
    recorder.add_event(Remediation(id="x", host="n1", gpu_index=0, uuid="", action="checkpoint", reason="",
                                   risk=0.6, ts=T0 + 30))
    recorder.add_event(Remediation(id="y", host="n2", gpu_index=3, uuid="", action="migrate", reason="",
                                   risk=0.9, ts=T0 + 31))
    label = {
        "host": "n1",
        "gpu_index": 0,
        "mode": "memory",
        "fail_ts": T0 + 40,
        "precursor_start_ts": T0 - 100,
    }
    data = recorder.report_data([label], summary=[("k", "v")], title="t")

    (gpu,) = data.failed
    assert [ts for ts, _, _ in gpu.risk] == [T0 + 5 * i for i in range(3, 8)], (
        "only the newest 5 points are kept"
    )
    assert [a for _, _, a in gpu.risk] == [False, False, False, True, True] and lead_time_s(gpu) == 10.0
    assert (data.threshold, data.op) == (0.55, "model:0.55x1")
    assert gpu.remediation == [(T0 + 30, "checkpoint")], "only this GPU's remediations"
    assert gpu.precursor_ts == T0 - 100 and gpu.mode == "memory"
    assert data.fleet_risk == [0.01]  # the latest score of each GPU that has not failed
    assert len(data.events) == 2 and "id" not in data.events[0]


def test_eval_report_shows_each_fleets_reliability_diagram_and_policy_replay(tmp_path: Path) -> None:
    from gpuwatch.apps.report import render_eval_report

    bins = [{"lo": 0.0, "hi": 0.1, "count": 9000, "mean_risk": 0.01, "failure_rate": 0.012},
            {"lo": 0.6, "hi": 0.7, "count": 80, "mean_risk": 0.65, "failure_rate": 0.6}]  # fmt: skip
    scorer = {"precision": 0.9, "recall": 0.8, "median_lead_min": 12.0, "ece": 0.02, "calibration": bins,
              "calibration_max_gap_above_half": 0.05}  # fmt: skip
    action = {"events": 10, "recall": 0.8, "median_lead_min": 11.0, "false_healthy_per_1000_gpu_days": 0.5,
              "false_by_cause": {"early": 1}, "after_failure": 0}  # fmt: skip
    system = {"actions": {"checkpoint": action, "migrate": action, "reboot": action,
                          "repair": {"events": 4, "repairs_of_failures": 4}},
              "value": {k: 1.0 for k in ("net_gpu_h_per_1000_gpu_days_fleet", "oracle_gpu_h_per_1000_gpu_days_fleet",
                                         "net_gpu_h_per_1000_gpu_days_real", "oracle_gpu_h_per_1000_gpu_days_real")}}  # fmt: skip
    fleet = {"data": {"name": "heldout-x", "gpu_days": 100}, "scorers": {"lstm": scorer, "threshold": scorer},
             "system": {"lstm": system}}  # fmt: skip
    page = render_eval_report({**fleet, "datasets": [fleet, {**fleet, "data": {"name": "heldout-y"}}]},
                              tmp_path / "eval.html").read_text()  # fmt: skip
    assert "<h2>heldout-x</h2>" in page and "<h2>heldout-y</h2>" in page
    assert len(embedded_pngs(page)) == 2  # one reliability diagram per fleet
    assert "Policy replay: lstm" in page and "<td>repair</td>" in page
