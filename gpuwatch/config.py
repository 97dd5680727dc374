"""One typed settings object, read from defaults, a TOML file, then environment variables.

Precedence (last wins): field defaults < config file (``GPUWATCH_CONFIG`` or ``--config``)
< environment variables ``GPUWATCH_<FIELD>`` (upper case). Code receives a ``Settings``
instance; nothing deeper reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    """Every gpuwatch setting. Field docs are the configuration reference."""

    kafka_bootstrap: str = field(default="", metadata={"doc": "Kafka bootstrap servers; empty starts the embedded broker."})
    redis_url: str = field(default="", metadata={"doc": "Redis URL; empty starts an embedded redis-server."})
    kafka_security_protocol: str = field(default="PLAINTEXT", metadata={"doc": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."})
    kafka_sasl_mechanism: str = field(default="", metadata={"doc": "SASL mechanism, e.g. PLAIN or SCRAM-SHA-512."})
    kafka_sasl_username: str = field(default="", metadata={"doc": "SASL user name."})
    kafka_sasl_password: str = field(default="", metadata={"doc": "SASL password (never logged).", "secret": True})
    kafka_ssl_cafile: str = field(default="", metadata={"doc": "CA bundle for TLS."})

    topic_samples: str = field(default="gpuwatch.samples", metadata={"doc": "Telemetry topic, keyed by host."})
    topic_risk: str = field(default="gpuwatch.risk", metadata={"doc": "Risk records, keyed by host."})
    topic_remediation: str = field(default="gpuwatch.remediation", metadata={"doc": "Remediation events, keyed by host."})
    topic_deadletter: str = field(default="gpuwatch.deadletter", metadata={"doc": "Messages that failed to decode or validate."})
    topic_outcomes: str = field(default="gpuwatch.remediation.outcomes", metadata={"doc": "Outcomes of executed remediations (future training labels), keyed by host."})
    partitions: int = field(default=8, metadata={"doc": "Partitions for topics gpuwatch creates (bounds stream parallelism)."})

    stream_app_id: str = field(default="gpuwatch-stream", metadata={"doc": "Consumer group / faust app id of the stream workers."})
    stream_batch_size: int = field(default=2000, metadata={"doc": "Messages per take() batch."})
    stream_batch_within_s: float = field(default=0.2, metadata={"doc": "Longest wait to fill a batch."})
    rescore_interval_s: float = field(default=5.0, metadata={"doc": "Minimum seconds between two scorings of one GPU (at most 10)."})
    checkpoint_interval_s: float = field(
        default=30.0, metadata={"doc": "Seconds between window checkpoints to the stream's changelog topic."}
    )
    model_path: str = field(default="", metadata={"doc": "Model artifact; empty uses the one shipped in the package."})
    device: str = field(default="auto", metadata={"doc": "Inference device: auto (CUDA when present), cpu or cuda."})

    risk_threshold: float = field(default=0.85, metadata={"doc": "Risk above which the policy starts its for-duration."})
    risk_for_s: float = field(default=300.0, metadata={"doc": "How long risk must stay above threshold before acting."})
    stale_after_s: float = field(default=60.0, metadata={"doc": "A GPU with no risk update for this long is stale."})
    risk_clear_below: float = field(default=0.7, metadata={"doc": "A risk episode ends only when risk drops below this (hysteresis)."})
    policy_migrate_after_s: float = field(default=300.0, metadata={"doc": "Migrate (drain) when risk is still above threshold this long after checkpoint."})
    policy_checkpoint_grace_s: float = field(default=60.0, metadata={"doc": "Least time between checkpoint and migrate, so jobs can save their state."})
    policy_migrate_risk: float = field(default=0.95, metadata={"doc": "Risk at which migrate follows checkpoint after a 60 s grace instead of waiting."})
    policy_reboot_after_s: float = field(default=600.0, metadata={"doc": "Reboot when risk is still above threshold this long after migrate."})
    policy_cooldown_s: float = field(default=3600.0, metadata={"doc": "After acting on a GPU, its next risk episode may not act for this long."})
    policy_max_concurrent_drains: int = field(default=2, metadata={"doc": "Most hosts draining or rebooting at once, fleet-wide (blast radius)."})
    policy_drain_hold_s: float = field(default=3600.0, metadata={"doc": "A drain counts against the limit until its GPU recovers or this long."})
    audit_maxlen: int = field(default=100_000, metadata={"doc": "Approximate length cap of the Redis audit stream gpuwatch:audit."})
    redis_history_len: int = field(default=60, metadata={"doc": "Risk records kept per GPU in gpuwatch:hist:{host}:{gpu}."})
    redis_expire_after_s: float = field(default=86400.0, metadata={"doc": "A GPU's Redis keys vanish this long after its last risk record."})

    controller_executor: str = field(default="dry-run", metadata={"doc": "dry-run, command, webhook, slurm or kubernetes."})
    command_signing_key: str = field(default="", metadata={"doc": "Shared HMAC key for agent commands.", "secret": True})
    controller_claim_ttl_s: float = field(default=604800.0, metadata={"doc": "How long a remediation id stays claimed (the de-duplication window)."})

    stream_metrics_port: int = field(default=0, metadata={"doc": "Port of `gpuwatch stream`'s Prometheus exporter (/metrics on all interfaces); 0 turns it off."})
    sink_metrics_port: int = field(default=0, metadata={"doc": "Port of `gpuwatch sink`'s Prometheus exporter, which also serves per-GPU risk; 0 turns it off."})
    controller_metrics_port: int = field(default=0, metadata={"doc": "Port of `gpuwatch controller`'s Prometheus exporter; 0 turns it off."})

    def kafka_client_config(self) -> dict[str, str]:
        """confluent-kafka settings for bootstrap and security, passed through unchanged."""
        conf = {"bootstrap.servers": self.kafka_bootstrap, "security.protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username
            conf["sasl.password"] = self.kafka_sasl_password
        if self.kafka_ssl_cafile:
            conf["ssl.ca.location"] = self.kafka_ssl_cafile
        return conf

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked, safe to log."""
        out = dataclasses.asdict(self)
        for f in fields(self):
            if f.metadata.get("secret") and out[f.name]:
                out[f.name] = "***"
        return out

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, kind: type, value: Any) -> Any:
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot use {value!r} as {kind.__name__}") from exc


def load_settings(
    config_file: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Build Settings from defaults, the TOML file, ``GPUWATCH_*`` variables and explicit overrides."""
    env = os.environ if env is None else env
    types = {f.name: type(f.default) for f in fields(Settings)}
    values: dict[str, Any] = {}
    path = config_file or env.get("GPUWATCH_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        data = data.get("gpuwatch", data)
        for key, value in data.items():
            if key not in types:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, types[key], value)
    for name, kind in types.items():
        var = f"GPUWATCH_{name.upper()}"
        if var in env:
            values[name] = _coerce(name, kind, env[var])
    for key, value in overrides.items():
        if value is not None:
            values[key] = _coerce(key, types[key], value)
    settings = Settings(**values)
    if not 0 < settings.rescore_interval_s <= 10:
        raise ConfigError("setting 'rescore_interval_s' must be in (0, 10]: every GPU is rescored at least every 10 s")
    return settings
