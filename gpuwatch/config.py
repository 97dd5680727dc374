"""One typed settings object, read from defaults, a TOML file, then environment variables.

Precedence (last wins): field defaults < config file (``GPUWATCH_CONFIG`` or ``--config``)
< environment variables ``GPUWATCH_<FIELD>`` (upper case). Code receives a ``Settings``
instance; nothing deeper reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpuwatch.pools import Pools, parse_maintenance_windows


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
    kafka_ssl_certfile: str = field(default="", metadata={"doc": "Client certificate (PEM) for TLS client authentication."})
    kafka_ssl_keyfile: str = field(default="", metadata={"doc": "Private key (PEM) of the client certificate."})
    kafka_ssl_key_password: str = field(default="", metadata={"doc": "Password of the client key, if it is encrypted.", "secret": True})

    topic_samples: str = field(default="gpuwatch.samples", metadata={"doc": "Telemetry topic, keyed by host."})
    topic_risk: str = field(default="gpuwatch.risk", metadata={"doc": "Risk records, keyed by host."})
    topic_remediation: str = field(default="gpuwatch.remediation", metadata={"doc": "Remediation events, keyed by host."})
    topic_deadletter: str = field(default="gpuwatch.deadletter", metadata={"doc": "Messages that failed to decode or validate."})
    topic_outcomes: str = field(default="gpuwatch.remediation.outcomes", metadata={"doc": "Outcomes of executed remediations (future training labels), keyed by host."})
    topic_commands: str = field(default="gpuwatch.commands", metadata={"doc": "Signed commands to node agents (checkpoint requests), keyed by host."})
    topic_risk_shadow: str = field(default="gpuwatch.risk.shadow", metadata={"doc": "Risk records of the challenger model (`gpuwatch model shadow`), keyed by host: no sink reads it, so nothing acts on them; `gpuwatch model compare` does."})
    topic_model_control: str = field(default="gpuwatch.model.control", metadata={"doc": "Model lifecycle commands (`gpuwatch model shadow/promote/rollback/stop`), one partition; every stream worker follows it (docs/lifecycle.md)."})
    partitions: int = field(default=8, metadata={"doc": "Partitions for topics gpuwatch creates (bounds stream parallelism)."})
    kafka_delivery_timeout_s: float = field(default=15.0, metadata={"doc": "Stream worker, sinks and controller: a message Kafka has not acknowledged within this long is resent by a fresh producer; the input's offsets wait for it however long the outage lasts."})

    stream_app_id: str = field(default="gpuwatch-stream", metadata={"doc": "Consumer group / faust app id of the stream workers."})
    stream_batch_size: int = field(default=2000, metadata={"doc": "Messages per take() batch."})
    stream_batch_within_s: float = field(default=0.05, metadata={"doc": "Longest wait to fill a batch (part of every sample's latency; a backlog fills batches at once)."})
    rescore_interval_s: float = field(default=5.0, metadata={"doc": "Minimum seconds between two scorings of one GPU (at most 10)."})
    stream_fetch_max_wait_ms: int = field(
        default=50, metadata={"doc": "Longest a stream worker's fetch waits for data (latency floor on quiet topics)."}
    )
    stream_max_sample_age_s: float = field(
        default=604800.0, metadata={"doc": "Snapshots whose ts is older than this versus the worker's clock are dead-lettered as stale; 0 turns the check off."}
    )
    risk_refresh_s: float = field(
        default=10.0, metadata={"doc": "Longest a tracked GPU goes without a risk record (silent GPUs are re-published)."}
    )
    torch_threads: int = field(
        default=1, metadata={"doc": "CPU threads for inference in a stream worker (scale out with processes instead)."}
    )
    stream_stats_interval_s: float = field(
        default=30.0, metadata={"doc": "Seconds between two `STATS {json}` progress lines on a stream worker's stdout (the demo and benchmarks start their workers with 2)."}
    )
    checkpoint_interval_s: float = field(
        default=30.0, metadata={"doc": "Seconds between window checkpoints to the stream's changelog topic."}
    )
    model_path: str = field(default="", metadata={"doc": "Model artifact; empty uses the one shipped in the package."})
    model_registry: str = field(default="", metadata={"doc": "Folder of model artifacts `gpuwatch model shadow` registers and stream workers load challengers and promoted models from (a volume every worker mounts at this path); empty: model lifecycle commands are refused."})
    model_control_poll_s: float = field(default=1.0, metadata={"doc": "Seconds between two reads of topic_model_control by a stream worker (how soon a promote or rollback takes effect)."})
    device: str = field(default="auto", metadata={"doc": "Inference device: auto (CUDA when present), cpu or cuda."})

    fleet_failure_rate_per_gpu_day: float = field(default=1.943e-4, metadata={"doc": "Failures per GPU-day of the fleet gpuwatch runs on (default: the StepFun trace's 1.943e-4); `risk` in risk records is a probability at this base rate."})
    alarm_threshold: float = field(default=0.0, metadata={"doc": "Override of the model's alarm operating point: the calibrated score at which a GPU is in alarm (0: the model artifact's, chosen on validation data; docs/model.md says what an override costs)."})
    alarm_records: int = field(default=0, metadata={"doc": "Override of how many scorings in a row must reach the alarm threshold (0: the model artifact's)."})
    alarm_for_s: float = field(default=-1.0, metadata={"doc": "Override of how many seconds of sample time the score must hold at or above the alarm threshold (-1: the model artifact's; 0: no minimum)."})
    alarm_bridge_s: float = field(default=-1.0, metadata={"doc": "Override of how long (seconds) the score may dip below the alarm threshold without breaking its hold (-1: the model artifact's, or 0 where that is not shorter than an overridden alarm_for_s; 0: no dip; must be shorter than the hold)."})
    migrate_threshold: float = field(default=0.0, metadata={"doc": "Override of the model's drain operating point (migrate, then reboot): its score threshold (0: the model artifact's)."})
    migrate_records: int = field(default=0, metadata={"doc": "Override of how many scorings in a row must reach the drain threshold (0: the model artifact's)."})
    migrate_for_s: float = field(default=-1.0, metadata={"doc": "Override of how many seconds of sample time the score must hold at or above the drain threshold (-1: the model artifact's; 0: no minimum)."})
    migrate_bridge_s: float = field(default=-1.0, metadata={"doc": "Override of how long (seconds) the score may dip below the drain threshold without breaking its hold (as alarm_bridge_s)."})
    stale_after_s: float = field(default=60.0, metadata={"doc": "A GPU with no risk update for this long is stale."})
    policy_episode_gap_s: float = field(default=600.0, metadata={"doc": "A GPU's alarm episode ends after this long without an alarm (the evaluation's episode gap)."})
    policy_checkpoint_grace_s: float = field(default=60.0, metadata={"doc": "Least time between checkpoint and migrate, so jobs can save their state."})
    policy_reboot_after_s: float = field(default=600.0, metadata={"doc": "Reboot when the drain operating point still holds this long after migrate (reboot-fixable modes only)."})
    policy_cooldown_s: float = field(default=3600.0, metadata={"doc": "After acting on a GPU, its next risk episode may not act for this long."})
    policy_max_concurrent_drains: int = field(default=2, metadata={"doc": "Most hosts draining or rebooting at once, fleet-wide (blast radius)."})
    policy_drain_hold_s: float = field(default=3600.0, metadata={"doc": "A drain counts against the limit until its GPU recovers or this long."})
    policy_breaker_share: float = field(default=0.05, metadata={"doc": "Circuit breaker: share of the fleet's hosts that disruptive actions (migrate, reboot, repair) may reach within policy_breaker_window_s; the action that would reach one host more opens the breaker, which holds every disruptive action until `gpuwatch policy reset-breaker` (0 turns it off)."})
    policy_breaker_window_s: float = field(default=3600.0, metadata={"doc": "Circuit breaker: the sliding window (wall clock) over which hosts acted on are counted."})
    policy_breaker_min_hosts: int = field(default=3, metadata={"doc": "Circuit breaker: hosts that may always be acted on within the window, however small the fleet (the limit is the larger of this and policy_breaker_share of the fleet, rounded down)."})
    policy_escalate_after: int = field(default=2, metadata={"doc": "Escalation: a host remediated this many times within policy_escalate_window_s is escalated to a human instead of being remediated again (0 turns it off). A remediation: a migrate, or a repair of a GPU not migrated before; GPUs of the host remediated less than policy_drain_hold_s apart count as one."})
    policy_escalate_window_s: float = field(default=604800.0, metadata={"doc": "Escalation: the window (wall clock) over which a host's remediations are counted (7 days)."})
    policy_max_unhealthy_hosts: int = field(default=20, metadata={"doc": "Incident: above this many unhealthy hosts (a GPU in alarm, or failed within policy_breaker_window_s) the policy takes no action at all until they are fewer again: an incident, not a GPU fault (0 turns it off)."})
    policy_pool_pattern: str = field(default="", metadata={"doc": "Pools: regular expression searched in a host name; its group (or the whole match) names the host's pool, e.g. ^(node-\\d{3})\\d$ for racks of ten simulator hosts. Empty: one pool, fleet; unmatched hosts: pool other."})
    policy_pool_max_drains: int = field(default=0, metadata={"doc": "Pools: most hosts of one pool draining or rebooting at once (0: no per-pool limit; policy_max_concurrent_drains still holds fleet-wide)."})
    policy_maintenance_windows: str = field(default="", metadata={"doc": "Maintenance windows, UTC, separated by ';', each 'DAY HH:MM-HH:MM' (DAY Mon..Sun or daily) or 'YYYY-MM-DDTHH:MMZ/YYYY-MM-DDTHH:MMZ', optionally after 'POOL@' (else fleet-wide): the policy holds disruptive actions on the pool's hosts meanwhile (docs/remediation.md)."})
    policy_throttle_s: float = field(default=0.0, metadata={"doc": "Throttle: how long a throttle lowers a GPU's power limit before the agent restores it; the policy throttles thermal and power alarms first when the cost model favours it (0 turns throttling off: it needs the agent to run as root with agent_throttle_state_file)."})
    policy_throttle_frac: float = field(default=0.7, metadata={"doc": "Throttle: the power limit a throttle sets, as a share of the board's default limit (the agent clamps it to the board's minimum)."})
    policy_throttle_kind: str = field(default="power", metadata={"doc": "Throttle: what a throttle lowers: \"power\" sets the power limit to policy_throttle_frac of the board's default; \"clocks\" locks the SM clock at most policy_throttle_clock_frac of the board's maximum (nvmlDeviceSetGpuLockedClocks: root and a Volta or newer board)."})
    policy_throttle_clock_frac: float = field(default=0.7, metadata={"doc": "Throttle: with policy_throttle_kind \"clocks\", the SM clock ceiling a throttle locks, as a share of the board's maximum graphics clock (the agent clamps it to the board's supported clocks)."})
    policy_throttle_grace_s: float = field(default=300.0, metadata={"doc": "Throttle: checkpoint (and go on down the ladder) when the alarm still holds this long after a throttle."})
    policy_throttle_slowdown: float = field(default=0.15, metadata={"doc": "Cost model: share of the job's throughput lost while one of its GPUs is throttled (a synchronous job runs at its slowest GPU's pace)."})
    policy_job_gpus: int = field(default=1024, metadata={"doc": "Cost model: GPUs of the job a failing GPU takes down (a failure loses work on all of them)."})
    policy_job_checkpoint_interval_s: float = field(default=3600.0, metadata={"doc": "Cost model: how often jobs checkpoint on their own; a failure loses half of it on average."})
    policy_failure_overhead_s: float = field(default=1800.0, metadata={"doc": "Cost model: time an unplanned failure costs the whole job besides lost work (detection, timeouts, requeue, reload)."})
    policy_checkpoint_cost_s: float = field(default=120.0, metadata={"doc": "Cost model: time the whole job pauses to write a checkpoint gpuwatch asked for."})
    policy_migrate_cost_s: float = field(default=600.0, metadata={"doc": "Cost model: time a planned restart of the job elsewhere costs it (from its fresh checkpoint)."})
    policy_drain_cost_gpu_h: float = field(default=32.0, metadata={"doc": "Cost model: GPU-hours a drained node is out of service for inspection (8 GPUs for 4 h), healthy or not."})
    policy_reboot_cost_gpu_h: float = field(default=4.0, metadata={"doc": "Cost model: GPU-hours a node reboot takes out of service (8 GPUs for 30 min)."})
    audit_maxlen: int = field(default=100_000, metadata={"doc": "Approximate length cap of the Redis audit stream gpuwatch:audit."})
    redis_history_len: int = field(default=60, metadata={"doc": "Risk records kept per GPU in gpuwatch:hist:{host}:{gpu}."})
    redis_expire_after_s: float = field(default=86400.0, metadata={"doc": "A GPU's Redis keys vanish this long after its last risk record."})

    controller_executor: str = field(default="dry-run", metadata={"doc": "dry-run, command, webhook, slurm or kubernetes."})
    command_signing_key: str = field(default="", metadata={"doc": "HMAC keys for agent commands, comma-separated, newest first (signs with the first, accepts all: rotation); 16+ characters each.", "secret": True})
    command_ttl_s: float = field(default=300.0, metadata={"doc": "A signed agent command expires this long after it is issued (at most 3600)."})
    controller_timeout_s: float = field(default=120.0, metadata={"doc": "Longest a command, webhook, scontrol or Kubernetes call of an executor may take."})
    controller_command: str = field(default="", metadata={"doc": "Command executor's template, split like a shell line but never run by a shell; placeholders {host} {gpu_index} {action} {id} {uuid} {risk}."})
    controller_webhook_url: str = field(default="", metadata={"doc": "Webhook executor: http(s) URL each remediation event is POSTed to as JSON."})
    controller_webhook_key: str = field(default="", metadata={"doc": "Webhook executor: HMAC key for the X-Gpuwatch-Signature header (empty: unsigned).", "secret": True})
    controller_scontrol: str = field(default="scontrol", metadata={"doc": "Slurm executor: path of scontrol."})
    controller_k8s_api: str = field(default="https://kubernetes.default.svc", metadata={"doc": "Kubernetes executor: API server URL."})
    controller_k8s_token_file: str = field(default="/var/run/secrets/kubernetes.io/serviceaccount/token", metadata={"doc": "Kubernetes executor: file with the bearer token (read on each call, so rotation works)."})
    controller_k8s_ca_file: str = field(default="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt", metadata={"doc": "Kubernetes executor: CA bundle of the API server (system CAs when the file is absent)."})
    controller_k8s_gpu_resource: str = field(default="nvidia.com/gpu", metadata={"doc": "Kubernetes executor: pods requesting this resource are evicted from a drained node."})
    agent_checkpoint_signal: str = field(default="SIGUSR1", metadata={"doc": "Agent: signal sent to the processes on a GPU asked to checkpoint."})
    agent_checkpoint_hook: str = field(default="", metadata={"doc": "Agent: command run instead of signalling (no shell); placeholders {host} {gpu_index} {uuid} {pids} {id}."})
    agent_throttle_state_file: str = field(default="", metadata={"doc": "Agent: file saving a GPU's power limit before a throttle changes it, so it is restored after a restart (empty: the agent refuses throttle commands)."})
    agent_nonce_file: str = field(default="", metadata={"doc": "Agent: file remembering accepted command nonces across restarts (empty: memory only)."})
    controller_claim_ttl_s: float = field(default=604800.0, metadata={"doc": "How long a remediation id stays claimed (the de-duplication window)."})
    controller_lease_s: float = field(default=60.0, metadata={"doc": "A controller renews its claim on the event it is executing every third of this; a claim not renewed for this long (its controller died) is taken over and the event re-run if that is safe."})

    archive_url: str = field(default="", metadata={"doc": "Where `gpuwatch archive` writes Parquet and score, eval, train and label read it: a folder or an fsspec URL (s3://bucket/prefix needs s3fs installed)."})
    archive_flush_interval_s: float = field(default=300.0, metadata={"doc": "Archive: longest rows wait before they are written as files (and their offsets committed); each flush writes a file per table, day, host and Kafka partition."})
    archive_flush_rows: int = field(default=500_000, metadata={"doc": "Archive: rows (GPU-samples and records) held in memory before a flush, whatever the interval."})
    archive_retention_days: int = field(default=0, metadata={"doc": "Archive: day partitions older than this many days (UTC) are deleted, checked hourly; 0 keeps everything."})

    metrics_host: str = field(default="127.0.0.1", metadata={"doc": "Address the Prometheus exporters of `gpuwatch stream`, `sink`, `controller` and `fleet --serve` listen on; 0.0.0.0 (every interface) when Prometheus scrapes from another host or container. The agent has agent_metrics_addr."})
    stream_metrics_port: int = field(default=0, metadata={"doc": "Port of `gpuwatch stream`'s Prometheus exporter (/metrics on metrics_host, the worker's own metrics); 0 turns it off."})
    sink_metrics_port: int = field(default=0, metadata={"doc": "Port of `gpuwatch sink`'s Prometheus exporter, which also serves per-GPU risk; 0 turns it off."})
    controller_metrics_port: int = field(default=0, metadata={"doc": "Port of `gpuwatch controller`'s Prometheus exporter; 0 turns it off."})
    fleet_metrics_port: int = field(default=0, metadata={"doc": "Port of `gpuwatch fleet --serve`'s Prometheus exporter (the fleet reliability view: gpuwatch_fleet_*); 0 turns it off."})
    agent_metrics_port: int = field(default=0, metadata={"doc": "Port of the node agent's Prometheus exporter (spool depth, snapshots sent); 0 turns it off."})
    agent_metrics_addr: str = field(default="0.0.0.0", metadata={"doc": "Agent: address its /metrics and /healthz endpoint listens on."})
    agent_interval_s: float = field(default=1.0, metadata={"doc": "Agent: seconds between two snapshots of the node. The shipped model is validated at up to 60 s; slower sampling makes more false alarms (docs/model.md, 'Sampling intervals')."})
    agent_host: str = field(default="", metadata={"doc": "Agent: node name it publishes as (the message key); empty: the machine's host name. On Kubernetes set it from spec.nodeName."})
    agent_spool_dir: str = field(default="/var/lib/gpuwatch/spool", metadata={"doc": "Agent: directory of the on-disk spool that holds snapshots until Kafka acknowledges them (keep it across restarts)."})
    agent_spool_max_bytes: int = field(default=256 << 20, metadata={"doc": "Agent: spool size limit; when full, the oldest unsent snapshots are dropped and counted (256 MiB holds ~12 h of an 8-GPU node)."})
    agent_spool_fsync: str = field(default="interval", metadata={"doc": "Agent: when the spool is fsynced: always (every snapshot), interval (at most once a second) or never (left to the OS)."})
    agent_delivery_timeout_s: float = field(default=30.0, metadata={"doc": "Agent: a snapshot not acknowledged by Kafka within this long is resent by a fresh producer."})
    agent_flush_timeout_s: float = field(default=10.0, metadata={"doc": "Agent: on SIGTERM, how long to wait for Kafka to acknowledge what is spooled (the rest waits in the spool)."})
    agent_xid_events: bool = field(default=True, metadata={"doc": "Agent: collect XID errors from an NVML event set (every XID between two samples is reported)."})

    def kafka_client_config(self) -> dict[str, str]:
        """confluent-kafka settings for bootstrap and security, passed through unchanged."""
        conf = {"bootstrap.servers": self.kafka_bootstrap, "security.protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username
            conf["sasl.password"] = self.kafka_sasl_password
        if self.kafka_ssl_cafile:
            conf["ssl.ca.location"] = self.kafka_ssl_cafile
        if self.kafka_ssl_certfile:
            conf["ssl.certificate.location"] = self.kafka_ssl_certfile
        if self.kafka_ssl_keyfile:
            conf["ssl.key.location"] = self.kafka_ssl_keyfile
        if self.kafka_ssl_key_password:
            conf["ssl.key.password"] = self.kafka_ssl_key_password
        return conf

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked, safe to log (also a password inside a URL, e.g. redis_url)."""
        out = dataclasses.asdict(self)
        for f in fields(self):
            if f.metadata.get("secret") and out[f.name]:
                out[f.name] = "***"
            elif isinstance(out[f.name], str):
                out[f.name] = redact_url(out[f.name])
        return out

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def redact_url(url: str) -> str:
    """`url` with the secret of its user part masked (``redis://app:***@host:6379/0``; a user part with no
    colon, often a token, becomes ``***``), safe to print."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = userinfo.partition(":")
    masked = f"{user}:***" if colon else "***"
    return f"{scheme}://{masked}@{host}{slash}{path}"


@dataclass(frozen=True)
class Allowed:
    """The values a setting admits besides its type: finite numbers from `lo` to `hi` (an end excluded when it
    is open), or text among `choices`; `why` ends the error message."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    why: str = ""
    parse: Callable[[str], object] | None = None  # text: raises ValueError (saying what is wrong) unless well-formed

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, str | bool):
            return True
        if not math.isfinite(value):
            return False
        lo_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        hi_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return lo_ok and hi_ok

    def describe(self, kind: type) -> str:
        """What to give, e.g. ``an integer >= 1`` or ``a number in (0, 10]``."""
        if self.parse is not None:
            return self.why
        if self.choices:
            return "one of " + ", ".join(self.choices)
        noun = {bool: "true or false", int: "an integer", float: "a number", str: "text"}[kind]
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{noun} in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{noun} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return noun


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


