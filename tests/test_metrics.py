"""The Prometheus metrics: per-GPU collectors, consumer lag from a real broker, the stream's batch metrics."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import orjson
import pytest
from confluent_kafka import TopicPartition
from helpers import scrape
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuwatch import metrics
from gpuwatch.config import Settings
from gpuwatch.embedded import free_port
from gpuwatch.kafka import ensure_topics, make_consumer, make_producer
from gpuwatch.schemas.fields import ACTIONS, FailureMode
from gpuwatch.schemas.records import Risk
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.streams.app import export_batch_metrics
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import Inbound, RiskProcessor


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label items: value} of every sample called `name` in the registry's exposition text."""
    text = generate_latest(registry).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def rec(host: str, gpu: int, ts: float, risk: float, mode: FailureMode = "none") -> Risk:
    return Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts, risk=risk, horizon_s=3600.0, mode=mode,
                model="m", scored_at=ts)


def test_fleet_risk_exports_the_newest_record_per_gpu_with_its_mode() -> None:
    collector = metrics.FleetRiskCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.update([rec("n1", 0, 100.0, 0.2), rec("n1", 1, 100.0, 0.5)])
    # The second record of GPU 1 is older than the one held: it must not replace it.
    collector.update([rec("n1", 0, 105.0, 0.91, "thermal"), rec("n1", 1, 99.0, 0.99, "memory")])

    risk = samples(registry, "gpuwatch_failure_risk")
    assert risk == {
        (("gpu", "0"), ("host", "n1"), ("mode", "thermal"), ("uuid", "GPU-n1-0")): 0.91,
        (("gpu", "1"), ("host", "n1"), ("mode", "none"), ("uuid", "GPU-n1-1")): 0.5,
    }
    seen = samples(registry, "gpuwatch_gpu_last_risk_timestamp_seconds")
    assert seen[(("gpu", "0"), ("host", "n1"), ("uuid", "GPU-n1-0"))] == 105.0


def test_fleet_risk_hides_stale_risk_but_keeps_last_seen_until_forgotten() -> None:
    collector = metrics.FleetRiskCollector(fresh_for_s=0.2, forget_after_s=0.6)
    registry = CollectorRegistry()
    registry.register(collector)
    collector.update([rec("n1", 0, 100.0, 0.97)])
    assert len(samples(registry, "gpuwatch_failure_risk")) == 1
    time.sleep(0.3)
    # A silent GPU (or one another sink instance now owns) must not hold a stale high risk ...
    assert samples(registry, "gpuwatch_failure_risk") == {}
    # ... but its last-seen time stays, so "GPU silent" can fire, until Redis would forget it too.
    assert len(samples(registry, "gpuwatch_gpu_last_risk_timestamp_seconds")) == 1
    time.sleep(0.4)
    assert samples(registry, "gpuwatch_gpu_last_risk_timestamp_seconds") == {}


