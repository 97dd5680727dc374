"""The stream worker's side of the model lifecycle: follow the control topic, load what a state names, and
install it in the processor between batches (docs/lifecycle.md).

`ModelSwitcher.prepare` (slow: reads artifacts; run it off the event loop) turns a `gpuwatch.model_control/1`
state into ModelStates, reusing the ones the processor already runs, so a promote or rollback only swaps them;
`RiskProcessor.install` then makes the swap, windows kept. A state that cannot be served (an artifact missing
from this worker's registry, a model that does not fit the windows) is refused as a dead letter with the reason,
and the worker goes on with the models it has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gpuwatch.config import Settings
from gpuwatch.model_registry import ControlEntry, ControlLog, ModelRegistry, RegistryError
from gpuwatch.schemas.codecs import make_deadletter
from gpuwatch.schemas.records import ModelControl, ModelRef
from gpuwatch.streams.model import ModelError, Scorer, load_artifact
from gpuwatch.streams.processor import ModelState, RiskProcessor

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The models a state names, ready to install."""

    state: ModelControl
    champion: ModelState
    challenger: ModelState | None


class ModelSwitcher:
    """Turns control states into installed models for one processor."""

    def __init__(self, settings: Settings, processor: RiskProcessor) -> None:
        self.settings = settings
        self.processor = processor
        self.registry = ModelRegistry(settings.model_registry) if settings.model_registry else None
        self.applied_seq = 0

    def prepare(self, state: ModelControl) -> Prepared:
        """Load what `state` names and the processor does not run yet; RegistryError or ModelError says why not."""
        running = {m.version: m for m in (self.processor.model, self.processor.challenger) if m is not None}

        def get(ref: ModelRef) -> ModelState:
            if ref.version in running:
                return running[ref.version]
            if self.registry is None:
                raise RegistryError(f"model {ref.version}: this worker has no model_registry setting to load it from")
            artifact = load_artifact(self.registry.path_of(ref))
            if artifact.version != ref.version:
                raise RegistryError(f"{ref.artifact} holds model {artifact.version}, the command names {ref.version}")
            try:
                return self.processor.model_state(Scorer(artifact, device=self.settings.device), self.settings)
            except ValueError as exc:
                raise RegistryError(str(exc)) from None

        champion = get(state.champion)
        challenger = get(state.challenger) if state.challenger is not None else None
        return Prepared(state, champion, challenger)

    def install(self, prepared: Prepared) -> None:
        """Swap the prepared models in (between batches: the caller's event loop runs no batch meanwhile)."""
        self.processor.install(prepared.champion, prepared.challenger)
        self.applied_seq = prepared.state.seq
        ch = prepared.challenger.version if prepared.challenger is not None else "none"
        log.warning("model %s (seq %d): champion %s, challenger %s", prepared.state.action, prepared.state.seq,
                    prepared.champion.version, ch)  # fmt: skip

    def refusal(self, entry: ControlEntry, reason: str) -> bytes:
        """The dead letter for a control message this worker cannot apply."""
        log.error("model control message at offset %d not applied: %s", entry.offset, reason)
        return make_deadletter(entry.raw, f"model control not applied: {reason}; the worker keeps model "
                               f"{self.processor.model_version}", topic=self.settings.topic_model_control,
                               partition=0, offset=entry.offset, stage="stream")  # fmt: skip

    def follow(self, entries: list[ControlEntry]) -> tuple[Prepared | None, list[bytes]]:
        """The newest state among `entries` prepared (None when none is new or it cannot be served), and dead
        letters for the messages that could not be read or served. Older states in the same read are skipped:
        the newest holds the whole state."""
        dead = [self.refusal(e, e.error) for e in entries if e.state is None]
        newest = next((e for e in reversed(entries) if e.state is not None), None)
        if newest is None or newest.state is None or newest.state.seq <= self.applied_seq:
            return None, dead
        try:
            return self.prepare(newest.state), dead
        except (RegistryError, ModelError) as exc:
            self.applied_seq = newest.state.seq  # refused once, not retried every poll
            return None, [*dead, self.refusal(newest, str(exc))]


def open_control_log(settings: Settings) -> ControlLog:
    """The control topic's reader a worker follows (created with the topic, if need be)."""
    from gpuwatch.model_registry import ensure_control_topic

    ensure_control_topic(settings)
    return ControlLog(settings)
