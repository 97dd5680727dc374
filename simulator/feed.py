"""Publish a simulated fleet to the samples topic: history as fast as possible, then paced to the wall clock.

Sample timestamps follow the simulator's clock. `catch_up` keeps that clock at wall time while a
consumer digests a backlog, so latency measured from sample ts means what it says.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from confluent_kafka import Producer

from gpuwatch.kafka import produce
from gpuwatch.simulator.fleet import FleetSimulator


class SimulatedFeed:
    """Drives `sim` into `topic` (keyed by host); counts the GPU-samples it produced.

    With `join_over_s`, each host's agent starts at its own moment, drawn uniformly within that many seconds of
    the simulator's start (seeded by the fleet's seed): what the stream sees of a real fleet, whose agents never
    start in the same second. Without it, every GPU's first sample has the same ts, and so do its window's ring
    advances and rescorings from then on: the whole fleet's work lands in the same batches (the worst case,
    as after a fleet-wide agent restart).
    """

    def __init__(self, sim: FleetSimulator, producer: Producer, topic: str, join_over_s: float = 0.0) -> None:
        self.sim = sim
        self.producer = producer
        self.topic = topic
        self.produced = 0
        self._gpus_per_host = sim.G
        rng = random.Random(sim.cfg.seed)
        self._joins_at = {host: sim.now + rng.uniform(0.0, join_over_s) for host in sim.hosts} if join_over_s > 0 else {}

    def snapshots(self) -> list[tuple[str, bytes]]:
        """(host, message) of one interval of every host whose agent has started."""
        pairs = self.sim.step_json()
        if not self._joins_at:
            return pairs
        now, joins_at = self.sim.now, self._joins_at
        return [(host, value) for host, value in pairs if now >= joins_at[host]]

    def step(self) -> None:
        """Publish one interval of every host whose agent has started."""
        for host, value in self.snapshots():
            produce(self.producer, self.topic, host.encode(), value)
            self.produced += self._gpus_per_host
        self.producer.poll(0)

    def publish_until(self, t: float) -> None:
        """Publish intervals (as fast as possible) up to `t`; no snapshot is stamped after `t`."""
        while self.sim.now + self.sim.dt <= t:  # the next snapshot carries ts = now + dt
            self.step()

    def catch_up(self, processed: Callable[[], int], timeout_s: float = 300.0, slack_s: float = 2.0) -> bool:
        """Publish up to now and wait for `processed()` to reach it, until a round takes under `slack_s`."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            started = time.time()
            self.publish_until(started)
            self.producer.flush(60)
            while processed() < self.produced and time.time() < deadline:
                time.sleep(0.1)
            if time.time() - started < slack_s:
                return processed() >= self.produced
        return False

    def run_live(self, seconds: float, on_tick: Callable[[], None] | None = None) -> None:
        """Publish each interval when the wall clock reaches it, for `seconds`."""
        end = time.time() + seconds
        while time.time() < end:
            wait = self.sim.now + self.sim.dt - time.time()
            if wait > 0:
                time.sleep(min(wait, end - time.time()) if end > time.time() else 0)
                continue
            self.step()
            self.producer.flush(5)
            if on_tick is not None:
                on_tick()
