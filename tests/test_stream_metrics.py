"""A real `gpuwatch stream` process serves its Prometheus metrics: throughput, per-GPU telemetry, lag."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuwatch.config import Settings
from gpuwatch.embedded import free_port
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.processes import start_stream_worker
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value)]} from the worker's /metrics ({} while it is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.mark.slow
def test_stream_worker_exports_throughput_gpu_telemetry_and_lag(settings: Settings) -> None:
    port = free_port()
    settings = settings.replace(stream_metrics_port=port, rescore_interval_s=1.0)
    ensure_topics(settings)
    worker = start_stream_worker(settings)
    try:
        sim = FleetSimulator(FleetConfig(hosts=2, gpus_per_host=8, seed=11, start_ts=time.time() - 60))
        producer = make_producer(settings)
        metrics: dict[str, list[tuple[dict[str, str], float]]] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for host, value in sim.step_json():
                producer.produce(settings.topic_samples, value, key=host.encode())
            producer.flush(5)
            metrics = scrape(port)
            lag = [labels for labels, _ in metrics.get("gpuwatch_consumer_lag_messages", [])]
            if lag and len(metrics.get("gpuwatch_gpu_temperature_celsius", [])) == 16:
                break
            time.sleep(0.5)
        assert worker.alive(), "the stream worker died"
        assert metrics, "the stream worker never served /metrics"

        (samples,) = [v for _, v in metrics["gpuwatch_stream_samples_total"]]
        assert samples >= 16
        assert [v for _, v in metrics["gpuwatch_stream_scored_total"]][0] > 0
        assert [v for _, v in metrics["gpuwatch_inference_latency_seconds_count"]][0] > 0
        assert any(
            labels == {"component": "stream"} for labels, _ in metrics["gpuwatch_batch_size_messages_count"]
        )

        temps = metrics["gpuwatch_gpu_temperature_celsius"]
        assert {labels["host"] for labels, _ in temps} == set(sim.hosts)
        assert all(20 < v < 110 for _, v in temps)
        assert len(metrics["gpuwatch_gpu_power_ratio"]) == 16

        lag = metrics["gpuwatch_consumer_lag_messages"]
        assert {labels["group"] for labels, _ in lag} == {settings.stream_app_id}
        assert {labels["topic"] for labels, _ in lag} == {settings.topic_samples}
        assert all(v >= 0 for _, v in lag)
    finally:
        worker.stop()


def test_stream_worker_output_is_plain_text_when_it_is_not_a_terminal(settings: Settings) -> None:
    # As under systemd, Kubernetes or the demo: stdout is a pipe, stderr a file. faust's start-up spinner
    # wrote cursor codes in front of the first STATS line; nothing may carry terminal codes.
    ensure_topics(settings)
    worker = start_stream_worker(settings, "plain-worker", stats_interval_s=0.5)
    assert worker.proc.stdout is not None
    lines: list[bytes] = []
    try:
        while len(lines) < 2:
            line = worker.proc.stdout.readline()
            assert line, "the stream worker closed its stdout"
            lines.append(line)
    finally:
        worker.stop()
    lines += worker.proc.stdout.readlines()  # what it wrote while stopping, too
    assert lines and all(line.startswith(b"STATS {") for line in lines), lines[:3]
    assert b"\x1b" not in b"".join(lines)
    assert b"\x1b" not in worker.log_path.read_bytes()
