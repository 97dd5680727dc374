"""Read GPU and host risk from Redis, as written by `RiskWriter` (for schedulers, dashboards, the CLI).

    >>> from gpuwatch import RiskClient
    >>> rc = RiskClient("redis://localhost:6379/0")
    >>> g = rc.risk("node-0003", 5)
    >>> g.risk, g.alarm, g.why, g.stale
    (0.91, True, ['SBE rate 40/h, 12x its own baseline (3.3/h)'], False)

Answers are typed records (`gpuwatch.schemas.records`: `GpuRisk`, `HostRisk`, `FleetGpu`, `Risk`), read with
attribute access; `msgspec.to_builtins(answer)` gives the JSON object their schema files describe. Every GPU and
host answer carries `stale`: the newest record is older than `stale_after_s` (by `ts`, the sample time, against
this client's clock), so the number may no longer describe the GPU. A hash whose `ts` is missing or unreadable
(written by another tool, by hand, or cut short) answers `ts` and `age_s` None and `stale` True: the GPU's state
is unknown, never fresh; any other unreadable number reads as None too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from ..schemas import redis_keys as k
from ..schemas.codecs import DecodeError, decode_risk
from ..schemas.records import FleetGpu, GpuRisk, HostRisk, Risk


class RiskClient:
    """Answers about risk in Redis as typed records (`GpuRisk`, `HostRisk`, `FleetGpu`, `Risk`).

    `url_or_client` is a Redis URL or a `redis.Redis` (either `decode_responses` setting works).
    `clock` returns unix seconds (default `time.time`); staleness is judged against it.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        *,
        stale_after_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(url_or_client, str):
            self._redis: redis.Redis = redis.Redis.from_url(url_or_client, decode_responses=True)
            self._owned = True
        else:
            self._redis = url_or_client
            self._owned = False
        self.stale_after_s = stale_after_s
        self._clock = clock

    def close(self) -> None:
        """Closes the connection pool if this client created it from a URL."""
        if self._owned:
            self._redis.close()

    def __enter__(self) -> RiskClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def risk(self, host: str, gpu: int) -> GpuRisk | None:
        """The newest risk of one GPU, or None if Redis knows nothing about it.

        Fields: host, gpu_index, uuid, risk, mode, model, ts, scored_at, written_at, alarm, drain, failed, op,
        why, age_s, stale. `alarm` is the model's own call (its evaluated operating point); `failed` means the GPU
        has failed and `risk` is then 1. `why` (a GPU in alarm) lists the reasons in operator words, most severe
        first, e.g. ["SBE rate 40/h, 12x its own baseline (3.3/h)"]; [] otherwise.
        """
        raw = self._redis.hgetall(k.gpu_key(host, gpu))
        return k.decode_gpu_hash(raw, host, gpu, now=self._clock(), stale_after_s=self.stale_after_s)

    def history(self, host: str, gpu: int, n: int = 60) -> list[Risk]:
        """Up to `n` of the GPU's latest risk records (`gpuwatch.risk/1`), newest first. Raises
        `gpuwatch.schemas.codecs.DecodeError` for an entry that is not one (written by another tool)."""
        return [decode_risk(raw) for raw in self._redis.lrange(k.hist_key(host, gpu), 0, n - 1)]

    def host_risk(self, host: str) -> HostRisk | None:
        """The host's rollup, or None: its riskiest GPU and how fresh its GPUs' data is.

        Fields: host, max_risk, max_gpu, max_mode, gpus, alarms, failed (GPUs in alarm, failed), oldest_ts,
        newest_ts, written_at, stale (stale when any of its GPUs has not reported for `stale_after_s`).
        """
        raw = self._redis.hgetall(k.host_key(host))
        return k.decode_host_hash(raw, host, now=self._clock(), stale_after_s=self.stale_after_s)

    def top(self, n: int = 10) -> list[GpuRisk]:
        """The `n` riskiest GPUs of the fleet, riskiest first, as `risk()` answers (stale ones included)."""
        out: list[GpuRisk] = []
        start = 0
        while len(out) < n:
            members = self._redis.zrevrange(k.FLEET_RISK, start, start + n - 1)
            if not members:
                break
            start += len(members)
            gpus = [k.split_member(k.text(m)) for m in members]
            pipe = self._redis.pipeline(transaction=False)
            for host, gpu in gpus:
                pipe.hgetall(k.gpu_key(host, gpu))
            now = self._clock()
            # A GPU whose hash expired but which `prune` has not yet removed is skipped.
            answers = (k.decode_gpu_hash(raw, host, gpu, now=now, stale_after_s=self.stale_after_s)
                       for raw, (host, gpu) in zip(pipe.execute(), gpus, strict=True))  # fmt: skip
            out += [g for g in answers if g is not None]
        return out[:n]

    def stale_gpus(self) -> list[str]:
        """Members (``host:gpu``) whose newest record is older than `stale_after_s`, oldest first."""
        cutoff = self._clock() - self.stale_after_s
        return [k.text(m) for m in self._redis.zrangebyscore(k.LASTSEEN, "-inf", f"({cutoff!r}")]

    def alarms(self) -> list[str]:
        """Members (``host:gpu``) of the GPUs in alarm now, by the model's evaluated operating point."""
        return [k.text(m) for m in self._redis.zrange(k.FLEET_ALARM, 0, -1)]

    def failed(self) -> list[str]:
        """Members (``host:gpu``) of the GPUs that have failed (lost, a fatal XID, a row-remap failure)."""
        return [k.text(m) for m in self._redis.zrange(k.FLEET_FAILED, 0, -1)]

    def healthy_hosts(self, threshold: float | None = None) -> list[str]:
        """Hosts with no GPU in alarm or failed and whose data is not stale, least risky first; with
        `threshold`, also only those whose riskiest GPU's risk is below it (an operator's own stricter line)."""
        top = "+inf" if threshold is None else f"({float(threshold)!r}"
        hosts = [k.text(h) for h in self._redis.zrangebyscore(k.HOSTS_RISK, "-inf", top)]
        if not hosts:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for host in hosts:
            pipe.hmget(k.host_key(host), "oldest_ts", "alarms", "failed")
        now = self._clock()
        return [
            host
            for host, (oldest, alarms, failed) in zip(hosts, pipe.execute(), strict=True)
            if not k.is_stale(k.number(oldest), now, self.stale_after_s) and not k.count(alarms) and not k.count(failed)
        ]

    def fleet(self) -> list[FleetGpu]:
        """Every GPU Redis knows, in one round-trip: host, gpu_index, risk, failed, ts and stale per GPU (for
        fleet-wide sums such as the fleet forecast; `risk()` has the full record of one GPU)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrange(k.FLEET_RISK, 0, -1, withscores=True)
        pipe.zrange(k.FLEET_FAILED, 0, -1)
        pipe.zrange(k.LASTSEEN, 0, -1, withscores=True)
        risk, failed, seen = pipe.execute()
        failed_set = {k.text(m) for m in failed}
        last = {k.text(m): float(ts) for m, ts in seen}
        now, stale_after = self._clock(), self.stale_after_s
        out: list[FleetGpu] = []
        for member, score in risk:
            name = k.text(member)
            host, gpu = k.split_member(name)
            ts = last.get(name)
            out.append(FleetGpu(host=host, gpu_index=gpu, risk=float(score), failed=name in failed_set, ts=ts,
                                stale=k.is_stale(ts, now, stale_after)))  # fmt: skip
        return out

    def horizon_s(self) -> float | None:
        """The prediction horizon (s) of the newest risk record of the riskiest GPU, or None when Redis holds
        none: every GPU is scored by the same model, so one record says it for the fleet."""
        top = self._redis.zrevrange(k.FLEET_RISK, 0, 0)
        if not top:
            return None
        host, gpu = k.split_member(k.text(top[0]))
        try:
            newest = self.history(host, gpu, 1)
        except DecodeError:  # an entry written by another tool: it does not say
            return None
        return newest[0].horizon_s if newest else None
