"""The node agent (`gpuwatch agent`): sample every interval, spool, publish; flush on SIGTERM.

One `Agent` drives a source (the NVML sampler of this node, or the fleet simulator with `--simulate`)
into a `Publisher` at a fixed cadence. Between ticks it serves Kafka delivery reports. An optional HTTP
endpoint serves `/metrics` (Prometheus) and `/healthz` (JSON; 503 when the loop has stalled).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import KafkaException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpuwatch.config import ConfigError, Settings, checked
from gpuwatch.producers.nvml import NvmlSampler, NvmlUnavailable
from gpuwatch.producers.publisher import Publisher
from gpuwatch.producers.spool import Spool
from gpuwatch.schemas.codecs import EncodeError, encode_snapshot
from gpuwatch.schemas.fields import SAMPLES_SCHEMA

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the agent samples: `tick()` returns (host, encoded `gpuwatch.samples/1` snapshot) pairs."""

    def tick(self) -> list[tuple[str, bytes]]: ...

    def close(self) -> None: ...


class NvmlSource:
    """This node's GPUs through NVML: one validated snapshot per tick, `seq` +1 each tick from 0."""

    def __init__(self, sampler: NvmlSampler, host: str) -> None:
        self.sampler = sampler
        self.host = host
        self.seq = 0
        self.invalid = 0  # snapshots the codec refused (a sampler bug); their seq is skipped, a visible gap

    def tick(self) -> list[tuple[str, bytes]]:
        seq, self.seq = self.seq, self.seq + 1
        ts = time.time()
        gpus = self.sampler.read()
        try:
            raw = encode_snapshot(
                {"schema": SAMPLES_SCHEMA, "host": self.host, "ts": ts, "seq": seq, "gpus": gpus}
            )
        except EncodeError as exc:
            self.invalid += 1
            log.error("snapshot %d not published: %s", seq, exc)
            return []
        return [(self.host, raw)]

    def close(self) -> None:
        self.sampler.close()


class SimulatedSource:
    """A simulated fleet of `hosts` x `gpus_per_host` GPUs stepped once per tick (its clock starts now)."""

    def __init__(self, hosts: int, interval_s: float, *, gpus_per_host: int = 8, seed: int = 0) -> None:
        from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator

        self.sim = FleetSimulator(FleetConfig(hosts=hosts, gpus_per_host=gpus_per_host, seed=seed,
                                              interval_s=interval_s, start_ts=time.time() - interval_s))  # fmt: skip

    def tick(self) -> list[tuple[str, bytes]]:
        return self.sim.step_json()

    def close(self) -> None:
        pass


