"""The Redis key layout of gpuwatch, in one place (docs/redis.md is the same layout for other languages).

The sinks write it, the controller claims and records outcomes in it, and `RiskClient`, `gpuwatch top` and
schedulers read it; all of them name keys and hash fields through this module.

A GPU is named by its host and index; `member(host, gpu)` (``"node-0003:5"``) is how sorted sets refer
to it; readers split a member at its *last* colon, so host names may contain ``:``. Timestamps are
unix seconds (floats); risks are floats in 0..1. Scripts name keys they build themselves, so this layout
needs a single Redis (or one Redis Cluster shard), not a cluster spread over slots.

Per GPU (expire `expire_after_s` after the last write, so GPUs gone for good disappear):
  ``gpuwatch:gpu:{host}:{gpu}``      hash: host, gpu_index, uuid, risk, mode, model, ts (newest sample the
                                     score used), scored_at, written_at (wall clock of the sink), alarm,
                                     drain, failed ("1" or "0"), op (the alarm operating point), why (a GPU
                                     in alarm: the texts of its `why` reasons, most severe first, joined by
                                     "; "; "" otherwise)
  ``gpuwatch:hist:{host}:{gpu}``     list: the last N risk records (`gpuwatch.risk/1` JSON as the sink read
                                     them, fields it does not know left out), newest first
Per host:
  ``gpuwatch:host:{host}``           hash: host, max_risk, max_gpu, max_mode, gpus (count), alarms (GPUs in
                                     alarm), failed (GPUs failed), oldest_ts, newest_ts (min/max `ts` over the
                                     host's GPUs), written_at
  ``gpuwatch:hostgpus:{host}``       sorted set: member gpu index, score risk (source of the rollup)
Fleet-wide:
  ``gpuwatch:fleet:risk``            sorted set: member ``host:gpu``, score risk
  ``gpuwatch:hosts:risk``            sorted set: member host, score the host's max risk
  ``gpuwatch:lastseen``              sorted set: member ``host:gpu``, score `ts` of its newest record
  ``gpuwatch:fleet:alarm``           sorted set: the GPUs in alarm now, member ``host:gpu``, score `ts`
  ``gpuwatch:fleet:failed``          sorted set: the GPUs that have failed, member ``host:gpu``, score `ts`
Remediation:
  ``gpuwatch:killswitch``            string; while it exists the policy takes no action and the controller
                                     executes none (it records each event due as skipped)
  ``gpuwatch:audit``                 stream (capped): one entry per policy decision, field ``json``
  ``gpuwatch:policy:breaker``        string (JSON) while the circuit breaker is open; deleted by reset-breaker
  ``gpuwatch:policy:disrupted``      sorted set: member host, score wall time of its newest disruptive action
                                     (the breaker's sliding window)
  ``gpuwatch:policy:remediated:{host}`` sorted set: member remediation id, score wall time (escalation window)
  ``gpuwatch:policy:escalations``    hash: host -> JSON of its open escalation to a human
  ``gpuwatch:policy:hosts``          sorted set: member host, score wall time the policy last saw it (the fleet)
  ``gpuwatch:policy:unhealthy``      sorted set: member host, score wall time it was last seen unhealthy
  ``gpuwatch:policy:incident``       string (JSON) while more hosts are unhealthy than the policy acts on
  ``gpuwatch:claim:{id}``            string (SET NX EX): a controller claimed remediation `id`
  ``gpuwatch:outcome:{id}``          hash: how executing remediation `id` went: the fields of its
                                     `gpuwatch.outcome/1` record as text (`outcome_fields`)
"""

from __future__ import annotations

import msgspec

from .records import Outcome, Reason

PREFIX = "gpuwatch:"