def exported_at_start(component: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{metric: {labels: value}} of the counters a fresh process of `component` exports before any work."""
    code = (f"from gpuwatch import metrics; metrics.zero_counters({component!r}); "
            "import prometheus_client; print(prometheus_client.generate_latest().decode())")  # fmt: skip
    # -P: the installed package, not the source folder of the same name in the working directory.
    text = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_every_labelled_counter_an_alert_reads_exists_at_zero_from_the_start() -> None:
    # Created on first use it would start at 1, and increase() in GpuwatchRemediationFailed would never see the
    # first failure; deploy/prometheus/tests/alerts_test.yml feeds exactly these series.
    controller = exported_at_start("controller")
    actions = controller["gpuwatch_remediation_actions_total"]
    for action in ACTIONS:
        for outcome in metrics.REMEDIATION_OUTCOMES:
            assert actions[(("action", action), ("outcome", outcome))] == 0.0
    assert controller["gpuwatch_deadletters_total"] == {(("stage", "controller"),): 0.0}
    sink = exported_at_start("sink")
    assert sink["gpuwatch_remediation_events_total"] == {(("action", a),): 0.0 for a in ACTIONS}
    assert sink["gpuwatch_deadletters_total"] == {(("stage", "risk-sink"),): 0.0, (("stage", "risk-sink/redis"),): 0.0}
    assert sink["gpuwatch_risk_records_written_total"] == {(): 0.0}
    assert sink["gpuwatch_policy_trips_total"] == {(("guard", g),): 0.0 for g in metrics.POLICY_GUARDS}
    assert exported_at_start("stream")["gpuwatch_deadletters_total"] == {(("stage", "stream"),): 0.0}


OWN_METRICS = {
    "stream": {"gpuwatch_stream_samples_total", "gpuwatch_stream_samples_rejected_total", "gpuwatch_stream_scored_total",
               "gpuwatch_stream_newest_sample_timestamp_seconds", "gpuwatch_inference_latency_seconds",
               "gpuwatch_stream_gpus_sampled_slower_than_validated",
               "gpuwatch_batch_size_messages", "gpuwatch_batch_duration_seconds", "gpuwatch_consumer_lag_messages",
               "gpuwatch_deadletters_total"},
    "sink": {"gpuwatch_risk_records_written_total", "gpuwatch_remediation_events_total", "gpuwatch_failure_risk",
             "gpuwatch_gpu_alarm", "gpuwatch_gpu_failed", "gpuwatch_gpu_last_risk_timestamp_seconds",
             "gpuwatch_batch_size_messages", "gpuwatch_batch_duration_seconds", "gpuwatch_consumer_lag_messages",
             "gpuwatch_deadletters_total", "gpuwatch_policy_trips_total", "gpuwatch_policy_breaker_open",
             "gpuwatch_policy_incident", "gpuwatch_policy_unhealthy_hosts", "gpuwatch_policy_fleet_hosts",
             "gpuwatch_policy_escalated_hosts"},
    "controller": {"gpuwatch_remediation_actions_total", "gpuwatch_consumer_lag_messages", "gpuwatch_deadletters_total"},
}  # fmt: skip


@pytest.mark.parametrize("component", sorted(OWN_METRICS))
def test_each_component_serves_only_its_own_metrics_on_the_configured_host(component: str) -> None:
    port = free_port()
    server = metrics.start_metrics_server(port, "127.0.0.1", component)
    try:
        assert server.server_address[0] == "127.0.0.1"
        text = scrape(port)
    finally:
        server.shutdown()
        server.server_close()
    served = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE gpuwatch_")}
    others = set().union(*(names for c, names in OWN_METRICS.items() if c != component)) - OWN_METRICS[component]
    assert OWN_METRICS[component] <= served and not served & others, served
    assert "process_cpu_seconds_total" in text  # and the process's own CPU and memory


def test_consumer_lag_is_high_watermark_minus_committed(settings: Settings) -> None:
    topic = settings.topic_samples
    ensure_topics(settings.replace(partitions=1), [topic])
    producer = make_producer(settings)
    for i in range(50):
        producer.produce(topic, value=b"x%d" % i)
    assert producer.flush(10) == 0
    group = f"lag-{topic}"
    consumer = make_consumer(settings, group, **{"enable.auto.commit": False})
    consumer.subscribe([topic])
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < 20 and time.monotonic() < deadline:
        got += [m for m in consumer.consume(20 - len(got), 0.5) if m.error() is None]
    assert len(got) == 20
    consumer.commit(message=got[-1], asynchronous=False)
    # Fetch the rest so the cached high watermark is current, without committing it.
    while len(got) < 50 and time.monotonic() < deadline:
        got += [m for m in consumer.consume(50, 0.5) if m.error() is None]
    try:
        probe = metrics.ConsumerLagProbe(consumer, group)
        probe.update()
        assert (
            REGISTRY.get_sample_value(
                "gpuwatch_consumer_lag_messages", {"group": group, "topic": topic, "partition": "0"}
            )
            == 30
        )
        assert consumer.committed([TopicPartition(topic, 0)])[0].offset == 20
        consumer.unsubscribe()
        while consumer.assignment() and time.monotonic() < deadline:
            consumer.consume(1, 0.2)  # the revocation is applied on the next poll
        probe.update()  # a partition no longer owned is dropped, not left at its last value
        assert (
            REGISTRY.get_sample_value(
                "gpuwatch_consumer_lag_messages", {"group": group, "topic": topic, "partition": "0"}
            )
            is None
        )
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def processor() -> RiskProcessor:
    return RiskProcessor(Scorer(load_artifact(), device="cpu"), rescore_interval_s=5.0)


def test_stream_batch_updates_counters_and_exports_gpu_telemetry(processor: RiskProcessor) -> None:
    sim = FleetSimulator(FleetConfig(hosts=2, gpus_per_host=8, seed=5, start_ts=time.time() - 20))
    before = {
        name: REGISTRY.get_sample_value(name) or 0.0
        for name in (
            "gpuwatch_stream_samples_total",
            "gpuwatch_stream_scored_total",
            "gpuwatch_inference_latency_seconds_count",
        )
    }
    newest = 0.0
    for _ in range(12):
        batch = [Inbound(value, "samples", 0, i) for i, (_host, value) in enumerate(sim.step_json())]
        newest = max([newest, *(orjson.loads(m.value)["ts"] for m in batch)])
        result = processor.process(batch, now=time.time())
        export_batch_metrics(result, len(batch), 0.01)
    after = {name: REGISTRY.get_sample_value(name) or 0.0 for name in before}
    assert after["gpuwatch_stream_samples_total"] - before["gpuwatch_stream_samples_total"] == 12 * 16
    assert after["gpuwatch_stream_scored_total"] > before["gpuwatch_stream_scored_total"]
    assert (
        after["gpuwatch_inference_latency_seconds_count"] > before["gpuwatch_inference_latency_seconds_count"]
    )
    assert REGISTRY.get_sample_value("gpuwatch_stream_newest_sample_timestamp_seconds") == newest

    hosts, gpus, uuids, temp_c, power = processor.telemetry()
    assert len(hosts) == len(uuids) == len(gpus) == 16
    assert ((temp_c > 20) & (temp_c < 110)).all(), temp_c
    assert ((power > 0) & (power < 1.5)).all(), power

    registry = CollectorRegistry()
    registry.register(metrics.GpuTelemetryCollector(processor.telemetry))
    temps = samples(registry, "gpuwatch_gpu_temperature_celsius")
    assert len(temps) == 16
    assert len(samples(registry, "gpuwatch_gpu_power_ratio")) == 16
