"""gpuwatch: predict GPU failures from live NVML telemetry and act before they happen.

Stages live in sub-packages: `gpuwatch.producers` (node agent), `gpuwatch.streams`
(windows, features, scoring), `gpuwatch.sinks` (Redis, remediation policy),
`gpuwatch.controller` (executes remediation), `gpuwatch.training` (train, eval, score)
and `gpuwatch.schemas` (wire contracts). Shared code (settings, embedded stack,
Kafka helpers) sits directly in this package.
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
