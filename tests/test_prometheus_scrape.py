"""A real Prometheus server (Debian's `prometheus`) scrapes the sink's exporter and sees per-GPU risk.

The sinks run as `gpuwatch sink` does (`run_sinks`) against the real broker and redis-server fixtures; risk
records go in through Kafka; Prometheus, on its own free loopback port, scrapes the exporter every second
with the repository's alert rules loaded.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gpuwatch.config import Settings
from gpuwatch.embedded import free_port
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.schemas.codecs import encode_risk
from gpuwatch.schemas.fields import FailureMode
from gpuwatch.schemas.records import Risk
from gpuwatch.sinks.service import run_sinks

ROOT = Path(__file__).resolve().parent.parent


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls `cond` until it is truthy; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except OSError as exc:  # server not listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return orjson.loads(resp.read())


def risk_record(host: str, gpu: int, risk: float, mode: FailureMode) -> Risk:
    now = time.time()
    return Risk(
        host=host,
        gpu_index=gpu,
        uuid=f"GPU-{host}-{gpu}",
        ts=now,
        risk=risk,
        horizon_s=3600.0,
        mode=mode,
        model="test-model",
        scored_at=now,
    )


@pytest.fixture()
def sinks(settings: Settings) -> Iterator[Settings]:
    """`run_sinks` in a thread with its exporter on a free port; stopped (and checked clean) afterwards."""
    settings = settings.replace(sink_metrics_port=free_port())
    ensure_topics(settings, [settings.topic_risk, settings.topic_remediation, settings.topic_deadletter])
    stop = threading.Event()
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(run_sinks(settings, stop=stop)), daemon=True)
    thread.start()
    yield settings
    stop.set()
    thread.join(30)
    assert code == [0], "run_sinks did not stop cleanly"


@pytest.fixture()
def prometheus(tmp_path: Path, sinks: Settings) -> Iterator[str]:
    """Debian's Prometheus on a free loopback port, scraping the sink exporter every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus not found: install Debian's prometheus package (apt-get install -y prometheus)"
        )
    port = free_port()
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n"
        "  - job_name: gpuwatch-sink\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{sinks.sink_metrics_port}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: urllib.request.urlopen(url + "/-/ready", timeout=2).status == 200, 30, "Prometheus ready"
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        if proc.returncode not in (0, -15):
            print((tmp_path / "prometheus.log").read_text()[-3000:])


def query(url: str, promql: str) -> list[dict[str, Any]]:
    answer = http_json(f"{url}/api/v1/query?query={urllib.parse.quote(promql)}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_per_gpu_risk_from_the_sink(
    settings: Settings, sinks: Settings, prometheus: str
) -> None:
    producer = make_producer(sinks)
    records = [
        risk_record("scrape-node-1", 0, 0.12, "none"),
        risk_record("scrape-node-1", 5, 0.93, "thermal"),
    ]
    for r in records:
        producer.produce(sinks.topic_risk, encode_risk(r), key=r.host.encode())
    assert producer.flush(10) == 0

    series = wait_for(
        lambda: len(found := query(prometheus, 'gpuwatch_failure_risk{host="scrape-node-1"}')) == 2 and found,
        60,
        "gpuwatch_failure_risk of both GPUs of scrape-node-1 in Prometheus",
    )
    by_gpu = {s["metric"]["gpu"]: s for s in series}
    assert by_gpu["5"]["metric"]["mode"] == "thermal"
    assert by_gpu["5"]["metric"]["uuid"] == "GPU-scrape-node-1-5"
    assert by_gpu["5"]["metric"]["job"] == "gpuwatch-sink"
    assert float(by_gpu["5"]["value"][1]) == pytest.approx(0.93)
    assert float(by_gpu["0"]["value"][1]) == pytest.approx(0.12)

    # The pipeline counters and the GPU's last-seen time reach Prometheus too, and the rules are loaded.
    written = query(prometheus, "gpuwatch_risk_records_written_total")
    assert written and float(written[0]["value"][1]) >= 2
    seen = query(prometheus, 'gpuwatch_gpu_last_risk_timestamp_seconds{host="scrape-node-1",gpu="5"}')
    assert float(seen[0]["value"][1]) == pytest.approx(records[1].ts)
    groups = http_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
    alerts = {rule["name"] for g in groups for rule in g["rules"]}
    assert {"GpuFailureAlarm", "GpuFailed", "GpuSilent", "GpuwatchPipelineStalled"} <= alerts

    # Every query of the Grafana dashboard is valid PromQL for this server, and the risk panels find data.
    dashboard = orjson.loads((ROOT / "deploy" / "grafana" / "dashboards" / "gpuwatch.json").read_bytes())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for expr in exprs:
        promql = expr.replace("$host", ".*").replace("$__rate_interval", "1m")
        answer = http_json(f"{prometheus}/api/v1/query?query={urllib.parse.quote(promql)}")
        assert answer["status"] == "success", (expr, answer)
    riskiest = next(p for p in dashboard["panels"] if p["title"] == "Riskiest GPUs")["targets"][0]["expr"]
    top = query(prometheus, riskiest.replace("$host", "scrape-node-.*"))
    assert [(s["metric"]["gpu"], s["metric"]["mode"]) for s in top][:1] == [("5", "thermal")]