class Agent:
    """Runs `source` into `publisher` every `interval_s` until `stop` is set, then flushes (see `run`)."""

    def __init__(self, source: Source, publisher: Publisher, *, interval_s: float = 1.0,
                 flush_timeout_s: float = 10.0) -> None:  # fmt: skip
        if interval_s <= 0:
            raise ConfigError(f"setting 'agent_interval_s' must be > 0, got {interval_s}")
        self.source = source
        self.publisher = publisher
        self.interval_s = interval_s
        self.flush_timeout_s = flush_timeout_s
        self.started = time.time()
        self.ticks = 0
        self.snapshots = 0
        self.late_ticks = 0  # intervals skipped because a tick started more than one interval late
        self.last_tick_ts = 0.0
        self.last_tick_s = 0.0
        self.tick_errors = 0  # ticks whose sampling raised (logged)
        self.stop_event = threading.Event()

    def run(self, stop: threading.Event | None = None, *, max_ticks: int | None = None) -> None:
        """Ticks on a fixed cadence until `stop` (default: self.stop_event) is set or `max_ticks` ran,
        then flushes the publisher for up to flush_timeout_s; what Kafka did not acknowledge stays spooled."""
        stop = stop or self.stop_event
        next_t = time.monotonic()
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_t:
                    self.tick()
                    next_t += self.interval_s
                    if next_t <= now:  # a stall (suspend, overload): skip, do not burst
                        skipped = int((now - next_t) // self.interval_s) + 1
                        self.late_ticks += skipped
                        next_t += skipped * self.interval_s
                    if max_ticks is not None and self.ticks >= max_ticks:
                        break
                self.publisher.pump(min(max(next_t - time.monotonic(), 0.0), 0.5))
        finally:
            self.shutdown()

    def tick(self) -> None:
        """Takes one snapshot per host and hands them to the publisher."""
        t0 = time.perf_counter()
        try:
            pairs = self.source.tick()
        except Exception:  # a sampler bug must not stop the agent; the skipped seq shows up as a gap
            self.tick_errors += 1
            log.exception("sampling failed; trying again next interval")
            pairs = []
        for host, raw in pairs:
            self.publisher.publish(host, raw)
        self.publisher.pump(0.0)
        self.ticks += 1
        self.snapshots += len(pairs)
        self.last_tick_ts = time.time()
        self.last_tick_s = time.perf_counter() - t0

    def shutdown(self) -> None:
        """Flushes what is spooled (bounded by flush_timeout_s), closes the source and the spool."""
        done = self.publisher.close(self.flush_timeout_s)
        left = self.publisher.spool.pending
        if done:
            log.info("stopped: every snapshot was acknowledged by Kafka")
        else:
            log.warning("stopped with %d snapshots unacknowledged; they stay in %s for the next start",
                        left, self.publisher.spool.dir)  # fmt: skip
        self.source.close()
        self.publisher.spool.close()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details): healthy while the loop ticks (Kafka being down is not unhealthy: it spools)."""
        now = time.time()
        age = now - self.last_tick_ts if self.ticks else None
        limit = max(3 * self.interval_s, 10.0)
        ok = (now - self.started < limit) if age is None else age < limit
        p = self.publisher
        return ok, {
            "status": "ok" if ok else "stalled",
            "uptime_s": round(now - self.started, 3),
            "last_snapshot_age_s": None if age is None else round(age, 3),
            "snapshots": self.snapshots,
            "sent": p.sent,
            "spool_depth": p.pending,
            "spool_bytes": p.spool.bytes,
            "dropped": p.spool.dropped,
            "broker_up": p.broker_up,
            "last_kafka_error": p.last_error,
            **_nvml_stats(self.source),
        }


def _nvml_stats(source: Source) -> dict[str, Any]:
    if not isinstance(source, NvmlSource):
        return {}
    s = source.sampler
    return {"gpus": s.gpu_count, "gpus_lost": s.lost_count, "nvml_errors": s.errors,
            "xid_events": bool(s.xids is not None and s.xids.available)}  # fmt: skip


class AgentCollector:
    """Prometheus collector reading the agent's counters at scrape time (nothing is updated per sample)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a, p = self.agent, self.agent.publisher

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"gpuwatch_agent_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"gpuwatch_agent_{name}", doc, value=value)

        yield gauge(
            "spool_messages", "Snapshots not yet acknowledged by Kafka (spooled or in flight).", p.pending
        )
        yield counter("snapshots", "Node snapshots taken.", a.snapshots)
        yield counter("snapshots_sent", "Snapshots Kafka acknowledged.", p.sent)
        yield counter(
            "snapshots_dropped", "Snapshots deleted unsent because the spool was full.", p.spool.dropped
        )
        yield counter(
            "snapshots_rejected", "Snapshots the broker refused for good (e.g. too large).", p.rejected
        )
        yield gauge("spool_bytes", "Bytes of the on-disk spool.", p.spool.bytes)
        yield gauge(
            "in_flight_messages", "Snapshots handed to the Kafka producer, not yet acknowledged.", p.in_flight
        )
        yield counter(
            "delivery_failures",
            "Failed Kafka delivery reports (each snapshot is resent).",
            p.delivery_failures,
        )
        yield counter("producer_restarts", "Kafka producers replaced after failures.", p.producer_restarts)
        if p.broker_up is not None:
            yield gauge("broker_up", "1 when the last Kafka report was a delivery, 0 when all brokers are down.",
                        float(p.broker_up))  # fmt: skip
        yield counter("late_ticks", "Sampling intervals skipped because the agent was stalled.", a.late_ticks)
        yield counter(
            "tick_errors", "Ticks whose sampling failed with an unexpected error (logged).", a.tick_errors
        )
        yield gauge("last_snapshot_timestamp_seconds", "Unix time of the last snapshot.", a.last_tick_ts)
        yield gauge("tick_seconds", "Time the last tick took (sampling, encoding, spooling).", a.last_tick_s)
        if isinstance(a.source, NvmlSource):
            s = a.source.sampler
            yield counter(
                "nvml_errors", "Unexpected NVML errors (not NotSupported, not a lost GPU).", s.errors
            )
            yield gauge("gpus", "GPUs NVML reports on this node.", s.gpu_count)
            yield gauge(
                "gpus_lost", "GPUs NVML reports lost (fell off the bus) in the last snapshot.", s.lost_count
            )
            yield counter(
                "snapshots_invalid", "Snapshots the codec refused (not published).", a.source.invalid
            )
            if s.xids is not None:
                yield counter("xid", "XID errors received from the NVML event set.", s.xids.xids)
                yield counter(
                    "xid_dropped", "XIDs dropped because one GPU had too many queued.", s.xids.dropped
                )


