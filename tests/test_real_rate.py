"""False actions at the real failure rate from a plain healthy run and look-alike-rich runs, and what they make
of the failure-rich evaluation (training/real_rate.py), worked out by hand."""

from __future__ import annotations

import pytest

from gpuwatch.costs import CostModel
from gpuwatch.simulator.lookalikes import LOOKALIKES
from gpuwatch.training.actions import poisson_upper, weighted_poisson_upper
from gpuwatch.training.real_rate import HealthyRun, at_real_rate, false_rates, healthy_specs

COSTS = CostModel()


def test_false_rates_add_each_lookalikes_excess_scaled_by_its_prevalence() -> None:
    plain = HealthyRun(10_000.0, {"checkpoint": 2})
    rich = {"hot": HealthyRun(1_000.0, {"checkpoint": 12, "migrate": 3}), "xid": HealthyRun(1_000.0, {})}
    out = false_rates(plain, rich, {"hot": 0.05, "xid": 0.02})
    ck, mg = out["checkpoint"], out["migrate"]
    # plain 0.2 per 1,000 GPU-days; hot adds 0.05 x (12 - 0.2) per 1,000; xid none (below plain)
    assert ck["per_1000_gpu_days"] == pytest.approx(0.2 + 0.05 * 11.8)
    assert ck["by_lookalike_per_1000_gpu_days"] == pytest.approx({"hot": 0.05 * 11.8, "xid": 0.0})
    assert mg["per_1000_gpu_days"] == pytest.approx(0.05 * 3)
    # The bound, by hand: the weighted sum plain/10,000 + 0.05 hot/1,000 + 0.02 xid/1,000 of the counts 0, 3, 0
    # (nothing subtracted) has mean y = 1.5e-4 and variance v = 3 x (5e-5)^2; the largest weight is 1e-4. Fay-Feuer:
    # a gamma of shape (y + 1e-4)^2 / (v + 1e-8) = 25/7 and scale (v + 1e-8) / (y + 1e-4) = 7e-5, whose 95 %
    # quantile is 7e-5 x 7.137428870968061 (scipy.stats.gamma.ppf(0.95, 25/7)).
    assert mg["per_1000_gpu_days_upper95"] == pytest.approx(1000 * 7e-5 * 7.137428870968061, rel=1e-9)
    # Below the sum of each run's own bound, above the largest single one.
    separate = [poisson_upper(0) / 10_000, 0.05 * poisson_upper(3) / 1_000, 0.02 * poisson_upper(0) / 1_000]
    assert max(separate) < mg["per_1000_gpu_days_upper95"] / 1000 < sum(separate)


def test_the_weighted_bound_of_one_count_is_the_exact_poisson_bound() -> None:
    for count in (0, 1, 2, 5, 17, 60):
        for weight in (1.0, 2.5e-4):
            assert weighted_poisson_upper([(count, weight)]) == pytest.approx(weight * poisson_upper(count), rel=1e-9)
    assert weighted_poisson_upper([]) == 0.0 and weighted_poisson_upper([(0, 0.0)]) == 0.0
    with pytest.raises(ValueError):
        weighted_poisson_upper([(-1, 1.0)])


def test_each_rich_run_is_long_enough_to_weigh_no_more_per_gpu_day_than_the_plain_run() -> None:
    specs = healthy_specs(6_000.0, 400.0, 30.0, seed=1, processes=2)
    plain_days = sum(s.hosts * 8 * s.days for s in specs if s.name.startswith("plain-"))
    assert plain_days == pytest.approx(6_000.0)
    for s in specs:
        if s.name.startswith("rich-"):
            kind = LOOKALIKES[s.name[5:]]
            days = s.hosts * 8 * s.days
            assert days >= 400.0 - 1e-6
            assert kind.weight / days <= 1.0 / plain_days + 1e-12, s.name
    assert LOOKALIKES["power_cap_job"].weight * 6_000.0 > 400.0  # the case that needs a longer run


def test_at_real_rate_scales_per_failure_figures_and_keeps_per_day_costs() -> None:
    report = {
        "failures": 100, "gpu_days": 100.0,
        "value": {"saved_gpu_h": 50_000.0, "true_and_early_action_cost_gpu_h": 5_000.0,
                  "oracle_gpu_h_per_1000_gpu_days_fleet": 900_000.0},
        "actions": {a: {"true": t, "false_by_cause": {"early": e}}
                    for a, t, e in (("checkpoint", 80, 10), ("migrate", 60, 2), ("reboot", 0, 0))},
    }  # fmt: skip
    false = {a: {"per_1000_gpu_days": r, "per_1000_gpu_days_upper95": u}
             for a, r, u in (("checkpoint", 1.0, 2.0), ("migrate", 0.1, 0.3), ("reboot", 0.0, 0.0))}  # fmt: skip
    lam = 2e-4
    out = at_real_rate(report, false, COSTS, lam)
    per_failure = (50_000 - 5_000) / 100
    cost = 1e-3 * COSTS.action_cost("checkpoint", real=False) + 1e-4 * COSTS.action_cost("migrate", real=False)
    assert out["net_gpu_h_per_1000_gpu_days"] == pytest.approx(1000 * (per_failure * lam - cost))
    assert out["oracle_gpu_h_per_1000_gpu_days"] == pytest.approx(1000 * 900 * lam)  # 90,000 GPU-h over 100 failures
    # checkpoint: 0.8 true per failure at 2e-4 failures per GPU-day against 0.1 early per failure and 1e-3 false
    true, wrong = 0.8 * lam, 0.1 * lam + 1e-3
    assert out["precision"]["checkpoint"]["precision"] == pytest.approx(true / (true + wrong))
    assert out["precision"]["checkpoint"]["precision_lower95"] == pytest.approx(true / (true + 0.1 * lam + 2e-3))


