"""`gpuwatch sink`: the Redis risk sink and the remediation sink in one process, until SIGTERM/SIGINT.

Each sink runs in its own thread with its own consumer group; a signal sets a shared stop event so both
finish their current batch and close cleanly. If either sink dies, the other is stopped too and the
process exits non-zero, so the supervisor (systemd, Kubernetes, compose) restarts the pair.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from gpuwatch.config import ConfigError, Settings
from gpuwatch.metrics import start_metrics_server, zero_counters

from .remediation_sink import run_remediation_sink
from .risk_sink import run_risk_sink

log = logging.getLogger(__name__)


def run_sinks(settings: Settings, *, stop: threading.Event | None = None) -> int:
    """Run both sinks until `stop` is set or SIGTERM/SIGINT arrives; returns the exit code (0 clean, 1 crashed).

    Serves the sinks' Prometheus metrics on `settings.metrics_host`:`settings.sink_metrics_port` when the port is
    not 0. Needs `kafka_bootstrap` and
    `redis_url`. Signal handlers are installed only when called from the main thread.
    """
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise ConfigError("gpuwatch sink needs GPUWATCH_KAFKA_BOOTSTRAP and GPUWATCH_REDIS_URL")
    stop = stop or threading.Event()
    failed = threading.Event()
    zero_counters("sink")
    server = start_metrics_server(settings.sink_metrics_port, settings.metrics_host, "sink")

    def guarded(name: str, target: Callable[..., None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target(settings, stop=stop)
            except Exception:
                log.exception("%s crashed; stopping the other sink", name)
                failed.set()
            finally:
                stop.set()  # one sink alone would leave risk unstored or unacted on

        return run

    threads = [
        threading.Thread(target=guarded("risk sink", run_risk_sink), name="risk-sink"),
        threading.Thread(target=guarded("remediation sink", run_remediation_sink), name="remediation-sink"),
    ]
    previous = _install_signal_handlers(stop)
    try:
        for t in threads:
            t.start()
        log.info("risk sink and remediation sink running (topic %s)", settings.topic_risk)
        while not stop.wait(0.5):
            pass
        for t in threads:
            t.join()
    finally:
        _restore_signal_handlers(previous)
        if server is not None:
            server.shutdown()
    return 1 if failed.is_set() else 0


def _install_signal_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping the sinks", signal.Signals(signum).name)
        stop.set()

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
