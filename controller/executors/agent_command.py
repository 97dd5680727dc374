"""Checkpoint, throttle and restore requests for the node agent: a signed `gpuwatch.command/1` message on `topic_commands`,
keyed by host. The agent (`gpuwatch.producers.commands.CommandListener`) verifies it and signals the
processes on that GPU, or sets / puts back its power limit; its acknowledgement arrives later on
`topic_outcomes` (`gpuwatch.command_ack/1`). Success here means Kafka accepted the command, not that the job
has checkpointed or the limit changed.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Producer

from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.schemas.codecs import encode_command
from gpuwatch.schemas.fields import AGENT_ACTIONS
from gpuwatch.schemas.records import Command, Remediation
from gpuwatch.signing import sign_command

from . import Outcome, UnsafeTarget, target_values

log = logging.getLogger(__name__)


def command_from_event(event: Remediation) -> Command:
    """The agent command for a remediation event (same id, host, GPU, uuid, action, reason, risk, and a throttle's
    power_limit_frac or sm_clock_frac and duration_s), not yet signed: `sign_command` fills nonce, issued_at,
    expires_at and sig."""
    return Command(
        id=event.id,
        host=event.host,
        gpu_index=event.gpu_index,
        uuid=event.uuid,
        action=event.action,
        reason=event.reason,
        risk=event.risk,
        nonce="",
        issued_at=0.0,
        expires_at=0.0,
        sig="",
        power_limit_frac=event.power_limit_frac,
        sm_clock_frac=event.sm_clock_frac,
        duration_s=event.duration_s,
    )


class AgentCommandExecutor:
    """Publishes checkpoint, throttle and restore events as commands signed with `key`, valid for
    `settings.command_ttl_s`."""

    name = "agent-command"

    def __init__(self, settings: Settings, *, key: bytes, producer: Producer | None = None) -> None:
        self.settings = settings
        self._key = key
        self._producer = producer
        self._topic_ready = False

    def _ensure(self) -> Producer:
        if not self._topic_ready:
            ensure_topics(self.settings, [self.settings.topic_commands])
            self._topic_ready = True
        if self._producer is None:
            self._producer = make_producer(self.settings)
        return self._producer

    def execute(self, event: Remediation) -> Outcome:
        try:
            target_values(event)
        except UnsafeTarget as exc:
            log.warning("remediation %s refused: %s", event.id, exc)
            return Outcome(ok=False, detail=f"refused: {exc}")
        if event.action not in AGENT_ACTIONS:
            return Outcome(ok=False, detail=f"node agents take {', '.join(AGENT_ACTIONS)} commands, not {event.action}")
        if event.action == "throttle" and not (
            isinstance(event.power_limit_frac, float) != isinstance(event.sm_clock_frac, float)
            and isinstance(event.duration_s, float)
        ):
            return Outcome(ok=False, detail="a throttle event needs one of power_limit_frac and sm_clock_frac, and "
                                            "duration_s; not sent")  # fmt: skip
        command = sign_command(command_from_event(event), self._key, ttl_s=self.settings.command_ttl_s)
        producer = self._ensure()
        errors: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        producer.produce(
            self.settings.topic_commands, encode_command(command), key=event.host, on_delivery=delivered
        )
        left = producer.flush(self.settings.controller_timeout_s)
        if left or errors:
            why = errors[0] if errors else f"not acknowledged within {self.settings.controller_timeout_s:g} s"
            return Outcome(ok=False, detail=f"{event.action} command for {event.host} not delivered: {why}")
        detail = (
            f"{event.action} command sent to the agent on {event.host} (GPU {event.gpu_index}, "
            f"nonce {command.nonce}, expires in {self.settings.command_ttl_s:g} s)"
        )
        log.info("remediation %s: %s", event.id, detail)
        return Outcome(ok=True, detail=detail)