def test_healthy_false_counts_actions_no_failure_followed() -> None:
    from gpuwatch.training.real_rate import healthy_false

    run = {
        "gpu_days": 50.0,
        "labels": [{"uuid": "G1", "fail_ts": 10_000.0, "repair_end_ts": 12_000.0}],
        "events": {"lstm": [
            {"action": "checkpoint", "ts": 9_000.0, "uuid": "G1"},  # G1 fails 1,000 s later: real
            {"action": "repair", "ts": 10_005.0, "uuid": "G1"},  # not a prediction
            {"action": "checkpoint", "ts": 11_000.0, "uuid": "G1"},  # G1 is down: not counted as a false alarm here
            {"action": "checkpoint", "ts": 1_000.0, "uuid": "G2"},  # false
            {"action": "migrate", "ts": 1_060.0, "uuid": "G2"},  # false
        ]},
    }  # fmt: skip
    got = healthy_false(run, "lstm")
    assert (got.gpu_days, got.false) == (50.0, {"checkpoint": 1, "migrate": 1})


def test_realrate_combines_saved_runs_with_eval_reports(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from gpuwatch.apps.cli import main
    from gpuwatch.simulator.lookalikes import LOOKALIKES

    runs = [{"name": "plain-0", "gpu_days": 10_000.0, "false": {"lstm": {}, "threshold": {"checkpoint": 500}}}]
    runs += [{"name": f"rich-{k}", "gpu_days": 600.0, "false": {"lstm": {}, "threshold": {"migrate": 60}}}
             for k in LOOKALIKES]  # fmt: skip
    (tmp_path / "runs.json").write_text(json.dumps({"runs": runs}))
    system = {"failures": 10, "gpu_days": 10.0,
              "value": {"saved_gpu_h": 5_000.0, "true_and_early_action_cost_gpu_h": 500.0,
                        "oracle_gpu_h_per_1000_gpu_days_fleet": 1_000_000.0},
              "actions": {a: {"true": 8, "false_by_cause": {"early": 0}} for a in ("checkpoint", "migrate", "reboot")}}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps({"system": {"lstm": system, "threshold": system}}))
    assert main(["realrate", "--runs-from", str(tmp_path / "runs.json"), "--eval", str(tmp_path / "eval.json"),
                 "--json", str(tmp_path / "out.json")]) == 0  # fmt: skip
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["lstm"]["false_actions"]["checkpoint"]["per_1000_gpu_days"] == 0.0
    assert out["threshold"]["false_actions"]["checkpoint"]["plain_per_1000_gpu_days"] == pytest.approx(50.0)
    lstm = out["lstm"]["at_real_rate"]
    assert lstm["net_gpu_h_per_1000_gpu_days"] == pytest.approx(1000 * 450 * 1.943e-4)  # no false actions
    assert out["threshold"]["at_real_rate"]["net_gpu_h_per_1000_gpu_days"] < 0  # 50 false checkpoints per 1,000 days
    assert main(["realrate", "--runs-from", str(tmp_path / "missing.json")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_a_lookalike_that_comes_with_repairs_is_weighted_at_the_real_failure_rate() -> None:
    from gpuwatch.simulator.lookalikes import LOOKALIKES

    x = LOOKALIKES["board_replace"]  # a quarter of repairs; its rich run fails 1,000 times too often
    assert x.needs["rate_scale"] == 1000.0
    assert x.weight == x.prevalence / x.rich_prevalence / 1000.0
    assert LOOKALIKES["hot_gpu"].weight == LOOKALIKES["hot_gpu"].prevalence / LOOKALIKES["hot_gpu"].rich_prevalence


@pytest.mark.parametrize("argv, said", [
    (["--runs-from", "{bad}"], "is not JSON"),
    (["--runs-from", '{"x": 1}'], "holds no healthy runs"),
    (["--runs-from", "[1, 2]"], "holds no healthy runs"),
    (["--eval", '{"x": 1}'], "holds no policy replay"),
    (["--plain-gpu-days", "-5"], "--plain-gpu-days -5 must be above 0"),
    (["--processes", "0"], "--processes 0 must be above 0"),
])  # fmt: skip
def test_realrate_bad_input_is_one_line(tmp_path, capsys, argv: list[str], said: str) -> None:  # type: ignore[no-untyped-def]
    from gpuwatch.apps.cli import main

    if argv[0] in ("--runs-from", "--eval"):
        (tmp_path / "in.json").write_text(argv[1])
        argv = [argv[0], str(tmp_path / "in.json")]
    assert main(["realrate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1
