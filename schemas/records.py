"""The typed records of the gpuwatch wire contracts: one msgspec Struct per record that crosses a process boundary.

Each Struct is the one definition of its record: `codecs.py` encodes and decodes it (and derives the reasons it
gives for a bad record from it), the JSON Schema file of the same name beside this module is checked against it
in tests (tests/test_schema_files.py), and docs/contracts.md describes it. A field with a default is optional on
the wire; `UNSET` means "absent" (the field is not written). Within a major version, fields are only ever added,
and readers ignore fields they do not know. The samples contract (`gpuwatch.samples/1`) is decoded into columns
instead (`codecs.Snapshot`); its struct is `codecs.SamplesMessage`, built from `fields.py`.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import msgspec.inspect as mi
from msgspec import UNSET, Meta, Struct, UnsetType, field

from .fields import (
    AUDIT_SCHEMA,
    COMMAND_ACK_SCHEMA,
    COMMAND_SCHEMA,
    DEADLETTER_SCHEMA,
    MODEL_CONTROL_SCHEMA,
    OUTCOME_SCHEMA,
    REMEDIATION_SCHEMA,
    RISK_SCHEMA,
    STATS_SCHEMA,
    Action,
    FailureMode,
)

MAX_HOST_LEN = 255
MAX_GPU_INDEX = 2**31 - 1
MAX_INT64 = 2**63 - 1
MAX_ID_LEN = 128
FMAX = sys.float_info.max  # a bound of FMAX rejects infinity (1e999 reads as inf)

Host = Annotated[
    str, Meta(min_length=1, max_length=MAX_HOST_LEN, description="Node name, as the scheduler knows it.")
]
GpuIndex = Annotated[
    int, Meta(ge=0, le=MAX_GPU_INDEX, description="NVML device index of the GPU on its node.")
]
UnixTime = Annotated[float, Meta(ge=0, le=FMAX, description="Unix time, seconds (fractions allowed).")]
Seconds = Annotated[float, Meta(ge=0, le=FMAX)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Count = Annotated[int, Meta(ge=0, le=MAX_INT64)]
RemediationId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
NonEmpty = Annotated[str, Meta(min_length=1)]
PowerFraction = Annotated[float, Meta(gt=0, le=1, description="Share of the board's default power limit.")]
Watts = Annotated[float, Meta(gt=0, le=100_000, description="A power limit, watts.")]
Duration = Annotated[float, Meta(gt=0, le=7 * 86400, description="Seconds, at most a week.")]
ClockFraction = Annotated[float, Meta(gt=0, le=1, description="Share of the board's maximum SM clock.")]
MHz = Annotated[int, Meta(ge=1, le=100_000, description="A clock, MHz.")]


class Reason(Struct, kw_only=True, frozen=True, gc=False):
    """One reason a GPU is in alarm (`Risk.why`): an input signal far from what is normal for this GPU.

    `signal` names it (streams/explain.py SIGNALS; new names may be added, readers show `text`), `text` says it
    in operator words and numbers, `value` and `reference` are the numbers (the signal now, and the GPU's own
    baseline or its neighbours' level it is compared with, in the unit of the text) and `severity` how far from
    normal it is, on one scale for every signal (1 = clearly abnormal).
    """

    signal: NonEmpty
    text: NonEmpty
    value: Annotated[float, Meta(ge=-FMAX, le=FMAX)]
    reference: Annotated[float, Meta(ge=-FMAX, le=FMAX)]
    severity: Annotated[float, Meta(ge=0, le=FMAX)]


class Risk(Struct, tag_field="schema", tag=RISK_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.risk/1`: the model's failure risk for one GPU (topic `topic_risk`, key: host).

    Written by the stream worker; read by the Redis sink, the remediation sink and `gpuwatch score`. Records of
    older workers lack the optional fields: `alarm`, `drain` and `failed` then read false, `op` "". `why` is
    written only for a GPU in alarm (streams/explain.py).
    """

    host: Host
    gpu_index: GpuIndex
    uuid: str
    ts: UnixTime  # ts of the newest sample the score used
    risk: Probability  # P(failure within horizon_s) at the fleet's failure rate; 1 for a failed GPU
    horizon_s: Annotated[float, Meta(gt=0, le=FMAX)]
    mode: FailureMode
    model: NonEmpty  # version of the model that scored
    scored_at: UnixTime
    score: Probability | UnsetType = (
        UNSET  # the calibrated score the operating points compare; absent when failed
    )
    alarm: bool = False
    drain: bool = False
    op: str = ""  # the alarm operating point that made the call, e.g. model:0.979x1/10s
    failed: bool = False
    failed_since: UnixTime | UnsetType = UNSET  # ts of the sample that showed the failure (when failed)
    history_s: Seconds | UnsetType = UNSET  # seconds of telemetry behind the score
    why: list[Reason] | UnsetType = UNSET  # GPUs in alarm: the signals that drive the risk, most severe first


class Remediation(Struct, tag_field="schema", tag=REMEDIATION_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.remediation/1`: a command to act on one GPU (topic `topic_remediation`, key: host).

    Written by the remediation sink's policy; executed by the controller, at least once: de-duplicate on `id`.
    """

    id: RemediationId  # deterministic: codecs.remediation_id
    host: Host
    gpu_index: GpuIndex
    uuid: str
    action: Action
    reason: str
    risk: Probability
    ts: UnixTime  # when the command was issued
    # throttle only: the power limit to set (share of the board's default limit) or the SM clock ceiling to lock
    # (share of the board's maximum clock), one of them, and for how long
    power_limit_frac: PowerFraction | UnsetType = UNSET
    duration_s: Duration | UnsetType = UNSET
    sm_clock_frac: ClockFraction | UnsetType = UNSET


class Outcome(Struct, tag_field="schema", tag=OUTCOME_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.outcome/1`: how executing one remediation went (topic `topic_outcomes`, key: host; also the
    Redis hash ``gpuwatch:outcome:{id}``, see redis_keys.outcome_fields). Written by the controller."""

    id: RemediationId
    host: Host
    gpu_index: GpuIndex
    uuid: str
    action: Action
    risk: Probability
    event_ts: UnixTime  # ts of the remediation event
    executor: NonEmpty
    ok: bool
    dry_run: bool
    detail: str
    started_at: UnixTime
    duration_s: Seconds
    attempt: Annotated[int, Meta(ge=1, le=MAX_INT64)] = 1  # > 1: taken over from an interrupted attempt


class Command(Struct, tag_field="schema", tag=COMMAND_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.command/1`: a signed request to a node agent (topic `topic_commands`, key: host).

    Written by the controller's agent-command executor; `gpuwatch.signing.sign_command` fills `nonce`,
    `issued_at`, `expires_at` and `sig` (HMAC-SHA256 over every other field). Agents take `checkpoint`,
    `throttle` (power limit `power_limit_w` watts or `power_limit_frac` of the default, or SM clocks locked
    below `sm_clock_max_mhz` or `sm_clock_frac` of the board's maximum: exactly one of the four, for
    `duration_s`) and `restore` (put back what a throttle changed); they refuse other actions.
    """

    id: RemediationId
    host: Host
    gpu_index: GpuIndex
    uuid: str
    action: Action
    reason: str
    risk: Probability
    nonce: Annotated[str, Meta(min_length=16, max_length=128)]
    issued_at: UnixTime
    expires_at: UnixTime
    sig: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    power_limit_w: Watts | UnsetType = UNSET  # throttle: the limit in watts, or
    power_limit_frac: PowerFraction | UnsetType = UNSET  # throttle: share of the board's default limit
    duration_s: Duration | UnsetType = UNSET  # throttle: how long before the agent restores the limit
    sm_clock_max_mhz: MHz | UnsetType = UNSET  # throttle: lock the SM clock at most this high, or
    sm_clock_frac: ClockFraction | UnsetType = UNSET  # throttle: or this share of the board's maximum clock


class CommandAck(Struct, tag_field="schema", tag=COMMAND_ACK_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.command_ack/1`: a node agent's answer to one command (topic `topic_outcomes`, key: host).

    `id`, `gpu_index`, `action` and `nonce` echo the command and are null where it did not carry a usable one.
    `reason` is accepted, or why it was refused: unsigned, forged, malformed, expired, not_yet_valid, replayed,
    nonce_store_full, nonce_store_error, wrong_host, unsupported_action.
    """

    id: str | None
    host: Host
    gpu_index: GpuIndex | None
    action: str | None
    nonce: str | None
    accepted: bool
    reason: NonEmpty
    ok: bool
    detail: str
    pids: list[Annotated[int, Meta(ge=0, le=MAX_INT64)]]
    at: UnixTime  # the agent's clock when it decided


class Source(Struct, kw_only=True, frozen=True, gc=False):
    """Where a dead-lettered message was read: topic (or file path), partition and offset (or line); -1 unknown."""

    topic: str
    partition: Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]
    offset: Annotated[int, Meta(ge=-MAX_INT64 - 1, le=MAX_INT64)]


class DeadLetter(Struct, tag_field="schema", tag=DEADLETTER_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.deadletter/1`: a message a stage could not process, why, and its original bytes (topic
    `topic_deadletter`). Build one with `codecs.make_deadletter`. `original` is base64 on the wire
    (`original_b64`): the original may be any bytes."""

    error: str  # names the field, e.g. gpus[3].temp_c: expected number or null, got string "71"
    source: Source
    original: bytes = field(name="original_b64")  # cut to 512 KiB when original_truncated
    original_size: Count | UnsetType = UNSET
    original_truncated: bool = False
    failed_at: UnixTime
    stage: NonEmpty


class StreamStats(Struct, tag_field="schema", tag=STATS_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.stats/1`: a stream worker's running counts, one ``STATS {json}`` line on its stdout every
    `stream_stats_interval_s` (read by the demo and the benchmarks with `codecs.decode_stats_line`)."""

    samples: Count  # GPU-samples folded into windows
    rejected_samples: Count  # GPU-samples dead-lettered as duplicate or out of order
    scored: Count  # risk records produced
    deadletters: Count
    batches: Count
    partitions: Count  # samples partitions this worker owns now
    offsets: dict[str, Count]  # per samples partition: offset after the last message counted
    refreshed: Count  # risk records re-published for silent GPUs
    restored_gpus: Count
    checkpointed: Count
    uptime_s: Seconds
    first_batch_at: UnixTime
    last_batch_at: UnixTime
    gpus_tracked: Count
    state_bytes_per_gpu: Count


class ModelRef(Struct, kw_only=True, frozen=True, gc=False):
    """A model artifact in the model registry: what risk records call it (`version`), its file in the registry
    (relative to `model_registry`; "" for the artifact shipped in the package) and the sha256 of that file."""

    version: NonEmpty  # the artifact's version: the `model` of the risk records it scores
    artifact: str  # file name inside the registry; "" = the packaged default model
    sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]


ModelAction = Literal["shadow", "promote", "rollback", "stop"]


class ModelControl(Struct, tag_field="schema", tag=MODEL_CONTROL_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.model_control/1`: which models the stream workers run, after one `gpuwatch model` command (topic
    `topic_model_control`, one partition, key: "models"). Each message holds the whole state, so a worker that
    starts reads the topic to its end and applies the last one. Written by `gpuwatch model`; read by every stream
    worker (each reads the whole topic itself, outside its consumer group) and by `gpuwatch model status/compare`.
    """

    seq: Annotated[int, Meta(ge=1, le=MAX_INT64)]  # 1 + the previous message's; orders the commands
    action: ModelAction  # the command that made this state
    champion: ModelRef  # scores the risk topic: its records drive the sinks and the policy
    challenger: ModelRef | None  # scores the same windows, its records go to the shadow topic only
    challenger_since: UnixTime | None  # when the challenger (as a challenger) began scoring: compare's start
    rollback_to: ModelRef | None  # the champion before the last promote, while a rollback can restore it
    at: UnixTime  # when the command was issued
    note: str = ""  # who issued it and why, for the record


RECORDS: tuple[type[Struct], ...] = (Risk, Remediation, Outcome, Command, CommandAck, DeadLetter, StreamStats,
                                     ModelControl)
_KINDS = {mi.StrType: "str", mi.LiteralType: "str", mi.IntType: "int", mi.FloatType: "float", mi.BoolType: "bool",
          mi.ListType: "json"}


def columns(cls: type[Struct]) -> tuple[tuple[str, str], ...]:
    """(wire name, "str" | "int" | "float" | "bool" | "json") of every field of a record, in order: a table's
    columns (the archive's); a list field (`Risk.why`) is "json", its JSON text. Optional fields are included;
    the `schema` tag is not."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    out = []
    for f in info.fields:
        t = f.type.type if isinstance(f.type, mi.Metadata) else f.type
        if isinstance(t, mi.UnionType):
            (t,) = (x for x in t.types if not isinstance(x, mi.NoneType))
        out.append((f.encode_name, _KINDS[type(t)]))
    return tuple(out)


AuditDecision = Literal["acted", "suppressed", "cleared", "tripped", "reset"]


class AuditEntry(Struct, tag_field="schema", tag=AUDIT_SCHEMA, kw_only=True, frozen=True, gc=False):
    """`gpuwatch.audit/1`: one decision of the remediation policy, or an operator's command, in the Redis stream
    ``gpuwatch:audit`` (field ``json``; redis_keys.AUDIT). Written by the remediation sink and `gpuwatch policy`.

    `decision`: acted (an event was published), suppressed (an action was due but held: `reason` says by what),
    cleared (an episode ended), tripped (a guard rail opened), reset (an operator closed one). The GPU fields are
    null in an entry about the fleet (an incident, an operator's reset)."""

    decision: AuditDecision
    action: Action | None
    reason: NonEmpty  # due, killswitch, cooldown, stale, breaker, escalation, incident, recovered, ...
    detail: str
    id: RemediationId | None  # the remediation event's id, when one was published
    host: Host | None
    gpu_index: GpuIndex | None
    uuid: str | None
    risk: Probability | None
    mode: FailureMode | None
    ts: UnixTime | None  # the risk record's sample time
    episode_ts: UnixTime | None  # when the GPU's alarm episode began
    now: UnixTime  # when the policy decided
    why: list[str] = field(default_factory=list)  # the risk record's reasons (Risk.why), as their texts
    unhealthy_hosts: Count | UnsetType = UNSET  # incident entries: hosts unhealthy at the time
    # breaker trips: the limit that was reached (hosts), the fleet's hosts, and the window (s)
    limit: Count | UnsetType = UNSET
    fleet_hosts: Count | UnsetType = UNSET
    window_s: Seconds | UnsetType = UNSET


# ---------------------------------------------------------------- Redis records
# Not messages: the fields of a Redis hash or the value of a Redis key (redis_keys.py names them and decodes them),
# so they carry no `schema` tag. Each has a JSON Schema file of its name (REDIS_RECORDS) checked against it in tests.


class GpuRisk(Struct, kw_only=True, frozen=True, gc=False):
    """The newest risk of one GPU as a reader sees it: the hash ``gpuwatch:gpu:{host}:{gpu}`` (written by the Redis
    sink from the GPU's newest `Risk`) plus its age and staleness at the reader's clock (`RiskClient.risk`, `top`;
    `redis_keys.decode_gpu_hash`). A number the hash lacks or cannot be read reads as None, a text field as ""."""

    host: str
    gpu_index: int  # from the key (the hash's own field could be missing)
    uuid: str
    risk: float | None  # P(failure within the horizon) at the fleet's failure rate; 1 for a failed GPU
    mode: str  # the failure mode the model expects (fields.FAILURE_MODES)
    model: str  # the version of the model that scored
    ts: float | None  # unix time of the newest sample the score used; None: unknown (the GPU is then stale)
    scored_at: float | None
    written_at: float | None  # the Redis sink's clock when it wrote the hash
    alarm: bool  # the model's own call at its alarm operating point
    drain: bool
    failed: bool  # the GPU has failed (risk is then 1)
    op: str  # the alarm operating point, e.g. model:0.979x1/10s
    why: list[str]  # a GPU in alarm: its reasons in operator words, most severe first; [] otherwise
    age_s: float | None  # reader's clock - ts; None when ts is unknown
    stale: bool  # ts is unknown or older than the reader's stale_after_s


class HostRisk(Struct, kw_only=True, frozen=True, gc=False):
    """The rollup of one host as a reader sees it: the hash ``gpuwatch:host:{host}`` plus its staleness at the
    reader's clock (`RiskClient.host_risk`; `redis_keys.decode_host_hash`). An unreadable count reads as 0, any
    other unreadable number as None."""

    host: str
    max_risk: float | None  # the risk of its riskiest GPU
    max_gpu: int | None  # the index of its riskiest GPU
    max_mode: str
    gpus: int  # GPUs of the host with a risk in Redis
    alarms: int  # of those, in alarm
    failed: int  # of those, failed
    oldest_ts: float | None  # min ts over its GPUs: a host is as fresh as its least recently reported GPU
    newest_ts: float | None
    written_at: float | None
    stale: bool  # oldest_ts is unknown or older than the reader's stale_after_s


class FleetGpu(Struct, kw_only=True, frozen=True, gc=False):
    """One GPU of `RiskClient.fleet()`: its risk and state from the fleet-wide sorted sets (``gpuwatch:fleet:risk``,
    ``:fleet:failed``, ``:lastseen``), read for the whole fleet in one round-trip."""

    host: str
    gpu_index: int
    risk: float
    failed: bool
    ts: float | None  # its newest record's ts (None: not in lastseen)
    stale: bool


class ClaimInfo(Struct, kw_only=True, frozen=True, gc=False):
    """The value of ``gpuwatch:claim:{id}`` (JSON; `redis_keys.encode_claim` / `decode_claim`): which controller
    holds remediation `id` (``{hostname}:{pid}:{token}``), which attempt, since when, until when its lease runs
    and whether its outcome is recorded. The controller writes every field; a reader takes an absent or null
    field as its default, so `lease_until` None is a claim of an older version (held `lease_s` from
    `claimed_at`)."""

    owner: str = ""
    attempt: Annotated[int, Meta(ge=1, le=MAX_INT64)] = 1  # > 1: taken over from an interrupted attempt
    claimed_at: UnixTime = 0.0  # when this attempt began
    lease_until: UnixTime | None = None  # the holder renews it every third of the lease while it runs
    done: bool = False  # its outcome (gpuwatch:outcome:{id}) is recorded


# JSON Schema file name (without .json) -> Redis record
REDIS_RECORDS: dict[str, type[Struct]] = {"gpu_risk": GpuRisk, "host_risk": HostRisk, "fleet_gpu": FleetGpu,
                                          "claim": ClaimInfo}