GPU_PREFIX = PREFIX + "gpu:"
HIST_PREFIX = PREFIX + "hist:"
HOST_PREFIX = PREFIX + "host:"
HOST_GPUS_PREFIX = PREFIX + "hostgpus:"
FLEET_RISK = PREFIX + "fleet:risk"
HOSTS_RISK = PREFIX + "hosts:risk"
LASTSEEN = PREFIX + "lastseen"
FLEET_ALARM = PREFIX + "fleet:alarm"
FLEET_FAILED = PREFIX + "fleet:failed"
KILLSWITCH = PREFIX + "killswitch"
AUDIT = PREFIX + "audit"
POLICY_BREAKER = PREFIX + "policy:breaker"
POLICY_DISRUPTED = PREFIX + "policy:disrupted"
POLICY_REMEDIATED_PREFIX = PREFIX + "policy:remediated:"
POLICY_ESCALATIONS = PREFIX + "policy:escalations"
POLICY_HOSTS = PREFIX + "policy:hosts"
POLICY_UNHEALTHY = PREFIX + "policy:unhealthy"
POLICY_INCIDENT = PREFIX + "policy:incident"
CLAIM_PREFIX = PREFIX + "claim:"
OUTCOME_PREFIX = PREFIX + "outcome:"


def member(host: str, gpu: int | str) -> str:
    """Sorted-set member naming one GPU: ``"{host}:{gpu}"``."""
    return f"{host}:{gpu}"


def split_member(value: str) -> tuple[str, int]:
    """Inverse of `member`: ``"node-0003:5"`` -> ``("node-0003", 5)`` (splits at the last colon)."""
    host, _, gpu = value.rpartition(":")
    return host, int(gpu)


def gpu_key(host: str, gpu: int | str) -> str:
    """Hash with the newest risk of one GPU."""
    return f"{GPU_PREFIX}{host}:{gpu}"


def hist_key(host: str, gpu: int | str) -> str:
    """List of the GPU's last risk records (JSON), newest first."""
    return f"{HIST_PREFIX}{host}:{gpu}"


def host_key(host: str) -> str:
    """Rollup hash of one host (its riskiest GPU)."""
    return f"{HOST_PREFIX}{host}"


def host_gpus_key(host: str) -> str:
    """Sorted set of the host's GPU indices by risk, from which the rollup is recomputed."""
    return f"{HOST_GPUS_PREFIX}{host}"


def claim_key(remediation_id: str) -> str:
    """String a controller sets with NX before executing remediation `remediation_id`."""
    return f"{CLAIM_PREFIX}{remediation_id}"


def outcome_key(remediation_id: str) -> str:
    """Hash with the outcome of executing remediation `remediation_id`."""
    return f"{OUTCOME_PREFIX}{remediation_id}"


def remediated_key(host: str) -> str:
    """Sorted set of the host's recent remediations (ids), scored by wall time: what escalation counts."""
    return f"{POLICY_REMEDIATED_PREFIX}{host}"


# The fields of the per-GPU and per-host hashes, as the Redis sink writes them (sinks/redis_writer.py).
GPU_FIELDS: tuple[str, ...] = (
    "host",
    "gpu_index",
    "uuid",
    "ts",
    "risk",
    "mode",
    "model",
    "scored_at",
    "written_at",
    "alarm",
    "drain",
    "failed",
    "op",
    "why",
)
WHY_SEPARATOR = "; "
HOST_FIELDS: tuple[str, ...] = (
    "host",
    "max_risk",
    "max_gpu",
    "max_mode",
    "gpus",
    "alarms",
    "failed",
    "oldest_ts",
    "newest_ts",
    "written_at",
)


def why_text(why: list[Reason] | msgspec.UnsetType) -> str:
    """The ``why`` hash field of a risk record: its reasons' texts, most severe first, joined by WHY_SEPARATOR
    ("" when it has none)."""
    return WHY_SEPARATOR.join(r.text for r in why) if isinstance(why, list) else ""


def outcome_fields(outcome: Outcome) -> dict[str, str]:
    """The ``gpuwatch:outcome:{id}`` hash of an outcome: every field of the record (the tag as `schema`) as text,
    booleans as "true" / "false"."""
    return {
        name: ("true" if value else "false") if isinstance(value, bool) else str(value)
        for name, value in msgspec.to_builtins(outcome).items()
    }
