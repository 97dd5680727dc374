"""Every Prometheus metric gpuwatch exports, in one place: names, labels, help text and buckets.

Components import the metric objects from here and update them once per batch, never per GPU-sample.
Per-GPU series (risk, last-seen time, temperature, power) are not set one by one: a collector reads the
component's latest state when Prometheus scrapes. `start_metrics_server(port, host, component)` serves
`/metrics` with that component's metrics only (`COMPONENT_METRICS`), not every metric defined here at 0.
The alert rules (deploy/prometheus/alerts.yml) and the Grafana dashboard use these names. The node agent
exports its own `gpuwatch_agent_*` metrics (spool depth, snapshots sent) from `gpuwatch.producers.agent`;
`gpuwatch fleet --serve` exports the fleet reliability view (`gpuwatch_fleet_*`, component "fleet").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpuwatch.schemas.fields import ACTIONS
from gpuwatch.schemas.records import Risk

log = logging.getLogger(__name__)
disable_created_metrics()  # *_created series only add noise to every dashboard query

BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# -- stream workers ----------------------------------------------------------------------------------
STREAM_SAMPLES = Counter(
    "gpuwatch_stream_samples_total",
    "GPU-samples folded into windows by the stream worker (rate = samples/s).",
)
STREAM_SAMPLES_REJECTED = Counter(
    "gpuwatch_stream_samples_rejected_total", "GPU-samples dead-lettered as duplicate or out of order."
)
STREAM_SCORED = Counter("gpuwatch_stream_scored_total", "GPU scorings by the model (one risk record each).")
STREAM_NEWEST_SAMPLE_TS = Gauge(
    "gpuwatch_stream_newest_sample_timestamp_seconds",
    "Sample time of the newest GPU-sample the worker folded.",
)
STREAM_SLOW_GPUS = Gauge(
    "gpuwatch_stream_gpus_sampled_slower_than_validated",
    "GPUs sampled more slowly than the model was validated at (their alarms are less reliable; docs/model.md).",
)
INFERENCE_LATENCY = Histogram(
    "gpuwatch_inference_latency_seconds",
    "Wall time of one model forward pass over the GPUs of a batch that were due for scoring.",
    buckets=SECONDS_BUCKETS,
)

# -- every Kafka consumer ----------------------------------------------------------------------------
BATCH_SIZE = Histogram(
    "gpuwatch_batch_size_messages",
    "Kafka messages per processed batch.",
    ["component"],
    buckets=BATCH_BUCKETS,
)
BATCH_DURATION = Histogram(
    "gpuwatch_batch_duration_seconds",
    "Wall time to process one batch until its output is durable.",
    ["component"],
    buckets=SECONDS_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "gpuwatch_consumer_lag_messages",
    "High watermark minus committed offset, per partition this process owns (sampled every few seconds).",
    ["group", "topic", "partition"],
)
DEADLETTERS = Counter("gpuwatch_deadletters_total", "Messages sent to the dead-letter topic.", ["stage"])

# -- sinks and controller ----------------------------------------------------------------------------
RISK_RECORDS_WRITTEN = Counter("gpuwatch_risk_records_written_total", "Risk records the sink wrote to Redis.")
REMEDIATION_EVENTS = Counter(
    "gpuwatch_remediation_events_total", "Remediation events the policy published.", ["action"]
)
REMEDIATION_ACTIONS = Counter(
    "gpuwatch_remediation_actions_total",
    "Remediation events the controller handled, by outcome: ok, failed, dry_run, duplicate (already claimed) "
    "or skipped (the kill switch was on).",
    ["action", "outcome"],
)
REMEDIATION_OUTCOMES = ("ok", "failed", "dry_run", "duplicate", "skipped")
# The remediation policy's guard rails whose trips alert (sinks/policy.py, docs/remediation.md).
POLICY_GUARDS = ("breaker", "escalation", "incident", "pool_limit")
POLICY_TRIPS = Counter(
    "gpuwatch_policy_trips_total",
    "Trips of the remediation policy's guard rails, by guard: breaker (it opened), escalation (a host handed to a "
    "human), incident (too many unhealthy hosts), pool_limit (an action held by its pool's limit).",
    ["guard"],
)
POLICY_BREAKER_OPEN = Gauge(
    "gpuwatch_policy_breaker_open",
    "1 while the remediation policy's circuit breaker is open (no disruptive action until an operator resets it).",
)
POLICY_INCIDENT = Gauge(
    "gpuwatch_policy_incident", "1 while more hosts are unhealthy than the policy acts on (it takes no action)."
)
POLICY_UNHEALTHY_HOSTS = Gauge(
    "gpuwatch_policy_unhealthy_hosts", "Hosts with a GPU in alarm or freshly failed, fleet-wide (the incident's count)."
)
POLICY_FLEET_HOSTS = Gauge("gpuwatch_policy_fleet_hosts", "Hosts that sent risk within a day (the breaker's fleet).")
POLICY_ESCALATED_HOSTS = Gauge(
    "gpuwatch_policy_escalated_hosts", "Hosts escalated to a human (remediated too often), waiting for an operator."
)
# -- fleet reliability view (`gpuwatch fleet --serve`, apps/fleet/) ---------------------------------
FLEET_GPUS = Gauge("gpuwatch_fleet_gpus", "GPUs of the fleet view by state: total, failed (now), stale.", ["state"])
FLEET_RATE = Gauge(
    "gpuwatch_fleet_failure_rate_per_gpu_day",
    "Failures per GPU-day the view uses: observed in the history (value and the interval's lower, upper) or the "
    "setting fleet_failure_rate_per_gpu_day without a history.",
    ["estimate"],
)
FLEET_FORECAST = Gauge(
    "gpuwatch_fleet_forecast_failures",
    "Failures expected in the next window (24h: sum of live risks; 7d: observed rate x GPU-days), with the "
    "interval's lower and upper counts.",
    ["window", "estimate"],
)
FLEET_MTBF = Gauge(
    "gpuwatch_fleet_mtbf_gpu_days",
    "Mean GPU-days between failures per group (fleet, mode, model, host) over the history, with its interval.",
    ["group", "name", "estimate"],
)
FLEET_FAILURES = Gauge(
    "gpuwatch_fleet_failures_observed", "Failures in the history window per group (fleet, mode, model, host).",
    ["group", "name"],
)
FLEET_JOB_INTERRUPTION = Gauge(
    "gpuwatch_fleet_job_interruption_ratio",
    "Share of a job's checkpoint intervals that end in a failure of one of its GPUs, by job size, with the interval.",
    ["job_gpus", "estimate"],
)
FLEET_SPARES = Gauge(
    "gpuwatch_fleet_spares_needed", "Spare GPUs that cover every GPU in repair at the view's service level."
)
FLEET_IN_REPAIR = Gauge(
    "gpuwatch_fleet_gpus_in_repair_expected",
    "Mean GPUs in repair at once (each GPU a share rate x turnaround / (1 + rate x turnaround) of the time).",
)
FLEET_UPDATED = Gauge(
    "gpuwatch_fleet_last_update_timestamp_seconds", "When the fleet view was last computed (wall clock)."
)
_FLEET_LABELLED = (FLEET_GPUS, FLEET_RATE, FLEET_FORECAST, FLEET_MTBF, FLEET_FAILURES, FLEET_JOB_INTERRUPTION)
_ESTIMATES = ("value", "lower", "upper")


def export_fleet_view(view: dict[str, Any], now: float) -> None:
    """Set the fleet gauges from a `gpuwatch.apps.fleet.view.fleet_view` result (series of the last view dropped)."""
    for gauge in _FLEET_LABELLED:
        gauge.clear()
    fleet = view["fleet"]
    FLEET_GPUS.labels("total").set(fleet["gpus"])
    if fleet["failed_now"] is not None:  # known from live risk only
        FLEET_GPUS.labels("failed").set(fleet["failed_now"])
        FLEET_GPUS.labels("stale").set(fleet["stale"])
    for e in _ESTIMATES:
        FLEET_RATE.labels(e).set(view["rate_per_gpu_day"][e])
    short, long = view["forecast"]["short"], view["forecast"]["long"]
    for window, f in ((f"{short['hours']:g}h", short), (f"{long['days']:g}d", long)):
        for e in _ESTIMATES:
            FLEET_FORECAST.labels(window, e).set(f[e])
    hist = view.get("history")
    if hist:
        FLEET_FAILURES.labels("fleet", "fleet").set(hist["failures"])
        for group, members in view["mtbf"].items():
            for name, g in members.items():
                FLEET_FAILURES.labels(group, name).set(g["failures"])
                for e in _ESTIMATES if "mtbf_gpu_days" in g else ():
                    FLEET_MTBF.labels(group, name, e).set(g["mtbf_gpu_days"][e])
        rate = view["rate_per_gpu_day"]
        for e, r in (("value", rate["value"]), ("lower", rate["upper"]), ("upper", rate["lower"])):
            FLEET_MTBF.labels("fleet", "fleet", e).set(1.0 / r if r > 0 else float("inf"))
    for point in view["job"]["curve"]:
        for e in _ESTIMATES:
            FLEET_JOB_INTERRUPTION.labels(str(point["gpus"]), e).set(point[e])
    FLEET_SPARES.set(view["spares"]["spares"])
    FLEET_IN_REPAIR.set(view["spares"]["mean_in_repair"])
    FLEET_UPDATED.set(now)


# The dead-letter stages of each component (the `stage` label of gpuwatch_deadletters_total).
DEADLETTER_STAGES = {"stream": ("stream",), "sink": ("risk-sink", "risk-sink/redis"), "controller": ("controller",)}


def zero_counters(component: str) -> None:
    """Create every labelled counter series `component` (stream, sink or controller) can increment, at 0.

    A labelled series otherwise appears only on its first increment, already at 1, and `increase()` in an
    alert rule sees no change: the first failed remediation or dead letter would never alert.
    """
    for stage in DEADLETTER_STAGES[component]:
        DEADLETTERS.labels(stage)
    if component == "sink":
        for action in ACTIONS:
            REMEDIATION_EVENTS.labels(action)
        for guard in POLICY_GUARDS:
            POLICY_TRIPS.labels(guard)
    elif component == "controller":
        for action in ACTIONS:
            for outcome in REMEDIATION_OUTCOMES:
                REMEDIATION_ACTIONS.labels(action, outcome)


def export_policy_guards(
    *, breaker_open: bool, incident: bool, fleet_hosts: int, unhealthy_hosts: int, escalated_hosts: int
) -> None:
    """Set the policy's guard rail gauges from its view of the shared state (once per batch)."""
    POLICY_BREAKER_OPEN.set(float(breaker_open))
    POLICY_INCIDENT.set(float(incident))
    POLICY_FLEET_HOSTS.set(fleet_hosts)
    POLICY_UNHEALTHY_HOSTS.set(unhealthy_hosts)
    POLICY_ESCALATED_HOSTS.set(escalated_hosts)


