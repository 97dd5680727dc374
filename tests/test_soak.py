"""The soak bench's verdict (`gpuwatch bench soak`): trends over the steady window, pass and fail."""

from __future__ import annotations

import pytest

from gpuwatch.apps.bench.soak import (
    RSS_TREND_LIMIT_MB_PER_MIN,
    lag_is_flat,
    rss_megabytes,
    trend,
    verdict,
)


def _series(seconds: float, step: float, worker_mb_per_min: float, lag_per_min: float = 0.0) -> list[dict]:
    rows = []
    t = 0.0
    while t <= seconds:
        warm = 50.0 if t < seconds / 3 else 0.0  # warm-up growth before the window must not count
        rows.append({
            "t_s": t, "worker_rss_mb": 300.0 + worker_mb_per_min * t / 60.0 - warm, "sink_rss_mb": 120.0,
            "controller_rss_mb": 110.0 + (0.3 if int(t / step) % 2 else 0.0), "broker_rss_mb": 500.0 + t,
            "worker_lag_samples": 5000 + lag_per_min * t / 60.0, "sink_lag_records": 10, "spool_snapshots": 0,
        })  # fmt: skip
        t += step
    return rows


def test_trend_fits_only_the_window():
    ts = [0.0, 60.0, 120.0, 180.0, 240.0]
    values = [0.0, 100.0, 10.0, 11.0, 12.0]
    tr = trend(ts, values, since_s=120.0)
    assert tr.points == 3
    assert tr.slope_per_min == pytest.approx(1.0)
    assert (tr.first, tr.last) == (pytest.approx(10.0), pytest.approx(12.0))


def test_flat_processes_pass_and_warm_up_growth_is_not_counted():
    out = verdict(_series(3600, 10, worker_mb_per_min=0.1), 3600, gpus=2000)
    assert out["window_from_s"] == pytest.approx(1200.0)
    assert out["worker_rss_trend_mb_per_min"] == pytest.approx(0.1, abs=1e-6)
    assert out["worker_rss_flat"] and out["sink_rss_flat"] and out["controller_rss_flat"]
    assert out["broker_rss_trend_mb_per_min"] == pytest.approx(60.0)  # recorded, not judged
    assert out["worker_lag_flat"] and out["passed"]


def test_a_growing_process_fails():
    out = verdict(_series(3600, 10, worker_mb_per_min=RSS_TREND_LIMIT_MB_PER_MIN + 0.2), 3600, gpus=2000)
    assert not out["worker_rss_flat"]
    assert out["sink_rss_flat"]
    assert not out["passed"]


def test_a_growing_lag_fails():
    # 100 GPU-samples/min over a 40-minute window adds 4,000: more than one second of 2,000 GPUs' samples
    out = verdict(_series(3600, 10, worker_mb_per_min=0.0, lag_per_min=100.0), 3600, gpus=2000)
    assert not out["worker_lag_flat"] and not out["passed"]
    assert lag_is_flat(100.0, 2400.0, gpus=10_000)


def test_unmeasured_lag_points_are_left_out():
    rows = _series(600, 10, worker_mb_per_min=0.0)
    for row in rows[30:33]:
        row["worker_lag_samples"] = -1  # the broker did not answer
    assert verdict(rows, 600, gpus=1000)["worker_lag_flat"]


def test_anonymous_memory_is_reported_beside_rss():
    rows = _series(600, 10, worker_mb_per_min=0.0)
    for row in rows:
        row["worker_anon_mb"] = 200.0 + row["t_s"] / 60.0
    out = verdict(rows, 600, gpus=1000)
    assert out["worker_anon_trend_mb_per_min"] == pytest.approx(1.0)
    assert out["passed"]  # judged on RSS, as the figure says


def test_rss_is_read_from_proc():
    import os

    rss, anon = rss_megabytes(os.getpid()), rss_megabytes(os.getpid(), "RssAnon")
    assert 0 < anon < rss
    assert rss_megabytes(2**22 + 12345) == 0.0  # no such process


def test_no_samples_is_not_a_pass():
    assert not verdict([], 600, gpus=1000)["passed"]


def test_the_scorer_runs_its_model_without_onednn_and_gives_the_same_risk():
    """oneDNN caches kernels per input shape, so a worker meeting a new batch size every batch grew for hours."""
    import numpy as np
    import torch

    from gpuwatch.streams.model import Scorer, load_artifact

    scorer = Scorer(load_artifact(), device="cpu")
    seen: list[bool] = []
    scorer.model.lstm.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    before = torch.backends.mkldnn.enabled
    rng = np.random.default_rng(3)
    features, hidden = len(scorer.artifact.norm_mean), scorer.model.lstm.hidden_size
    seqs = rng.standard_normal((5, 4, features)).astype(np.float32)
    h, c = scorer.encode_past(seqs[:, :-1])
    incremental = scorer.score_from_state(h, c, seqs[:, -1])
    whole = scorer.score(seqs)
    assert seen == [False, False, False]
    assert torch.backends.mkldnn.enabled == before  # left as it was
    np.testing.assert_allclose(incremental[0], whole[0], rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # the same model with oneDNN, as before: same logits
        x = (torch.from_numpy(seqs) - scorer._mean) / scorer._std
        risk_logit, _ = scorer.model(x)
    np.testing.assert_allclose(scorer.logits(seqs)[0], risk_logit.numpy(), rtol=1e-4, atol=1e-5)
    assert h.shape == (5, hidden)


@pytest.mark.parametrize("gpus, seconds", [(-5, 600.0), (2000, -1.0), (2000, 30.0)])
def test_a_run_too_small_to_judge_is_refused_in_one_line(gpus, seconds):
    import argparse

    from gpuwatch.apps.bench.soak import run_soak_bench

    with pytest.raises(SystemExit) as exc:
        run_soak_bench(argparse.Namespace(gpus=gpus, seconds=seconds, interval=1.0, json_path=None))
    assert "too small to judge" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("interval", [0.0, -1.0, 120.0])
def test_an_interval_out_of_range_is_refused_in_one_line(interval):
    import argparse

    from gpuwatch.apps.bench.soak import run_soak_bench

    with pytest.raises(SystemExit) as exc:
        run_soak_bench(argparse.Namespace(gpus=2000, seconds=600.0, interval=interval, json_path=None))
    assert "--interval" in str(exc.value) and "\n" not in str(exc.value)
