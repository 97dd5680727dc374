"""Leased claims on remediation ids in Redis: each event runs to completion once, and none is dropped silently.

``gpuwatch:claim:{id}`` holds a JSON value ``{"owner", "attempt", "claimed_at", "lease_until", "done"}`` (the
record `ClaimInfo`, written and read by `redis_keys.encode_claim` / `decode_claim`; docs/contracts.md). A
controller takes a free id with SET NX, renews its lease every third of `lease_s` while the executor runs,
and finishes by writing ``gpuwatch:outcome:{id}`` and ``done: true`` in one script, only if the claim is still
its own. A claim whose lease ran out, or whose owner is a dead process of this host (or an earlier process
that had our host name and pid, as after a container restart), was interrupted: the next controller to see the
event takes it over with a compare-and-set and decides, in the controller, whether running it again is safe.
Claims written by older gpuwatch versions (``"host:pid unix-time"``) are read as leases from that time. A JSON
claim whose fields have the wrong type (``"lease_until": "soon"``) raises `redis_keys.CorruptClaim`: nobody can tell
whether its holder is alive, so the caller sets the event aside instead of acting on a guess.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import redis

from ..schemas import redis_keys as k
from ..schemas.records import ClaimInfo

_CAS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""


@dataclass
class Claim:
    """A claim this controller holds; `interrupted_owner` is set when it took over an interrupted attempt."""

    id: str
    value: str  # the value stored in Redis now (compare-and-set operand)
    attempt: int
    interrupted_owner: str = ""


@dataclass(frozen=True)
class ClaimState:
    """What `try_claim` found: `ours` (go ahead), `done` (an outcome exists) or `busy` (a live holder)."""

    kind: Literal["ours", "done", "busy"]
    claim: Claim | None = None
    holder: str = ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class ClaimStore:
    """Claims of one controller process. Redis errors propagate (the caller retries them)."""

    def __init__(self, client: redis.Redis, *, lease_s: float, ttl_s: float, clock: Any = time.time) -> None:
        self.client = client
        self.lease_s = lease_s
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.clock = clock
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = f"{self.host}:{self.pid}:{secrets.token_hex(4)}"
        self._cas = client.register_script(_CAS)
        self._finish = client.register_script(_FINISH)

    def _value(self, attempt: int, claimed_at: float, *, done: bool = False) -> str:
        return k.encode_claim(ClaimInfo(owner=self.owner, attempt=attempt, claimed_at=round(claimed_at, 3),
                                        lease_until=round(self.clock() + self.lease_s, 3), done=done))  # fmt: skip

    def interrupted(self, info: ClaimInfo) -> bool:
        """Whether a claim's holder is gone: its lease ran out, or it was a process of this host that is dead."""
        lease_until = info.claimed_at + self.lease_s if info.lease_until is None else info.lease_until
        if self.clock() > lease_until:
            return True
        host, _, rest = info.owner.partition(":")
        pid_text, _, token = rest.partition(":")
        if host != self.host or not pid_text.isdigit():
            return False
        pid = int(pid_text)
        if pid == self.pid:
            return (
                f"{host}:{pid}:{token}" != self.owner
            )  # an earlier process with our pid (container restart)
        return not _pid_alive(pid)

    def try_claim(self, rid: str) -> ClaimState:
        """Claims `rid` if it is free or its holder was interrupted; never blocks. Raises CorruptClaim when the
        claim in Redis cannot be read (it is left as it is)."""
        key = k.claim_key(rid)
        for _ in range(3):  # the key may expire between our calls
            if self.client.exists(k.outcome_key(rid)):
                return ClaimState("done")
            now = self.clock()
            value = self._value(1, now)
            if self.client.set(key, value, nx=True, px=self.ttl_ms):
                return ClaimState("ours", Claim(rid, value, 1))
            current = self.client.get(key)
            if current is None:
                continue
            info = k.decode_claim(key, current)
            if info.done:
                return ClaimState("done")
            if not self.interrupted(info):
                return ClaimState("busy", holder=info.owner)
            value = self._value(info.attempt + 1, now)
            if self._cas(keys=[key], args=[current, value, self.ttl_ms]):
                return ClaimState("ours", Claim(rid, value, info.attempt + 1, info.owner))
        return ClaimState("busy")

    def renew(self, claim: Claim) -> bool:
        """Extends the lease; False if the claim is no longer ours (taken over after our lease ran out)."""
        value = self._value(claim.attempt, k.decode_claim(k.claim_key(claim.id), claim.value).claimed_at)
        if self._cas(keys=[k.claim_key(claim.id)], args=[claim.value, value, self.ttl_ms]):
            claim.value = value
            return True
        return False

    def finish(self, claim: Claim, fields: dict[str, str]) -> bool:
        """Stores the outcome hash and marks the claim done, atomically and only if the claim is still ours."""
        claimed_at = k.decode_claim(k.claim_key(claim.id), claim.value).claimed_at
        done = self._value(claim.attempt, claimed_at, done=True)
        pairs = [x for item in fields.items() for x in item]
        keys = [k.claim_key(claim.id), k.outcome_key(claim.id)]
        return bool(self._finish(keys=keys, args=[claim.value, done, self.ttl_ms, *pairs]))

    @contextmanager
    def held(self, claim: Claim) -> Iterator[None]:
        """Renews `claim` every third of the lease while the block runs (the executor may take minutes)."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    if not self.renew(claim):
                        return
                except redis.RedisError:
                    pass  # the lease is long enough to ride out a short outage; the next renewal tries again

        thread = threading.Thread(target=renew, name=f"gpuwatch-lease-{claim.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
