"""The fleet reliability view: its estimators against exact and simulated answers, the history readers, the view
and `gpuwatch fleet`'s errors. Pure functions, no servers (tests/test_fleet_live.py has Redis and the exporter)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.apps.cli import main
from gpuwatch.apps.fleet import estimators as est
from gpuwatch.apps.fleet.history import (
    Failure,
    FailureHistory,
    HistoryError,
    parse_time,
    read_history_file,
    read_inventory,
    read_simulation,
)
from gpuwatch.apps.fleet.view import FleetOptions, LiveRisk, fleet_view, format_view, trace_mean_repair_days

DAY = est.DAY_S
T0 = 1_700_000_000.0


# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize(
    ("k", "lower", "upper"),
    # Garwood's exact 90% limits, chi2(0.05, 2k)/2 and chi2(0.95, 2k+2)/2 (e.g. scipy.stats.chi2.ppf)
    [(0, 0.0, 2.995732), (1, 0.051293, 4.743865), (5, 1.970150, 10.513035), (140, 121.122699, 161.083334)],
)
def test_count_interval_is_the_exact_chi_square_interval(k: int, lower: float, upper: float) -> None:
    lo, hi = est.count_mean_interval(k, 0.90)
    assert lo == pytest.approx(lower, abs=1e-5) and hi == pytest.approx(upper, rel=1e-6)


def test_mtbf_is_exposure_over_failures_and_unbounded_without_failures() -> None:
    m = est.mtbf(4, 1000.0)
    assert m.value == 250.0 and m.lower < 250.0 < m.upper
    assert m.upper == pytest.approx(1000.0 / est.count_mean_interval(4)[0])
    none = est.mtbf(0, 1000.0)
    assert math.isinf(none.value) and math.isinf(none.upper)
    assert none.lower == pytest.approx(
        1000.0 / -math.log(0.05)
    )  # 90%: no failure in 1000 GPU-days -> > 334 d
    with pytest.raises(ValueError, match="exposure"):
        est.rate_interval(1, 0.0)


def test_poisson_binomial_matches_enumeration_and_le_cam_bound() -> None:
    p = np.array([0.02, 0.3, 0.6, 0.05, 0.9, 0.15])  # all above SMALL_P: the exact convolution
    exact = np.zeros(len(p) + 1)
    for hits in itertools.product((0, 1), repeat=len(p)):
        exact[sum(hits)] += np.prod(np.where(np.array(hits) == 1, p, 1 - p))
    assert np.allclose(est.poisson_binomial_pmf(p)[: len(exact)], exact, atol=1e-12)
    small = np.full(400, 0.004)  # below SMALL_P: summed into one Poisson
    dp = np.zeros(small.size + 1)
    dp[0] = 1.0
    for q in small:
        dp[1:] = dp[1:] * (1 - q) + dp[:-1] * q
        dp[0] *= 1 - q
    approx = est.poisson_binomial_pmf(small)
    n = min(len(approx), len(dp))
    tv = 0.5 * (np.abs(approx[:n] - dp[:n]).sum() + approx[n:].sum() + dp[n:].sum())
    assert tv <= 2 * float((small**2).sum())
    e = est.poisson_binomial_interval(np.r_[small, p], 0.9)
    assert e.value == pytest.approx(small.sum() + p.sum()) and e.lower <= e.value <= e.upper


def test_window_probability_keeps_the_risk_for_its_horizon_and_the_base_rate_after() -> None:
    rate = 2e-4
    healthy = -math.expm1(-rate / 24)  # a GPU at the base rate: risk within one hour
    p = est.window_failure_probability(np.array([healthy, 0.5, 1.0]), 3600.0, 86400.0, rate)
    assert p[0] == pytest.approx(-math.expm1(-rate))  # a day at the base rate
    assert 0.5 < p[1] < 0.5 + 1e-3  # an alarm is one failure, not compounded over 24 hours
    assert p[2] == 1.0
    half = est.window_failure_probability(np.array([0.19]), 3600.0, 1800.0, rate)
    assert half[0] == pytest.approx(0.1, abs=1e-9)  # constant hazard within the horizon


def test_predictive_interval_holds_its_level_for_a_known_rate() -> None:
    rng = np.random.default_rng(7)
    rate, exposure, future = 0.01, 2000.0, 500.0  # 20 failures seen, 5 expected ahead
    covered = 0
    for _ in range(2000):
        k = int(rng.poisson(rate * exposure))
        e = est.predictive_count_interval(k, exposure, future, 0.9)
        covered += e.lower <= rng.poisson(rate * future) <= e.upper
    assert 0.88 <= covered / 2000 <= 0.98  # a discrete count: at least the level, not much more
    wide = est.predictive_count_interval(20, 2000.0, 500.0)
    assert wide.value == 5.0 and wide.upper >= est.poisson_interval(5.0)[1]  # the rate's doubt widens it


def test_job_interruption_and_spares() -> None:
    rate = est.rate_interval(100, 10_000.0)  # 0.01 per GPU-day
    one = est.job_interruption(1, 3600.0, rate)
    assert one.value == pytest.approx(-math.expm1(-0.01 / 24)) and one.lower < one.value < one.upper
    big = est.job_interruption(1024, 3600.0, rate)
    assert big.value == pytest.approx(-math.expm1(-1024 * 0.01 / 24))
    # a known rate: each GPU is in repair 0.05 / 1.05 of the time
    mean, pmf = est.in_repair_pmf(1000, 5.0, None, 0.0, 0.01)
    assert mean == pytest.approx(1000 * 0.05 / 1.05)
    assert est.spares_needed(pmf, 0.95) == est.poisson_interval(mean, 0.9)[1]
    _, uncertain = est.in_repair_pmf(1000, 5.0, 100, 10_000.0)
    assert est.spares_needed(uncertain, 0.95) >= est.spares_needed(pmf, 0.95)
    with pytest.raises(ValueError, match="service level"):
        est.spares_needed(pmf, 1.5)


def test_default_turnaround_is_the_simulators_mean_repair_time() -> None:
    from gpuwatch.simulator import faults
    from gpuwatch.simulator.fleet import MODES

    rng = np.random.default_rng(0)
    mix = np.array([faults.MODE_MIX[m] for m in MODES])
    modes = rng.choice(len(MODES), size=200_000, p=mix / mix.sum()).astype(np.int8)
    sampled = faults.sample_repair_s(rng, modes).mean() / DAY
    assert trace_mean_repair_days() == pytest.approx(sampled, rel=0.05)


# ---------------------------------------------------------------- the history


def history(failures: list[Failure], repairs_known: bool = True) -> FailureHistory:
    gpus = tuple((h, g) for h in ("a", "b") for g in range(2))
    return FailureHistory(T0, T0 + 10 * DAY, gpus, tuple(failures), {"a": "h100", "b": "a100"}, repairs_known)


def test_exposure_leaves_out_repairs_inside_the_window() -> None:
    h = history([
        Failure("a", 0, T0 + 2 * DAY, "memory", T0 + 3 * DAY),  # one day down
        Failure("a", 1, T0 - 1 * DAY, "power", T0 + 1 * DAY),  # failed before the window, back after one day
        Failure("b", 0, T0 + 9 * DAY, "thermal", None),  # not back: down to the end
        Failure("b", 1, T0 + 9.5 * DAY, "sudden", T0 + 12 * DAY),  # back after the window ends
    ])  # fmt: skip
    assert h.exposure_gpu_days() == pytest.approx([9.0, 9.0, 9.0, 9.5])
    assert [f.gpu_index for f in h.in_window()] == [0, 0, 1]  # the one before the window is not counted
    assert h.repair_days() == pytest.approx([1.0, 2.5])
    assert history(h.failures, repairs_known=False).exposure_gpu_days() == pytest.approx([10.0] * 4)
    later = h.window(T0 + 5 * DAY, T0 + 10 * DAY)
    assert len(later.in_window()) == 2 and later.days == 5.0


def write_lines(path: Path, records: list[object]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def outcome(i: int, action: str, ts: float) -> dict[str, object]:
    return {"schema": "gpuwatch.outcome/1", "id": f"id{i}", "host": "a", "gpu_index": 1, "uuid": "GPU-x",
            "action": action, "risk": 1.0, "event_ts": ts, "executor": "dry-run", "ok": True, "dry_run": True,
            "detail": "", "started_at": ts, "duration_s": 0.1}  # fmt: skip


def test_history_files_of_labels_and_of_outcomes(tmp_path: Path) -> None:
    gpus = [("a", 0), ("a", 1)]
    labels = write_lines(tmp_path / "labels.jsonl", [
        {"host": "a", "gpu_index": 0, "uuid": "u", "fail_ts": T0 + 100, "mode": "memory", "repair_end_ts": T0 + 200,
         "precursor_start_ts": None},
    ])  # fmt: skip
    h = read_history_file(labels, gpus=gpus, start_ts=T0, end_ts=T0 + DAY)
    assert h.repairs_known and [f.mode for f in h.in_window()] == ["memory"]
    outcomes = write_lines(tmp_path / "outcomes.jsonl", [
        outcome(1, "checkpoint", T0 + 50), outcome(2, "repair", T0 + 60), outcome(2, "repair", T0 + 60),
        {"schema": "gpuwatch.command_ack/1", "id": "z"}, outcome(3, "repair", T0 + 70),
    ])  # fmt: skip
    h = read_history_file(outcomes, gpus=gpus, start_ts=T0, end_ts=T0 + DAY)
    assert not h.repairs_known and [f.fail_ts for f in h.in_window()] == [
        T0 + 60,
        T0 + 70,
    ]  # one per repair id
    assert {f.mode for f in h.failures} == {"unknown"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([b"{not json"], r"bad\.jsonl line 1 is not JSON"),
        ([b"[1, 2]"], "line 1 is not a JSON object"),
        ([b'{"host": "a"}'], "neither a failure label"),
        ([b'{"host": "a", "gpu_index": 0, "fail_ts": "soon"}'], "line 1 is not a failure label"),
        (
            [b'{"host": "a", "gpu_index": 0, "fail_ts": 1.0}', orjson.dumps(outcome(1, "repair", 2.0))],
            "mixes",
        ),
    ],
)
def test_a_bad_history_file_names_the_line_and_the_fix(
    tmp_path: Path, lines: list[bytes], message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(HistoryError, match=message):
        read_history_file(path, gpus=[("a", 0)], start_ts=0.0, end_ts=10.0)


def test_inventory_and_times(tmp_path: Path) -> None:
    inv = tmp_path / "inv.json"
    inv.write_bytes(orjson.dumps({"n1": {"gpus": 2, "model": "h200-sxm"}, "n2": {"gpus": 1}}))
    assert read_inventory(inv) == ((("n1", 0), ("n1", 1), ("n2", 0)), {"n1": "h200-sxm"})
    inv.write_bytes(orjson.dumps({"n1": {"gpus": 0}}))
    with pytest.raises(HistoryError, match="'n1' has no whole number of gpus"):
        read_inventory(inv)
    assert parse_time("2023-11-14T22:13:20Z", "--since") == T0 == parse_time(str(T0), "--since")
    with pytest.raises(HistoryError, match="--since 'yesterday' is neither"):
        parse_time("yesterday", "--since")


def test_simulation_folder_is_a_history_with_its_boards_and_window(tmp_path: Path) -> None:
    from gpuwatch.simulator.fleet import simulate_to_dir

    stats = simulate_to_dir(2, 4, 0.5, tmp_path, seed=3, interval_s=600.0,
                            config_overrides={"rate_scale": 3000, "hardware": {"h200-sxm": 1.0}})  # fmt: skip
    h = read_simulation(tmp_path)
    assert len(h.gpus) == 8 and h.days == pytest.approx(0.5, abs=0.01)
    assert set(h.gpu_model.values()) == {"h200-sxm"}
    assert len(h.in_window()) == stats["failures"] > 0  # precursors still running at the end are not failures
    with pytest.raises(HistoryError, match="meta.json cannot be read"):
        read_simulation(tmp_path / "nowhere")


# ---------------------------------------------------------------- the view


def test_view_from_history_groups_failures_and_learns_the_rate() -> None:
    h = history([
        Failure("a", 0, T0 + 2 * DAY, "memory", T0 + 3 * DAY),
        Failure("a", 1, T0 + 4 * DAY, "memory", T0 + 4.5 * DAY),
        Failure("b", 1, T0 + 5 * DAY, "thermal", T0 + 6 * DAY),
        Failure("zz", 0, T0 + 5 * DAY, "power", None),  # a GPU the fleet does not list: not counted
    ])  # fmt: skip
    view = fleet_view(h, None, FleetOptions(level=0.9, job_gpus=8, long_window_days=7.0))
    exposure = 40.0 - 2.5
    assert view["history"]["failures"] == 3 and view["history"]["failures_outside_fleet"] == 1
    assert view["rate_per_gpu_day"]["value"] == pytest.approx(3 / exposure)
    mt = view["mtbf"]
    assert mt["mode"]["memory"]["failures"] == 2 and mt["mode"]["power"]["failures"] == 0
    assert mt["model"]["h100"]["failures"] == 2 and mt["model"]["a100"]["exposure_gpu_days"] == pytest.approx(
        19.0
    )
    assert mt["host"]["b"]["mtbf_gpu_days"]["value"] == pytest.approx(19.0)
    long = view["forecast"]["long"]
    assert long["source"] == "history" and long["value"] == pytest.approx(
        3 / exposure * 4 * 7 * exposure / 40
    )
    assert view["spares"]["turnaround_source"] == "history"
    assert view["spares"]["turnaround_days"] == pytest.approx(2.5 / 3)
    text = format_view(view)
    assert "Next 7 days:" in text and "by failure mode" in text and "1 more on GPUs outside the fleet" in text


def test_view_from_live_risk_sums_the_risks_of_the_gpus_not_failed() -> None:
    risk = np.array([1e-5] * 98 + [0.5, 1.0])
    live = LiveRisk(tuple(("h", i) for i in range(100)), risk, np.r_[[False] * 99, [True]], np.zeros(100, bool),
                    3600.0)  # fmt: skip
    opts = FleetOptions(base_rate_per_gpu_day=2e-4)
    view = fleet_view(None, live, opts)
    p = est.window_failure_probability(risk[:99], 3600.0, 86400.0, 2e-4)
    short = view["forecast"]["short"]
    assert short["source"] == "risk" and short["value"] == pytest.approx(p.sum())
    assert (short["lower"], short["upper"]) == (0, 1)
    assert view["fleet"] == {"gpus": 100, "failed_now": 1, "stale": 0, "source": "live risk"}
    assert view["rate_per_gpu_day"]["source"] == "setting" and view["mtbf"] == {}
    assert view["riskiest"][0] == {"gpu": "h:98", "p_fail": pytest.approx(p[98])}
    assert view["spares"]["turnaround_source"] == "trace"
    with pytest.raises(ValueError, match="needs a failure history or live risk"):
        fleet_view(None, None, opts)


def test_forecast_check_against_the_simulator_on_one_small_seed() -> None:
    from gpuwatch.apps.bench.forecast import check_seed

    r = check_seed(11, hosts=16, gpus_per_host=8, rate_scale=100.0, history_days=14.0, forecast_days=7.0,
                   level=0.9, service_level=0.95)  # fmt: skip
    # 128 GPUs at ~0.019 per GPU-day (times the seed's host frailties): ~15 failures a week
    assert r["failures_history"] > 10 and r["truth_mean"] > 5
    lo, hi = r["truth_interval"]
    assert r["hit"] == (lo <= r["predicted"] <= hi) and r["covered"] == (
        r["predicted_interval"][0] <= r["actual"] <= r["predicted_interval"][1]
    )
    assert r["hit"] and r["rate_covered"]


# ---------------------------------------------------------------- the command


@pytest.fixture()
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("GPUWATCH_")]:
        monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["fleet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fleet_command_prints_and_writes_the_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_env: None
) -> None:
    from gpuwatch.simulator.fleet import simulate_to_dir

    simulate_to_dir(
        4, 8, 2.0, tmp_path / "sim", seed=5, interval_s=1800.0, config_overrides={"rate_scale": 500}
    )
    code, out, err = run(capsys, "--history", str(tmp_path / "sim"), "--json", str(tmp_path / "v.json"),
                         "--job-gpus", "64")  # fmt: skip
    assert code == 0, err
    view = orjson.loads((tmp_path / "v.json").read_bytes())
    assert view["job"]["gpus"] == 64 and view["history"]["gpus"] == 32
    assert f"Next 7 days: {view['forecast']['long']['value']:.1f} failures expected" in out
    assert "Job of 64 GPUs" in out and "Spares: hold" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "nothing to learn from: give --history"),
        (("--history", "{tmp}/missing.jsonl", "--since", "0"), "cannot read {tmp}/missing.jsonl"),
        (("--history", "{tmp}/h.jsonl"), "is a JSONL file: give --since"),
        (("--history", "{tmp}/h.jsonl", "--since", "0"), "no fleet for {tmp}/h.jsonl: give --inventory"),
        (("--history", "{tmp}", "--service-level", "95"), "--service-level 95 is not between 0 and 1"),
        (("--history", "{tmp}", "--job-gpus", "0"), "--job-gpus 0 must be at least 1"),
        (("--history", "{tmp}", "--serve"), "--serve needs fleet_metrics_port"),
    ],
)
def test_fleet_command_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_env: None, argv: tuple[str, ...], message: str
) -> None:
    (tmp_path / "h.jsonl").write_bytes(b"")
    code, out, err = run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message.format(tmp=tmp_path) in err, err


def test_report_plots_the_fleet_view(tmp_path: Path) -> None:
    import base64
    import re

    from gpuwatch.apps.report import ReportData, render_fleet_report, render_report

    h = history(
        [Failure("a", 0, T0 + 2 * DAY, "memory", T0 + 3 * DAY), Failure("b", 1, T0 + 5 * DAY, "power")]
    )
    live = LiveRisk((("a", 0), ("a", 1)), np.array([1e-5, 0.3]), np.zeros(2, bool), np.zeros(2, bool), 3600.0)
    view = fleet_view(h, live, FleetOptions())
    page = render_fleet_report(view, tmp_path / "fleet.html").read_text()
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 3 and all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    assert "Failures expected" in page and "MTBF per GPU" in page and "Jobs and spares" in page
    no_history = fleet_view(None, live, FleetOptions())  # the demo's case: live risk only, no MTBF plot
    run = render_report(
        ReportData(failed=[], fleet_risk=[0.01], fleet=no_history), tmp_path / "r.html"
    ).read_text()
    assert "Fleet reliability" in run and "MTBF per GPU" not in run
    assert (
        len(re.findall(r"data:image/png;base64,", run)) == 1 + 2
    )  # the fleet score histogram + two fleet plots


def test_run_recorder_keeps_every_gpus_newest_risk_for_the_demos_fleet_view() -> None:
    from gpuwatch.apps.report import RunRecorder
    from gpuwatch.schemas.records import Risk

    def rec(gpu: int, ts: float, risk: float, failed: bool = False) -> Risk:
        return Risk(host="n1", gpu_index=gpu, uuid=f"GPU-{gpu}", ts=ts, risk=risk, horizon_s=1800.0, mode="none",
                    model="m", scored_at=ts, failed=failed)

    recorder = RunRecorder()
    assert recorder.live_risk() is None
    recorder.add_risk([rec(0, T0, 0.2), rec(1, T0, 1e-5)])
    recorder.add_risk([rec(0, T0 + 5, 1.0, failed=True)])
    live = recorder.live_risk()
    assert live is not None and live.gpus == (("n1", 0), ("n1", 1)) and live.horizon_s == 1800.0
    assert live.failed.tolist() == [True, False] and live.risk.tolist() == [1.0, 1e-5]


def test_fleet_learns_from_an_archives_label_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_env: None
) -> None:
    from gpuwatch.simulator.fleet import simulate_to_dir

    stats = simulate_to_dir(
        2, 4, 0.5, tmp_path / "sim", seed=3, interval_s=600.0, config_overrides={"rate_scale": 3000}
    )
    archive = tmp_path / "archive"
    assert main(["archive", "--import", str(tmp_path / "sim"), "--archive", str(archive)]) == 0
    inventory = tmp_path / "inv.json"
    inventory.write_bytes(orjson.dumps({"node-0000": {"gpus": 4, "model": "x"}, "node-0001": {"gpus": 4}}))
    capsys.readouterr()
    code, out, err = run(capsys, "--history", str(archive), "--json", str(tmp_path / "v.json"))
    assert code == 2 and f"no fleet for the archive {archive}: give --inventory" in err
    code, out, err = run(capsys, "--history", str(archive), "--inventory", str(inventory), "--json",
                         str(tmp_path / "v.json"))  # fmt: skip
    assert code == 0, err
    view = orjson.loads((tmp_path / "v.json").read_bytes())
    meta = orjson.loads((tmp_path / "sim" / "meta.json").read_bytes())
    assert view["history"]["source"] == str(archive) and view["history"]["gpus"] == 8
    assert view["history"]["start_ts"] >= meta["start_ts"] and view["history"]["end_ts"] <= meta["end_ts"]
    # the imported labels are the simulation's failures (and precursors still running, which lie after the end)
    labels = [orjson.loads(line) for line in (tmp_path / "sim" / "labels.jsonl").read_bytes().splitlines()]
    h = view["history"]
    inside = [lab for lab in labels if h["start_ts"] <= lab["fail_ts"] < h["end_ts"]]
    assert h["failures"] == len(inside) > 0 and len(inside) <= stats["failures"]
    assert set(view["mtbf"]["model"]) == {"x", "unknown"}
