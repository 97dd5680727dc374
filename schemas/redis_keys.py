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
  ``gpuwatch:claim:{id}``            string (SET NX PX): JSON of the controller's claim on remediation `id`
                                     (`ClaimInfo`: owner, attempt, claimed_at, lease_until, done)
  ``gpuwatch:outcome:{id}``          hash: how executing remediation `id` went: the fields of its
                                     `gpuwatch.outcome/1` record as text (`outcome_fields`)

Readers decode the hashes into typed records (records.py): `decode_gpu_hash` -> `GpuRisk`, `decode_host_hash` ->
`HostRisk`; the claim's value is `ClaimInfo`, written by `encode_claim` and read by `decode_claim`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import msgspec
import msgspec.inspect as mi

from .records import ClaimInfo, GpuRisk, HostRisk, Outcome, Reason

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


# ---------------------------------------------------------------- reading the hashes


def text(value: Any) -> str:
    """A Redis reply as text, from either `decode_responses` setting."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def number(value: Any) -> float | None:
    """A finite number stored as text, or None when it is missing or unreadable."""
    try:
        x = float(text(value)) if value is not None else math.nan
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def count(value: Any) -> int:
    """A whole count stored as text (0 when missing or unreadable)."""
    x = number(value)
    return int(x) if x is not None else 0


def is_stale(ts: float | None, now: float, stale_after_s: float) -> bool:
    """Whether data whose newest sample is from `ts` is stale at `now`: unknown (None) is never fresh."""
    return ts is None or now - ts > stale_after_s


def decode_gpu_hash(raw: Mapping[Any, Any], host: str, gpu: int, *, now: float, stale_after_s: float) -> GpuRisk | None:
    """The `GpuRisk` of the hash ``gpuwatch:gpu:{host}:{gpu}`` as HGETALL returned it (None for an empty one: Redis
    knows nothing of the GPU), with its age and staleness at `now`."""
    if not raw:
        return None
    f = {text(key): text(val) for key, val in raw.items()}
    ts = number(f.get("ts"))
    why = f.get("why")
    return GpuRisk(
        host=f.get("host", host), gpu_index=gpu, uuid=f.get("uuid", ""), risk=number(f.get("risk")),
        mode=f.get("mode", ""), model=f.get("model", ""), ts=ts, scored_at=number(f.get("scored_at")),
        written_at=number(f.get("written_at")), alarm=f.get("alarm") == "1", drain=f.get("drain") == "1",
        failed=f.get("failed") == "1", op=f.get("op", ""), why=why.split(WHY_SEPARATOR) if why else [],
        age_s=None if ts is None else now - ts, stale=is_stale(ts, now, stale_after_s),
    )  # fmt: skip


def decode_host_hash(raw: Mapping[Any, Any], host: str, *, now: float, stale_after_s: float) -> HostRisk | None:
    """The `HostRisk` of the hash ``gpuwatch:host:{host}`` as HGETALL returned it (None for an empty one), stale
    when its least recently reported GPU is (a silent GPU makes its host not-known-healthy)."""
    if not raw:
        return None
    f = {text(key): text(val) for key, val in raw.items()}
    oldest = number(f.get("oldest_ts"))
    max_gpu = number(f.get("max_gpu"))
    return HostRisk(
        host=f.get("host", host), max_risk=number(f.get("max_risk")), max_gpu=None if max_gpu is None else int(max_gpu),
        max_mode=f.get("max_mode", ""), gpus=count(f.get("gpus")), alarms=count(f.get("alarms")),
        failed=count(f.get("failed")), oldest_ts=oldest, newest_ts=number(f.get("newest_ts")),
        written_at=number(f.get("written_at")), stale=is_stale(oldest, now, stale_after_s),
    )  # fmt: skip


# ---------------------------------------------------------------- the claim


class CorruptClaim(ValueError):
    """A claim in Redis that cannot be read; the message names the key and the field."""


_CLAIM_DECODER = msgspec.json.Decoder(ClaimInfo)
_NOUNS: dict[type, str] = {mi.IntType: "a whole number", mi.FloatType: "a number", mi.BoolType: "true or false",
                          mi.StrType: "text"}


def _kind(t: Any) -> type:
    t = t.type if isinstance(t, mi.Metadata) else t
    if isinstance(t, mi.UnionType):
        (t,) = (x for x in t.types if not isinstance(x, mi.NoneType))
        t = t.type if isinstance(t, mi.Metadata) else t
    return type(t)


_CLAIM_FIELDS = tuple((f.encode_name, _kind(f.type)) for f in mi.type_info(ClaimInfo).fields)  # type: ignore[attr-defined]


def _claim_field(key: str, name: str, kind: type, value: Any) -> Any:
    """`value` if it is of the field's kind (an int is a number too, a bool neither)."""
    if kind is mi.FloatType:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif kind is mi.IntType:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is mi.BoolType:
        if isinstance(value, bool):
            return value
    elif isinstance(value, str):
        return value
    raise CorruptClaim(f"claim {key} in Redis is unreadable: {name} is {json.dumps(value)}, not {_NOUNS[kind]}")


def encode_claim(claim: ClaimInfo) -> str:
    """The value of ``gpuwatch:claim:{id}``: the claim as JSON, every field written, keys sorted (the controller
    compares values as strings to renew and finish it)."""
    return json.dumps(msgspec.to_builtins(claim), sort_keys=True)


def decode_claim(key: str, raw: bytes | str) -> ClaimInfo:
    """The claim stored under `key`. An absent or null field reads as its default and an attempt below 1 as 1; a
    value of older gpuwatch versions (``"host:pid unix-time"``) reads as a claim from that time without a lease.
    Raises CorruptClaim when it is JSON with a field of the wrong type (nobody can tell whether its holder lives)."""
    try:
        return _CLAIM_DECODER.decode(raw)
    except msgspec.DecodeError:  # a null, a number out of range, a wrong type, or not JSON: the checks below say
        pass
    value_text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        value = json.loads(value_text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        fields = {name: _claim_field(key, name, kind, value[name]) for name, kind in _CLAIM_FIELDS
                  if value.get(name) is not None}  # fmt: skip
        fields["attempt"] = max(1, fields.get("attempt", 1))
        return ClaimInfo(**fields)
    owner, _, when = value_text.partition(" ")  # the pre-lease format: "host:pid unix-time"
    try:
        claimed_at = float(when)
    except ValueError:
        claimed_at = 0.0
    return ClaimInfo(owner=owner, claimed_at=claimed_at)
