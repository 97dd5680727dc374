"""The alert rules and the Prometheus config are valid, and the alert expressions behave as specified.

Uses Debian's `promtool` (package `prometheus`); the unit tests live in deploy/prometheus/tests/.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install -y prometheus)")
    return path


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_alert_rules_are_valid() -> None:
    res = run("check", "rules", PROM / "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_config_is_valid_and_loads_the_rules() -> None:
    res = run("check", "config", PROM / "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "alerts.yml" in res.stdout + res.stderr


def test_alert_expressions_pass_their_unit_tests() -> None:
    res = run("test", "rules", "alerts_test.yml", cwd=PROM / "tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        ("(gpuwatch_gpu_alarm) == 1", "(gpuwatch_gpu_alarm) >= 0"),  # alerts on every GPU, in alarm or not
        ("max by (host, gpu, uuid) (gpuwatch_gpu_alarm)", "gpuwatch_gpu_alarm"),  # one alert per mode and instance
        ("(gpuwatch_gpu_failed) == 1", "(gpuwatch_gpu_failed) == 0"),  # a failed GPU goes unannounced
        # Without the pipeline guard, a stalled pipeline floods one "silent" alert per GPU.
        ("and on () (sum(rate(gpuwatch_risk_records_written_total[5m])) > 0)", ""),
        # Without `or vector(0)`, a sink that never started goes unseen.
        (
            "(sum(rate(gpuwatch_risk_records_written_total[5m])) or vector(0)) == 0",
            "sum(rate(gpuwatch_risk_records_written_total[5m])) == 0",
        ),
        # The guard rails: each alert must fire on the first trip, and on its own guard only.
        ("max(gpuwatch_policy_breaker_open) == 1", "sum(gpuwatch_policy_breaker_open) == 2"),  # both replicas
        ("max(gpuwatch_policy_escalated_hosts) > 0", "max(gpuwatch_policy_escalated_hosts) > 1"),
        ("max(gpuwatch_policy_incident) == 1", "max(gpuwatch_policy_incident) == 0"),
        ('{guard="pool_limit"}', ""),  # any guard's trip would read as a pool limit
        # Slow telemetry alerts once some GPUs are slow, not always.
        ("max(gpuwatch_stream_gpus_sampled_slower_than_validated) > 0",
         "max(gpuwatch_stream_gpus_sampled_slower_than_validated) >= 0"),
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, original: str, broken: str) -> None:
    rules = (PROM / "alerts.yml").read_text()
    assert original in rules
    (tmp_path / "tests").mkdir()
    (tmp_path / "alerts.yml").write_text(rules.replace(original, broken))
    shutil.copy(PROM / "tests" / "alerts_test.yml", tmp_path / "tests" / "alerts_test.yml")
    res = run("test", "rules", "alerts_test.yml", cwd=tmp_path / "tests")
    assert res.returncode != 0, f"the unit tests did not notice {original!r} -> {broken!r}"
