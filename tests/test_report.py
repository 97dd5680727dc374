"""The run report renders from recorded data into one self-contained HTML file with its plots."""

from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuwatch.report import FailedGpu, ReportData, ReportUnavailable, RunRecorder, lead_time_s, render_report

T0 = 1_750_000_000.0


def failing_gpu(name: int, mode: str, warn_s: float | None, fail_ts: float) -> FailedGpu:
    """Risk flat at 0.03, then (if `warn_s`) a jump to 0.95 `warn_s` seconds before the failure."""
    ts = np.arange(fail_ts - 1800, fail_ts + 30, 5.0)
    risk = np.full(len(ts), 0.03)
    remediation: list[tuple[float, str]] = []
    if warn_s is not None:
        risk[ts >= fail_ts - warn_s] = 0.95
        remediation = [(fail_ts - warn_s + 10, "checkpoint"), (fail_ts - warn_s + 70, "migrate")]
    return FailedGpu(
        f"node-{name}",
        name,
        mode,
        fail_ts,
        list(zip(ts.tolist(), risk.tolist())),
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
    assert "<td>node-3:3</td><td>power</td>" in page and "not flagged" in page
    assert "checkpoint at -3.8 min, migrate at -2.8 min" in page
    # Every remediation event is listed, including one on a GPU that did not fail.
    assert page.count("<td>checkpoint</td>") == 3
    assert "<td>node-9:4</td><td>checkpoint</td><td>0.88</td><td>no</td>" in page


def test_lead_time_counts_the_last_unbroken_run_above_threshold() -> None:
    ts = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    gpu = FailedGpu("h", 0, "memory", 50.0, list(zip(ts, [0.9, 0.9, 0.2, 0.9, 0.95, 0.97])))
    assert lead_time_s(gpu, 0.85) == 20.0
    assert lead_time_s(FailedGpu("h", 0, "memory", 50.0, list(zip(ts, [0.9] * 5 + [0.5]))), 0.85) is None
    assert lead_time_s(FailedGpu("h", 0, "memory", 50.0, []), 0.85) is None


def test_report_without_failures_still_renders(tmp_path: Path) -> None:
    page = render_report(ReportData(failed=[], fleet_risk=[0.01, 0.02]), tmp_path / "r.html").read_text()
    assert "No GPU failed" in page
    assert len(embedded_pngs(page)) == 1


def test_missing_matplotlib_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(ReportUnavailable, match=r"pip install 'gpuwatch\[report\]'"):
        render_report(report_data(), tmp_path / "r.html")


def test_run_recorder_keeps_a_bounded_series_per_gpu_and_builds_report_data() -> None:
    recorder = RunRecorder(max_points_per_gpu=5)
    for i in range(8):
        recorder.add_risk([{"host": "n1", "gpu_index": 0, "ts": T0 + 5 * i, "risk": i / 10},
                           {"host": "n2", "gpu_index": 3, "ts": T0 + 5 * i, "risk": 0.01}])  # fmt: skip
    recorder.add_event(
        {"ts": T0 + 30, "host": "n1", "gpu_index": 0, "action": "checkpoint", "risk": 0.6, "id": "x"}
    )
    recorder.add_event(
        {"ts": T0 + 31, "host": "n2", "gpu_index": 3, "action": "migrate", "risk": 0.9, "id": "y"}
    )
    label = {
        "host": "n1",
        "gpu_index": 0,
        "mode": "memory",
        "fail_ts": T0 + 40,
        "precursor_start_ts": T0 - 100,
    }
    data = recorder.report_data([label], threshold=0.85, summary=[("k", "v")], title="t")

    (gpu,) = data.failed
    assert [ts for ts, _ in gpu.risk] == [T0 + 5 * i for i in range(3, 8)], (
        "only the newest 5 points are kept"
    )
    assert gpu.remediation == [(T0 + 30, "checkpoint")], "only this GPU's remediations"
    assert gpu.precursor_ts == T0 - 100 and gpu.mode == "memory"
    assert sorted(data.fleet_risk) == [0.01, 0.7]  # the latest risk of each GPU
    assert len(data.events) == 2 and "id" not in data.events[0]
