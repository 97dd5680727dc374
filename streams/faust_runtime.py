"""What the stream worker changes in faust-streaming 0.15.3 (pinned), by subclassing and wrapping, never editing.

- `cap_fetch_wait`: faust hard-codes aiokafka's fetch_max_wait_ms=1500, which lands in every sample's latency
  on a quiet partition; capped.
- `WorkerApp`: faust's App without the Monitor sensor (Python timing of every event for a web UI the worker
  turns off), with a consumer whose per-message hand-off is direct (`FastDrainConsumer`), and with what the
  worker needs to follow gpuwatch's Kafka rule (offsets move only after the batch's output is acknowledged):
  `stopping`, set as soon as it begins to stop, and `forbid_commits()`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, cast

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver

log = logging.getLogger(__name__)


def cap_fetch_wait(max_wait_ms: int) -> None:
    """Cap aiokafka's fetch_max_wait_ms: when the broker does not answer a fetch early, a quiet partition's
    messages would wait up to faust's 1,500 ms."""
    import aiokafka

    base = aiokafka.AIOKafkaConsumer
    if getattr(driver.aiokafka.AIOKafkaConsumer, "_gpuwatch_capped", False):
        return

    class CappedConsumer(base):  # type: ignore[misc, valid-type]
        _gpuwatch_capped = True

        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", 500)), max_wait_ms)  # type: ignore[call-overload]
            super().__init__(*args, **kwargs)

    driver.aiokafka = type(driver.aiokafka)("aiokafka_capped")
    driver.aiokafka.__dict__.update(aiokafka.__dict__)
    driver.aiokafka.AIOKafkaConsumer = CappedConsumer


class FastDrainConsumer(driver.Consumer):
    """faust's aiokafka consumer with a cheaper hand-off of each fetched message to the agents' queues.

    faust awaits every message's delivery through `wait_first(callback, suspend_flow)`: four tasks created and
    three cancelled per message, so that a delivery blocked on a full queue can be abandoned when a rebalance
    suspends the flow. That costs more than everything else faust does per message (the worker handled ~3k
    messages/s with it). Here the delivery is awaited directly whenever it cannot block: flow is active and
    no queue of a channel subscribed to the partition is full. Otherwise faust's own guarded path is taken.
    The loop is otherwise faust 0.15.3's `Consumer._drain_messages`, unchanged.
    """

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by every stream test
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Any, self)._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        flow_control_active = self.app.flow_control.is_active
        channels_of = cast(Any, self.app.topics)._tp_index.get

        def cannot_block(tp: Any) -> bool:
            if not (self.flow_active and flow_control_active()):
                return False
            return not any(chan.queue.full() for chan in channels_of(tp, ()))

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = cast(Any, getmany(timeout=1.0))
                await self.sleep(0)  # getmany may return at once, in a loop; let others run
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if cannot_block(tp):
                                await callback(message)
                            else:
                                await self.wait_first(callback(message), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class _Transport(driver.Transport):
    Consumer = FastDrainConsumer


class WorkerApp(faust.App):
    """The stream worker's faust App (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set before faust waits for the agents to finish their batches: a batch still waiting for Kafka to
        # acknowledge its output then gives up (and calls forbid_commits) instead of holding the shutdown.
        self.stopping = threading.Event()

    async def on_stop(self) -> None:
        self.stopping.set()
        await super().on_stop()

    def forbid_commits(self) -> None:
        """This worker commits no offset from now on. faust acks a batch's events however the agent leaves it
        (also by an exception) and commits acked offsets every second and when it stops, so a worker that gives
        up on a batch's output must commit nothing more: its successor then reads the batch again."""

        async def no_commit(*args: object, **kwargs: object) -> bool:
            return False

        consumer = cast(Any, self.consumer)
        consumer.commit = no_commit  # the periodic and the final commit
        consumer._commit = no_commit  # and force_commit, which every other path ends in

    def on_init_dependencies(self) -> Any:
        deps = super().on_init_dependencies()
        # gpuwatch exports its own per-batch metrics (gpuwatch/metrics.py) instead of the Monitor's per-event ones.
        self.sensors.remove(self.monitor)
        return deps

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)  # the worker's broker URL is always kafka://