def start_metrics_server(port: int, host: str, component: str) -> Any:
    """Serve `component`'s metrics (stream, sink, controller or fleet) on http://host:port/metrics from a daemon thread;
    port 0 does nothing (returns None).

    Returns the server (call `.shutdown()` to stop it early). Raises OSError naming the port if it is taken.
    """
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=component_registry(component))
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on {host}:{port} ({exc}); pick a free port or 0 to turn it off"
        ) from exc
    log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
    return server


class ConsumerLagProbe:
    """Exports `gpuwatch_consumer_lag_messages` for a confluent-kafka consumer every `interval_s`.

    Call `maybe_update()` from the thread that polls the consumer (it is not thread-safe); it does nothing
    until the interval has passed. Lag = high watermark (cached from fetch responses, queried when missing)
    minus the group's committed offset; partitions no longer assigned are dropped.
    """

    def __init__(self, consumer: Any, group: str, interval_s: float = 10.0) -> None:
        self.consumer = consumer
        self.group = group
        self.interval_s = interval_s
        self._next = time.monotonic() + min(interval_s, 2.0)
        self._exported: set[tuple[str, str]] = set()

    def maybe_update(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval_s
        try:
            self.update()
        except Exception as exc:  # a metrics probe must never stop the consumer loop
            log.debug("consumer lag probe failed: %s", exc)

    def update(self) -> None:
        assigned = self.consumer.assignment()
        lags: dict[tuple[str, str], int] = {}
        if assigned:
            for tp in self.consumer.committed(assigned, timeout=2.0):
                if tp.offset < 0:  # nothing committed yet: lag unknown, not zero
                    continue
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    _low, high = self.consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)
                lags[(tp.topic, str(tp.partition))] = max(0, high - tp.offset)
        set_consumer_lag(self.group, lags, self._exported)
        self._exported = set(lags)