class MetricsServer:
    """Serves /metrics and /healthz (agent.health() as JSON) from a thread.

    The registry is the agent's own (its collector plus process CPU and memory), not the global one:
    the agent exports only its metrics, and several agents can run in one process (tests).
    """

    def __init__(self, agent: Agent, port: int, addr: str = "0.0.0.0") -> None:
        self.agent = agent
        self.registry = registry = CollectorRegistry()
        registry.register(AgentCollector(agent))
        ProcessCollector(registry=registry)
        health: Callable[[], tuple[bool, dict[str, Any]]] = agent.health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path in ("/healthz", "/health"):
                    ok, details = health()
                    body, ctype, code = json.dumps(details).encode(), "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b"see /metrics and /healthz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: scrapes are routine
                pass

        try:
            self.httpd = HTTPServer((addr, port), Handler)
        except OSError as exc:
            raise ConfigError(f"setting 'agent_metrics_port': cannot listen on {addr}:{port} ({exc}); "
                              "pick a free port or 0 to turn the endpoint off") from None  # fmt: skip
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="gpuwatch-agent-metrics", daemon=True)  # fmt: skip
        self._thread.start()
        log.info("agent metrics on http://%s:%d/metrics, health on /healthz", addr, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def load_pynvml() -> Any:
    """The installed pynvml module (nvidia-ml-py); NvmlUnavailable with the install hint when missing."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("the NVML sampler needs nvidia-ml-py: pip install 'gpuwatch[nvml]' "
                              "(or run `gpuwatch agent --simulate` for a simulated fleet)") from None  # fmt: skip
    return pynvml


def host_name(settings: Settings) -> str:
    """settings.agent_host, else this machine's host name (short form, as schedulers list nodes)."""
    return settings.agent_host or socket.gethostname().split(".")[0]


def build_agent(settings: Settings, *, simulate_hosts: int = 0, nvml: Any = None) -> Agent:
    """The agent for `settings`: simulated fleet when simulate_hosts > 0, else NVML (`nvml` or pynvml).

    Raises NvmlUnavailable (NVML missing or unusable), SpoolError (spool directory unusable) or ConfigError.
    """
    if not settings.kafka_bootstrap:
        raise ConfigError(
            "gpuwatch agent needs GPUWATCH_KAFKA_BOOTSTRAP (or kafka_bootstrap in the config file)"
        )
    for name in ("agent_spool_fsync", "agent_spool_max_bytes"):  # Settings built in code skip load_settings
        checked(name, getattr(settings, name))
    source: Source
    if simulate_hosts > 0:
        source = SimulatedSource(simulate_hosts, settings.agent_interval_s)
        client_id = f"gpuwatch-agent-sim-{host_name(settings)}"
    else:
        sampler = NvmlSampler(
            nvml if nvml is not None else load_pynvml(), xid_events=settings.agent_xid_events
        )
        source = NvmlSource(sampler, host_name(settings))
        client_id = f"gpuwatch-agent-{source.host}"
    try:
        spool = Spool(Path(settings.agent_spool_dir), max_bytes=settings.agent_spool_max_bytes,
                      fsync=settings.agent_spool_fsync)  # fmt: skip
    except Exception:
        source.close()
        raise
    try:
        publisher = Publisher(
            settings, spool, client_id=client_id, delivery_timeout_s=settings.agent_delivery_timeout_s
        )
    except Exception as exc:  # release NVML and the spool lock first
        spool.close()
        source.close()
        if isinstance(exc, KafkaException):
            raise ConfigError(f"the Kafka client rejects the settings: {exc.args[0].str()}") from None
        raise
    return Agent(
        source,
        publisher,
        interval_s=settings.agent_interval_s,
        flush_timeout_s=settings.agent_flush_timeout_s,
    )


def _start_command_listener(
    settings: Settings, agent: Agent, stop: threading.Event
) -> threading.Thread | None:
    """Signed checkpoint commands for this node (producers/commands.py), when a signing key is set."""
    if not settings.command_signing_key or not isinstance(agent.source, NvmlSource):
        return None
    from gpuwatch.producers.commands import CommandListener

    listener = CommandListener.from_settings(settings, agent.source.host, agent.source.sampler.nvml)

    def run() -> None:
        while not stop.is_set():
            try:
                listener.run(stop)
            except Exception:  # the sampler must keep running whatever the listener hits
                log.exception("command listener failed; restarting it in 30 s")
                stop.wait(30.0)

    thread = threading.Thread(target=run, name="gpuwatch-commands", daemon=True)
    thread.start()
    return thread


def run_agent(settings: Settings, *, simulate_hosts: int = 0, nvml: Any = None) -> int:
    """`gpuwatch agent`: build, serve metrics, run until SIGTERM/SIGINT, flush. Returns the exit code."""
    agent = build_agent(settings, simulate_hosts=simulate_hosts, nvml=nvml)
    stop = agent.stop_event
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = MetricsServer(agent, settings.agent_metrics_port, settings.agent_metrics_addr) \
        if settings.agent_metrics_port else None  # fmt: skip
    listener = _start_command_listener(settings, agent, stop)
    what = f"{simulate_hosts} simulated hosts" if simulate_hosts else f"host {host_name(settings)}"
    log.info("agent for %s: a snapshot every %g s to %s, spool %s", what, agent.interval_s,
             agent.publisher.topic, agent.publisher.spool.dir)  # fmt: skip
    try:
        agent.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.stop()
        if listener is not None:
            listener.join(2.0)
    return 0
