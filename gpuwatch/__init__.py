"""gpuwatch: predict GPU failures from live NVML telemetry and act before they happen.

Stages live in sub-packages: `gpuwatch.producers` (node agent), `gpuwatch.streams`
(windows, features, scoring), `gpuwatch.sinks` (Redis, remediation policy),
`gpuwatch.controller` (executes remediation), `gpuwatch.archive` (Parquet archive, labels);
`gpuwatch.schemas` holds the wire contracts. Beside them: `gpuwatch.simulator` (synthetic
fleets), `gpuwatch.training` (train, eval, score: offline replays of the stages) and
`gpuwatch.apps` (the command line, demo, report, fleet view, benchmarks). Code every stage
shares (settings, the Kafka runtime, signing, metrics, the embedded stack) sits directly in
this package; it imports no stage (tests/test_layout.py checks it).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "RiskClient"]


def __getattr__(name: str) -> object:
    # Lazy so that `import gpuwatch` stays cheap for the node agent.
    if name == "RiskClient":
        from gpuwatch.sinks.risk_client import RiskClient

        return RiskClient
    raise AttributeError(name)