def set_consumer_lag(group: str, lags: dict[tuple[str, str], int], previous: set[tuple[str, str]]) -> None:
    """Set the lag gauge of `group` for each (topic, partition) and drop those in `previous` not in `lags`."""
    for (topic, partition), lag in lags.items():
        CONSUMER_LAG.labels(group, topic, partition).set(lag)
    for topic, partition in previous - set(lags):
        try:
            CONSUMER_LAG.remove(group, topic, partition)
        except KeyError:
            pass


@dataclass(slots=True)
class _GpuRisk:
    uuid: str
    mode: str
    risk: float
    ts: float
    received: float  # monotonic time of the record's arrival here
    alarm: bool = False
    failed: bool = False
    op: str = ""
    why: tuple[tuple[str, str, float], ...] = ()  # (signal, text, severity) of a GPU in alarm


class FleetRiskCollector(Collector):
    """Per-GPU `gpuwatch_failure_risk{host,gpu,uuid,mode}`, `gpuwatch_gpu_alarm{host,gpu,uuid,mode,op}` (1 while
    the model's operating point holds: what the alerts and the policy act on), `gpuwatch_gpu_failed{host,gpu,uuid}`
    and `gpuwatch_gpu_last_risk_timestamp_seconds`. A failed GPU has no risk series: it is not a prediction.
    A GPU in alarm whose record says why (`Risk.why`) also has `gpuwatch_gpu_alarm_reason{host,gpu,uuid,rank,signal,
    reason}` = the reason's severity, one series per reason (at most 3 per GPU in alarm; `reason` is the text, so
    the series change as its numbers do: only the few GPUs in alarm have them).

    The sink calls `update(records)` once per batch; a scrape reads the newest record per GPU. Risk is
    exported only while fresh (received within `fresh_for_s`), so a GPU that went silent or moved to another
    sink instance after a rebalance never holds a stale value; its last-seen time stays until `forget_after_s`
    so "GPU silent" alerts can fire (query with `max by (host, gpu)` across sink instances).
    """

    def __init__(self, fresh_for_s: float = 60.0, forget_after_s: float = 86400.0) -> None:
        self.fresh_for_s = fresh_for_s
        self.forget_after_s = forget_after_s
        self._latest: dict[tuple[str, int], _GpuRisk] = {}
        self._lock = threading.Lock()

    def configure(self, *, fresh_for_s: float, forget_after_s: float) -> None:
        """Set how long risk stays exported and how long a silent GPU stays known."""
        self.fresh_for_s, self.forget_after_s = fresh_for_s, forget_after_s

    def update(self, records: Iterable[Risk]) -> None:
        """Remember the newest risk record per (host, gpu_index) from one batch of decoded records."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            latest = self._latest
            for r in records:
                key = (r.host, r.gpu_index)
                ts = min(r.ts, wall)  # a ts from a fast node clock would hide a silent GPU, as in Redis
                old = latest.get(key)
                if old is None or ts >= old.ts:
                    why = tuple((w.signal, w.text, w.severity) for w in r.why) if isinstance(r.why, list) else ()
                    latest[key] = _GpuRisk(r.uuid, r.mode, r.risk, ts, now, r.alarm, r.failed, r.op, why)

    def clear(self) -> None:
        with self._lock:
            self._latest.clear()

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        risk = GaugeMetricFamily(
            "gpuwatch_failure_risk",
            "Calibrated probability that the GPU fails within the model's horizon, with the likeliest mode.",
            labels=["host", "gpu", "uuid", "mode"],
        )
        alarm = GaugeMetricFamily(
            "gpuwatch_gpu_alarm",
            "1 while the GPU is in alarm at the model's operating point (op), else 0.",
            labels=["host", "gpu", "uuid", "mode", "op"],
        )
        failed = GaugeMetricFamily(
            "gpuwatch_gpu_failed", "1 once the GPU has failed (lost, a fatal XID, a row-remap failure), else 0.",
            labels=["host", "gpu", "uuid"],
        )
        seen = GaugeMetricFamily(
            "gpuwatch_gpu_last_risk_timestamp_seconds",
            "Sample time of the GPU's newest risk record (a GPU silent for long has an old value).",
            labels=["host", "gpu", "uuid"],
        )
        reason = GaugeMetricFamily(
            "gpuwatch_gpu_alarm_reason",
            "Why a GPU in alarm is at risk: one series per reason (rank 1 first), the text in `reason`; value is the "
            "reason's severity (1 = clearly abnormal).",
            labels=["host", "gpu", "uuid", "rank", "signal", "reason"],
        )
        with self._lock:
            for key in [k for k, v in self._latest.items() if now - v.received > self.forget_after_s]:
                del self._latest[key]
            items = list(self._latest.items())
        for (host, gpu), v in items:
            if now - v.received <= self.fresh_for_s:
                if not v.failed:
                    risk.add_metric([host, str(gpu), v.uuid, v.mode], v.risk)
                alarm.add_metric([host, str(gpu), v.uuid, v.mode, v.op], float(v.alarm))
                if v.alarm:
                    for rank, (signal, text, severity) in enumerate(v.why, 1):
                        reason.add_metric([host, str(gpu), v.uuid, str(rank), signal, text], severity)
                failed.add_metric([host, str(gpu), v.uuid], float(v.failed))
            seen.add_metric([host, str(gpu), v.uuid], v.ts)
        yield risk
        yield alarm
        yield reason
        yield failed
        yield seen

    def describe(self) -> Iterable[Metric]:
        return []  # collected on demand: no fixed set of series to describe at registration


TelemetryFetch = Callable[[], tuple[Sequence[str], np.ndarray, Sequence[str], np.ndarray, np.ndarray]]


class GpuTelemetryCollector(Collector):
    """Per-GPU `gpuwatch_gpu_temperature_celsius` and `gpuwatch_gpu_power_ratio` read from a stream worker's
    windows at scrape time. `fetch()` returns (hosts, gpu_index, uuids, temp_c, power_ratio) of the fresh GPUs
    the worker owns; NaN values (unsupported by the GPU) are left out."""

    def __init__(self, fetch: TelemetryFetch) -> None:
        self.fetch = fetch

    def collect(self) -> Iterator[Metric]:
        temp = GaugeMetricFamily(
            "gpuwatch_gpu_temperature_celsius",
            "GPU temperature from the newest sample.",
            labels=["host", "gpu", "uuid"],
        )
        power = GaugeMetricFamily(
            "gpuwatch_gpu_power_ratio",
            "GPU power draw over its power limit from the newest sample (1 = at the limit).",
            labels=["host", "gpu", "uuid"],
        )
        try:
            hosts, gpus, uuids, temp_c, power_ratio = self.fetch()
        except Exception as exc:  # a scrape must not fail because the worker is mid-rebalance
            log.debug("telemetry collection skipped: %s", exc)
            hosts, gpus, uuids, temp_c, power_ratio = [], np.zeros(0), [], np.zeros(0), np.zeros(0)
        for host, gpu, uuid, t, p in zip(hosts, gpus.tolist(), uuids, temp_c.tolist(), power_ratio.tolist()):
            labels = [host, str(gpu), uuid]
            if t == t:
                temp.add_metric(labels, t)
            if p == p:
                power.add_metric(labels, p)
        yield temp
        yield power

    def describe(self) -> Iterable[Metric]:
        return []


class _CurrentTelemetry(Collector):
    """The per-GPU telemetry of the source `register_gpu_telemetry` set last (none before it is called)."""

    def __init__(self) -> None:
        self.current: GpuTelemetryCollector | None = None

    def collect(self) -> Iterable[Metric]:
        current = self.current
        return current.collect() if current is not None else ()

    def describe(self) -> Iterable[Metric]:
        return []


FLEET_RISK = FleetRiskCollector()
REGISTRY.register(FLEET_RISK)
GPU_TELEMETRY = _CurrentTelemetry()
REGISTRY.register(GPU_TELEMETRY)


def register_gpu_telemetry(fetch: TelemetryFetch) -> None:
    """Export per-GPU temperature and power from `fetch` (one source per process; a second call replaces it)."""
    GPU_TELEMETRY.current = GpuTelemetryCollector(fetch)


# What each component's /metrics serves: the metrics it updates, and the process's CPU, memory and GC. Every
# metric is also in prometheus_client's global REGISTRY (tests read it), which is never served.
_CONSUMER_METRICS: tuple[Collector, ...] = (BATCH_SIZE, BATCH_DURATION, CONSUMER_LAG, DEADLETTERS)
COMPONENT_METRICS: dict[str, tuple[Collector, ...]] = {
    "stream": (*_CONSUMER_METRICS, STREAM_SAMPLES, STREAM_SAMPLES_REJECTED, STREAM_SCORED, STREAM_NEWEST_SAMPLE_TS,
               STREAM_SLOW_GPUS, INFERENCE_LATENCY, GPU_TELEMETRY),
    "sink": (*_CONSUMER_METRICS, RISK_RECORDS_WRITTEN, REMEDIATION_EVENTS, FLEET_RISK, POLICY_TRIPS,
             POLICY_BREAKER_OPEN, POLICY_INCIDENT, POLICY_UNHEALTHY_HOSTS, POLICY_FLEET_HOSTS, POLICY_ESCALATED_HOSTS),
    "controller": (CONSUMER_LAG, DEADLETTERS, REMEDIATION_ACTIONS),
    "fleet": (*_FLEET_LABELLED, FLEET_SPARES, FLEET_IN_REPAIR, FLEET_UPDATED),
}  # fmt: skip


def component_registry(component: str) -> CollectorRegistry:
    """A registry with `component`'s metrics (COMPONENT_METRICS) and the process collectors, for its /metrics."""
    registry = CollectorRegistry()
    for collector in (*COMPONENT_METRICS[component], PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry
