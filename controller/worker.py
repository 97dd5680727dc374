"""The controller: executes remediation events once each, and records how it went.

For each event on `settings.topic_remediation` it takes a leased claim on ``gpuwatch:claim:{id}`` in Redis
(controller/claims.py) *before* acting, so a redelivered or duplicated event (same id) is not executed
again; then it runs the executor, publishes the outcome to `settings.topic_outcomes` (future training
labels) and stores ``gpuwatch:outcome:{id}``. The offset is committed only after that. It runs on `BatchLoop`
(gpuwatch/kafka/loop.py), one event per batch: while the broker is away the controller holds the event and
resends what Kafka did not acknowledge, however long the outage lasts, and marks nothing done before it is in
Kafka.

If a controller dies between claim and outcome, the event is redelivered (its offset was not committed)
and the next controller takes the interrupted claim over once its lease has run out (at once when the dead
process was on the same host). It then runs the event again only where that cannot double its effect:
checkpoint and migrate (asking a job to checkpoint or a drained node to drain again changes nothing), actions
the executor lists in `idempotent_actions`, or when the executor's `already_done(event)` says the first
attempt did not take effect. Otherwise (a reboot, by default) it records a failed outcome saying the attempt
was interrupted and was not retried, so an operator decides. So no event is lost, and none runs twice
unless running it twice is harmless.

The kill switch (``gpuwatch:killswitch``) is read once more right before the executor would run: an event
that reaches the controller while it is on, even one the policy published before it was turned on, is not
executed but recorded as skipped (`ok: false`, detail ``skipped: killswitch ...``) and committed. The switch
cancels, it does not postpone: clearing it never releases a backlog of decisions made on old data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from confluent_kafka import Message

from gpuwatch import metrics
from gpuwatch.config import Settings
from gpuwatch.kafka import BatchLoop, Output, Processed, ensure_topics
from gpuwatch.redis_backoff import until_redis_answers

from ..schemas import redis_keys as k
from ..schemas.codecs import decode_remediation, encode_outcome, make_deadletter
from ..schemas.records import Outcome as OutcomeRecord
from ..schemas.records import Remediation
from .claims import Claim, ClaimStore
from .executors import Executor, Outcome, make_executor

log = logging.getLogger(__name__)

STAGE = "controller"

OnOutcome = Callable[[OutcomeRecord], None]
# Running these again after an interrupted attempt changes nothing (a second checkpoint request, a drain of a
# drained node, a throttle that keeps the saved limit and sets the same lower one, a second restore); a reboot
# may have happened already, so it is re-run only if the executor says it is safe.
IDEMPOTENT_ACTIONS = frozenset({"checkpoint", "migrate", "repair", "throttle", "restore"})  # repair drains


def group_id(settings: Settings) -> str:
    """Consumer group of the controller."""
    return settings.stream_app_id + "-controller"


def _execute(executor: Executor, event: Remediation) -> tuple[Outcome, float, float]:
    started = time.time()
    t0 = time.monotonic()
    try:
        outcome = executor.execute(event)
    except Exception as exc:  # an executor bug must not stop the controller; it is recorded as a failure
        log.exception("executor %s failed on %s", executor.name, event.id)
        outcome = Outcome(ok=False, detail=f"executor raised {type(exc).__name__}: {exc}")
    return outcome, started, time.monotonic() - t0


def skipped_by_killswitch(note: str) -> Outcome:
    """The outcome of an event held back because the kill switch was on when it was about to run."""
    detail = f"skipped: killswitch {k.KILLSWITCH} is on ({note}); not executed"
    return Outcome(ok=False, detail=detail, skipped=True)


def result_label(outcome: Outcome) -> str:
    """The `outcome` label of `gpuwatch_remediation_actions_total` for a recorded outcome."""
    if outcome.skipped:
        return "skipped"
    return "dry_run" if outcome.dry_run and outcome.ok else "ok" if outcome.ok else "failed"


def _noted(outcome: Outcome, note: str) -> Outcome:
    return Outcome(ok=outcome.ok, detail=f"{note}: {outcome.detail}", dry_run=outcome.dry_run)


def outcome_record(
    event: Remediation, executor: str, outcome: Outcome, started_at: float, duration_s: float, attempt: int = 1
) -> OutcomeRecord:
    """The `gpuwatch.outcome/1` record published to `topic_outcomes` (and stored, as strings, in Redis)."""
    return OutcomeRecord(id=event.id, host=event.host, gpu_index=event.gpu_index, uuid=event.uuid,
                         action=event.action, risk=event.risk, event_ts=event.ts, executor=executor, ok=outcome.ok,
                         dry_run=outcome.dry_run, detail=outcome.detail, started_at=started_at,
                         duration_s=duration_s, attempt=attempt)  # fmt: skip


class _Controller:
    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        executor: Executor,
        on_outcome: OnOutcome | None,
        redis_client: redis.Redis,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.executor = executor
        self.on_outcome = on_outcome
        self.redis = redis_client
        self.claims = ClaimStore(
            redis_client, lease_s=settings.controller_lease_s, ttl_s=settings.controller_claim_ttl_s
        )

    def process(self, batch: list[Message]) -> Processed | None:
        """Handles a batch of one event (see `run_controller`)."""
        (msg,) = batch
        return self.handle(msg)

    def handle(self, msg: Message) -> Processed | None:
        """Runs one event; returns its outcome (or dead letter) to publish, and storing the outcome in Redis to
        do once Kafka has it; None if `stop` was set before it was done (do not commit it)."""
        try:
            event = decode_remediation(msg.value())
        except ValueError as exc:
            log.warning("dead-lettered an undecodable remediation event at offset %s: %s", msg.offset(), exc)
            return self.deadletter(msg, str(exc))
        try:
            claim = self.claim(event)
        except k.CorruptClaim as exc:
            # Whether its holder still runs it cannot be told: set the event aside, go on with the next.
            reason = f"{exc}; not executed: delete the key (or fix it) and replay the event from the dead letter"
            log.error("remediation %s (%s %s GPU %s) dead-lettered: %s",
                      event.id, event.action, event.host, event.gpu_index, reason)  # fmt: skip
            return self.deadletter(msg, reason)
        if claim is None:
            return None if self.stop.is_set() else Processed()
        with self.claims.held(claim):
            # Read at the last moment: the event may have waited on the topic since before the switch went on.
            ok, note = until_redis_answers(
                self.stop, "read the kill switch", lambda: self.redis.get(k.KILLSWITCH)
            )
            if not ok:
                return None
            if note is not None:
                outcome, started_at, duration_s = self.held_back(event, note), time.time(), 0.0
            elif claim.interrupted_owner:
                outcome, started_at, duration_s = self.recover(event, claim)
            else:
                outcome, started_at, duration_s = _execute(self.executor, event)
        metrics.REMEDIATION_ACTIONS.labels(event.action, result_label(outcome)).inc()
        record = outcome_record(event, self.executor.name, outcome, started_at, duration_s, claim.attempt)
        outcome_out = Output(self.settings.topic_outcomes, event.host.encode(), encode_outcome(record))

        # The outcome reaches Kafka before the claim is marked done: a crash in between re-runs the event
        # (safely, see above) rather than leaving a done claim with no published outcome.
        def stored() -> bool:
            if not self.store(claim, record):
                return False
            if self.on_outcome is not None:
                try:
                    self.on_outcome(record)
                except Exception:
                    log.exception("on_outcome callback failed")
            return True

        return Processed([outcome_out], then=stored)

    def deadletter(self, msg: Message, reason: str) -> Processed:
        """`msg` for the dead-letter topic, with `reason`."""
        raw = make_deadletter(msg.value(), reason, topic=msg.topic() or "", partition=msg.partition() or 0,
                              offset=msg.offset() or 0, stage=STAGE)  # fmt: skip
        metrics.DEADLETTERS.labels(STAGE).inc()
        return Processed([Output(self.settings.topic_deadletter, msg.key(), raw)])

    def claim(self, event: Remediation) -> Claim | None:
        """Our claim on the event, or None when it is already done (or `stop` was set); waits while another
        live controller holds it (at most its lease). Raises CorruptClaim when its claim cannot be read."""
        rid = event.id
        while True:
            ok, state = until_redis_answers(
                self.stop, "claim a remediation", lambda: self.claims.try_claim(rid)
            )
            if not ok:
                return None
            if state.kind == "ours":
                return state.claim
            if state.kind == "done":
                log.info("remediation %s (%s %s GPU %s) already done; skipped",
                         rid, event.action, event.host, event.gpu_index)  # fmt: skip
                metrics.REMEDIATION_ACTIONS.labels(event.action, "duplicate").inc()
                return None
            log.info("remediation %s is held by %s; waiting for its outcome or the end of its lease",
                     rid, state.holder)  # fmt: skip
            if self.stop.wait(min(1.0, self.claims.lease_s / 10)):
                return None

    def held_back(self, event: Remediation, note: bytes | str) -> Outcome:
        """The skipped outcome of an event that was due while the kill switch is on (logged at WARNING)."""
        text = note.decode(errors="replace") if isinstance(note, bytes) else str(note)
        outcome = skipped_by_killswitch(text)
        log.warning("remediation %s (%s %s GPU %s): %s", event.id, event.action, event.host,
                    event.gpu_index, outcome.detail)  # fmt: skip
        return outcome

    def recover(self, event: Remediation, claim: Claim) -> tuple[Outcome, float, float]:
        """Takes over an attempt that `claim.interrupted_owner` did not finish: re-runs it only where safe."""
        action, who = event.action, claim.interrupted_owner
        log.warning("remediation %s (%s %s GPU %s): the attempt by %s was interrupted",
                    event.id, action, event.host, event.gpu_index, who)  # fmt: skip
        if action in IDEMPOTENT_ACTIONS | frozenset(getattr(self.executor, "idempotent_actions", ())):
            outcome, started_at, duration_s = _execute(self.executor, event)
            return _noted(outcome, f"re-run after an interrupted attempt by {who}"), started_at, duration_s
        check = getattr(self.executor, "already_done", None)
        why = f"running it again could {action} twice"
        started_at = time.time()
        if check is not None:
            try:
                prior: Outcome | None = check(event)
            except Exception as exc:  # cannot tell whether it took effect: do not risk a second run
                log.exception("executor %s could not check %s", self.executor.name, event.id)
                why = f"checking whether it took effect failed ({type(exc).__name__}: {exc})"
            else:
                if prior is not None:
                    return _noted(prior, f"done by the interrupted attempt of {who}"), started_at, 0.0
                outcome, started_at, duration_s = _execute(self.executor, event)
                note = f"re-run: the interrupted attempt of {who} had not acted"
                return _noted(outcome, note), started_at, duration_s
        detail = (f"interrupted: {who} stopped while executing this {action}; not retried, because {why}. "
                  f"Check {event.host} and act by hand if it is still needed")  # fmt: skip
        log.error("remediation %s: %s", event.id, detail)
        return Outcome(ok=False, detail=detail), started_at, 0.0

    def store(self, claim: Claim, record: OutcomeRecord) -> bool:
        """Records the outcome in Redis and marks the claim done; False if `stop` was set first."""
        fields = k.outcome_fields(record)
        ok, finished = until_redis_answers(
            self.stop, "record an outcome", lambda: self.claims.finish(claim, fields)
        )
        if not ok:
            log.error("outcome of %s not stored in Redis (stopping): %s", record.id, record)
            return False
        if not finished:
            log.warning("remediation %s: our lease ran out while executing and another controller took over; "
                        "our outcome was published but not stored in Redis", record.id)  # fmt: skip
        return True


def run_controller(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    executor: Executor | None = None,
    on_outcome: OnOutcome | None = None,
    redis_client: redis.Redis | None = None,
    poll_timeout_s: float = 0.2,
) -> None:
    """Executes the events of `settings.topic_remediation` until `stop` is set (forever without one).

    `executor` defaults to `make_executor(settings)` (dry-run). `on_outcome(record)` gets each
    `gpuwatch.outcome/1` record after it is published. Undecodable events go to `settings.topic_deadletter`.
    Group: `group_id(settings)`; an offset is committed after its event's outcome is in Kafka and in Redis.
    """
    stop = stop or threading.Event()
    metrics.zero_counters("controller")
    ensure_topics(settings, [settings.topic_remediation, settings.topic_outcomes, settings.topic_deadletter])
    own_redis = redis_client is None
    client = redis_client or redis.Redis.from_url(
        settings.redis_url, socket_timeout=10, socket_connect_timeout=5
    )
    ctl = _Controller(settings, stop, executor or make_executor(settings), on_outcome, client)
    # One event per batch: its outcome is in Kafka and in Redis, and its offset committed, before the next
    # action runs (a batch of several would hold their claims while the first one's outcome waits).
    loop = BatchLoop(settings, name=STAGE, group=group_id(settings), topics=[settings.topic_remediation],
                     process=ctl.process, max_batch=1, poll_timeout_s=poll_timeout_s, batch_metrics=False)  # fmt: skip
    try:
        loop.run(stop)
    finally:
        if own_redis:
            client.close()