EXECUTORS = ("dry-run", "command", "webhook", "slurm", "kubernetes")
FSYNC_POLICIES = ("always", "interval", "never")
THROTTLE_KINDS = ("power", "clocks")
COMMAND_MAX_TTL_S = 3600.0  # a longer validity would force agents to remember nonces for longer

_ANY = Allowed()
_POSITIVE = Allowed(lo=0, lo_open=True)
_AT_LEAST_0 = Allowed(lo=0)
_PORT = Allowed(lo=0, hi=65535, why="0 turns it off")
_COST = Allowed(lo=0, why="a cost model figure")

# What each setting admits beyond its type (the type is the field's); settings not named take any value of
# their type. The one place these limits live: load_settings and check_settings apply them, and the
# configuration reference (docs/configuration.md) prints them.
ALLOWED: dict[str, Allowed] = {
    "kafka_security_protocol": Allowed(choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")),
    "partitions": Allowed(lo=1),
    "kafka_delivery_timeout_s": _POSITIVE,
    "stream_batch_size": Allowed(lo=1),
    "stream_batch_within_s": _POSITIVE,
    "rescore_interval_s": Allowed(lo=0, hi=10, lo_open=True, why="every GPU is rescored at least every 10 s"),
    "stream_fetch_max_wait_ms": _AT_LEAST_0,
    "stream_max_sample_age_s": Allowed(lo=0, why="0 turns the check off"),
    "risk_refresh_s": _POSITIVE,
    "torch_threads": Allowed(lo=1),
    "stream_stats_interval_s": _POSITIVE,
    "checkpoint_interval_s": _POSITIVE,
    "model_control_poll_s": _POSITIVE,
    "fleet_failure_rate_per_gpu_day": Allowed(lo=0, hi=1, hi_open=True,
                                              why="failures per GPU-day; the StepFun trace's is 1.943e-4"),
    "alarm_threshold": Allowed(lo=0, hi=1, why="a calibrated score; 0 keeps the model's"),
    "alarm_records": Allowed(lo=0, why="scorings in a row; 0 keeps the model's"),
    "alarm_for_s": Allowed(lo=-1, hi=86400, why="seconds; -1 keeps the model's, 0 is no minimum"),
    "alarm_bridge_s": Allowed(lo=-1, hi=86400, why="seconds; -1 keeps the model's, 0 bridges no dip"),
    "migrate_threshold": Allowed(lo=0, hi=1, why="a calibrated score; 0 keeps the model's"),
    "migrate_records": Allowed(lo=0, why="scorings in a row; 0 keeps the model's"),
    "migrate_for_s": Allowed(lo=-1, hi=86400, why="seconds; -1 keeps the model's, 0 is no minimum"),
    "migrate_bridge_s": Allowed(lo=-1, hi=86400, why="seconds; -1 keeps the model's, 0 bridges no dip"),
    "stale_after_s": _POSITIVE,
    "archive_flush_interval_s": _POSITIVE,
    "archive_flush_rows": Allowed(lo=1),
    "archive_retention_days": Allowed(lo=0, why="0 keeps everything"),
    "policy_episode_gap_s": _AT_LEAST_0,
    "policy_checkpoint_grace_s": _AT_LEAST_0,
    "policy_reboot_after_s": _AT_LEAST_0,
    "policy_cooldown_s": _AT_LEAST_0,
    "policy_max_concurrent_drains": Allowed(lo=0, why="0 never drains"),
    "policy_drain_hold_s": _AT_LEAST_0,
    "policy_throttle_s": Allowed(lo=0, hi=604800, why="0 turns throttling off; a command holds at most a week"),
    "policy_throttle_frac": Allowed(lo=0, hi=1, lo_open=True, why="a share of the board's default power limit"),
    "policy_throttle_kind": Allowed(choices=THROTTLE_KINDS),
    "policy_throttle_clock_frac": Allowed(lo=0, hi=1, lo_open=True, why="a share of the board's maximum SM clock"),
    "policy_throttle_grace_s": _AT_LEAST_0,
    "policy_throttle_slowdown": Allowed(lo=0, hi=1, why="a share of the job's throughput"),
    "policy_breaker_share": Allowed(lo=0, hi=1, why="a share of the fleet's hosts; 0 turns the breaker off"),
    "policy_breaker_window_s": _POSITIVE,
    "policy_breaker_min_hosts": Allowed(lo=1),
    "policy_escalate_after": Allowed(lo=0, why="remediations of one host; 0 turns escalation off"),
    "policy_escalate_window_s": _POSITIVE,
    "policy_max_unhealthy_hosts": Allowed(lo=0, why="0 turns it off"),
    "policy_pool_pattern": Allowed(parse=Pools, why="a regular expression with at most one group"),
    "policy_pool_max_drains": Allowed(lo=0, why="0: no per-pool limit"),
    "policy_maintenance_windows": Allowed(parse=parse_maintenance_windows,
                                          why="windows separated by ;, see the meaning"),
    "policy_job_gpus": _COST,
    "policy_job_checkpoint_interval_s": _COST,
    "policy_failure_overhead_s": _COST,
    "policy_checkpoint_cost_s": _COST,
    "policy_migrate_cost_s": _COST,
    "policy_drain_cost_gpu_h": _COST,
    "policy_reboot_cost_gpu_h": _COST,
    "audit_maxlen": Allowed(lo=1),
    "redis_history_len": Allowed(lo=1),
    "redis_expire_after_s": _POSITIVE,
    "controller_executor": Allowed(choices=EXECUTORS),
    "command_ttl_s": Allowed(lo=0, hi=COMMAND_MAX_TTL_S, lo_open=True,
                             why="agents remember nonces for at most this long"),
    "controller_timeout_s": _POSITIVE,
    "controller_claim_ttl_s": _POSITIVE,
    "controller_lease_s": _POSITIVE,
    "stream_metrics_port": _PORT,
    "sink_metrics_port": _PORT,
    "controller_metrics_port": _PORT,
    "fleet_metrics_port": _PORT,
    "agent_metrics_port": _PORT,
    "agent_interval_s": _POSITIVE,
    "agent_spool_max_bytes": Allowed(lo=1 << 20, why="1 MiB"),
    "agent_spool_fsync": Allowed(choices=FSYNC_POLICIES),
    "agent_delivery_timeout_s": _POSITIVE,
    "agent_flush_timeout_s": _AT_LEAST_0,
}
_TYPES = {f.name: type(f.default) for f in fields(Settings)}
_SECRETS = frozenset(f.name for f in fields(Settings) if f.metadata.get("secret"))
# A number with no limit must still be named, so that a new numeric setting gets its range thought about.
assert {n for n, t in _TYPES.items() if t in (int, float)} <= set(ALLOWED), "give every numeric setting its range"

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _shown(value: Any) -> str:
    """`value` as TOML writes it (true, 2.7, "soon")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _typed(kind: type, value: Any, parse: bool) -> Any:
    """`value` as a `kind`, or ValueError. With `parse`, text (an environment variable) is parsed; other values
    must have the type already, except that an integer is a number too: no bool passes as a number, no float
    as an integer, no text as either."""
    if parse and isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError(value)
        return kind(text)  # int("2.7") fails, as it should
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool):
        pass
    elif kind is float and isinstance(value, int | float):
        return float(value)
    elif isinstance(value, kind):
        return value
    raise ValueError(value)


def checked(name: str, value: Any, source: str = "") -> Any:
    """`value` of setting `name` with the setting's type, if its type and `ALLOWED` admit it; else ConfigError
    in one line naming `source` ("config file PATH", "environment", or "" for a value given in code or on
    the command line), the setting, the value (a secret's masked) and what the setting admits."""
    kind = _TYPES[name]
    allowed = ALLOWED.get(name, _ANY)
    try:
        typed = _typed(kind, value, parse=source == "environment")
    except (TypeError, ValueError):
        typed = None
    secret = name in _SECRETS
    if source == "environment":
        where = f"environment variable GPUWATCH_{name.upper()}={'***' if secret else value}"
    else:
        where = f"{source + ': ' if source else 'setting '}{name} = {'***' if secret else _shown(value)}"
    if typed is not None and allowed.admits(typed):
        if allowed.parse is None:
            return typed
        try:
            allowed.parse(typed)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return typed
    why = f" ({allowed.why})" if allowed.why and allowed.parse is None else ""
    raise ConfigError(f"{where}: must be {allowed.describe(kind)}{why}")


def load_settings(
    config_file: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Build Settings from defaults, the TOML file, ``GPUWATCH_*`` variables and explicit overrides.

    Raises ConfigError naming where a value came from (file, variable), the setting and what it allows."""
    env = os.environ if env is None else env
    names = list(_TYPES)
    values: dict[str, Any] = {}
    path = config_file or env.get("GPUWATCH_CONFIG")
    if path:
        for key, value in _read_file(Path(path)).items():
            if key not in names:
                raise ConfigError(f"config file {path}: unknown setting {key!r}; docs/configuration.md lists them")
            values[key] = checked(key, value, f"config file {path}")
    for name in names:
        var = f"GPUWATCH_{name.upper()}"
        if var in env:
            values[name] = checked(name, env[var], "environment")
    for key, value in overrides.items():
        if value is not None:
            values[key] = checked(key, value)
    return Settings(**values)


def _read_file(path: Path) -> dict[str, Any]:
    """The settings table of a TOML file (top level or ``[gpuwatch]``); ConfigError if it cannot be read."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist; give the path of a TOML file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path} is a directory; give the path of a TOML file in it") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc}); give a readable UTF-8 TOML file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    table = data.get("gpuwatch", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [gpuwatch] must be a table of settings")
    return table


def check_settings(settings: Settings) -> None:
    """Raises ConfigError naming the first setting whose value `ALLOWED` (or its type) does not admit."""
    for f in fields(Settings):
        checked(f.name, getattr(settings, f.name))
