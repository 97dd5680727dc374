"""Read GPU and host risk from Redis, as written by `RiskWriter` (for schedulers, dashboards, the CLI).

    >>> from gpuwatch import RiskClient
    >>> rc = RiskClient("redis://localhost:6379/0")
    >>> rc.risk("node-0003", 5)
    {'host': 'node-0003', 'gpu_index': 5, 'risk': 0.91, 'mode': 'memory', ..., 'stale': False}

Every answer carries `stale`: the newest record is older than `stale_after_s` (by `ts`, the sample
time, against this client's clock), so the number may no longer describe the GPU. A hash whose `ts` is
missing or unreadable (written by another tool, by hand, or cut short) answers `ts` and `age_s` None and
`stale` True: the GPU's state is unknown, never fresh; any other unreadable number reads as None too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import redis

from ..schemas import redis_keys as k
from ..schemas.codecs import DecodeError, decode_risk
from ..schemas.records import Risk

_GPU_FLOATS = ("risk", "ts", "scored_at", "written_at")
_GPU_FLAGS = ("alarm", "drain", "failed")
_HOST_FLOATS = ("max_risk", "oldest_ts", "newest_ts", "written_at")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float | None:
    """A finite number stored as text, or None when it is missing or unreadable."""
    try:
        x = float(_text(value)) if value is not None else math.nan
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _count(value: Any) -> int:
    """A whole count stored as text (0 when missing or unreadable)."""
    x = _number(value)
    return int(x) if x is not None else 0


class RiskClient:
    """Answers about risk in Redis as plain dicts (floats, ints, strs, bools).

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

    def _is_stale(self, ts: float | None, now: float) -> bool:
        return ts is None or now - ts > self.stale_after_s

    def _gpu(self, raw: dict[Any, Any], now: float, host: str, gpu: int) -> dict[str, Any] | None:
        if not raw:
            return None
        out: dict[str, Any] = {"host": host, **{_text(key): _text(val) for key, val in raw.items()}}
        for name in _GPU_FLOATS:
            out[name] = _number(out.get(name))
        out["gpu_index"] = gpu  # the key names it; a hash's own field could be missing
        for name in _GPU_FLAGS:
            out[name] = out.get(name) == "1"
        why = out.get("why")
        out["why"] = why.split(k.WHY_SEPARATOR) if why else []
        out["age_s"] = None if out["ts"] is None else now - out["ts"]
        out["stale"] = self._is_stale(out["ts"], now)
        return out

    def _host(self, raw: dict[Any, Any], now: float) -> dict[str, Any] | None:
        if not raw:
            return None
        out: dict[str, Any] = {_text(key): _text(val) for key, val in raw.items()}
        for name in _HOST_FLOATS:
            out[name] = _number(out.get(name))
        max_gpu = _number(out.get("max_gpu"))
        out["max_gpu"] = None if max_gpu is None else int(max_gpu)
        for name in ("gpus", "alarms", "failed"):
            out[name] = _count(out.get(name))
        # A host is only as fresh as its least recently reported GPU: a silent GPU makes it stale.
        out["stale"] = self._is_stale(out["oldest_ts"], now)
        return out

    def risk(self, host: str, gpu: int) -> dict[str, Any] | None:
        """The newest risk of one GPU, or None if Redis knows nothing about it.

        Keys: host, gpu_index, uuid, risk, mode, model, ts, scored_at, written_at, alarm, drain, failed, op,
        why, age_s, stale. `alarm` is the model's own call (its evaluated operating point); `failed` means the GPU
        has failed and `risk` is then 1. `why` (a GPU in alarm) lists the reasons in operator words, most severe
        first, e.g. ["SBE rate 40/h, 12x its own baseline (3.3/h)"]; [] otherwise.
        """
        return self._gpu(self._redis.hgetall(k.gpu_key(host, gpu)), self._clock(), host, gpu)

    def history(self, host: str, gpu: int, n: int = 60) -> list[Risk]:
        """Up to `n` of the GPU's latest risk records (`gpuwatch.risk/1`), newest first. Raises
        `gpuwatch.schemas.codecs.DecodeError` for an entry that is not one (written by another tool)."""
        return [decode_risk(raw) for raw in self._redis.lrange(k.hist_key(host, gpu), 0, n - 1)]

    def host_risk(self, host: str) -> dict[str, Any] | None:
        """The host's rollup, or None: its riskiest GPU and how fresh its GPUs' data is.

        Keys: host, max_risk, max_gpu, max_mode, gpus, alarms, failed (GPUs in alarm, failed), oldest_ts,
        newest_ts, written_at, stale (stale when any of its GPUs has not reported for `stale_after_s`).
        """
        return self._host(self._redis.hgetall(k.host_key(host)), self._clock())

    def top(self, n: int = 10) -> list[dict[str, Any]]:
        """The `n` riskiest GPUs of the fleet, riskiest first, as `risk()` answers (stale ones included)."""
        out: list[dict[str, Any]] = []
        start = 0
        while len(out) < n:
            members = self._redis.zrevrange(k.FLEET_RISK, start, start + n - 1)
            if not members:
                break
            start += len(members)
            gpus = [k.split_member(_text(m)) for m in members]
            pipe = self._redis.pipeline(transaction=False)
            for host, gpu in gpus:
                pipe.hgetall(k.gpu_key(host, gpu))
            now = self._clock()
            # A GPU whose hash expired but which `prune` has not yet removed is skipped.
            answers = (self._gpu(raw, now, host, gpu) for raw, (host, gpu) in zip(pipe.execute(), gpus, strict=True))
            out += [g for g in answers if g is not None]
        return out[:n]

    def stale_gpus(self) -> list[str]:
        """Members (``host:gpu``) whose newest record is older than `stale_after_s`, oldest first."""
        cutoff = self._clock() - self.stale_after_s
        return [_text(m) for m in self._redis.zrangebyscore(k.LASTSEEN, "-inf", f"({cutoff!r}")]

    def alarms(self) -> list[str]:
        """Members (``host:gpu``) of the GPUs in alarm now, by the model's evaluated operating point."""
        return [_text(m) for m in self._redis.zrange(k.FLEET_ALARM, 0, -1)]

    def failed(self) -> list[str]:
        """Members (``host:gpu``) of the GPUs that have failed (lost, a fatal XID, a row-remap failure)."""
        return [_text(m) for m in self._redis.zrange(k.FLEET_FAILED, 0, -1)]

    def healthy_hosts(self, threshold: float | None = None) -> list[str]:
        """Hosts with no GPU in alarm or failed and whose data is not stale, least risky first; with
        `threshold`, also only those whose riskiest GPU's risk is below it (an operator's own stricter line)."""
        top = "+inf" if threshold is None else f"({float(threshold)!r}"
        hosts = [_text(h) for h in self._redis.zrangebyscore(k.HOSTS_RISK, "-inf", top)]
        if not hosts:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for host in hosts:
            pipe.hmget(k.host_key(host), "oldest_ts", "alarms", "failed")
        now = self._clock()
        return [
            host
            for host, (oldest, alarms, failed) in zip(hosts, pipe.execute(), strict=True)
            if not self._is_stale(_number(oldest), now) and not _count(alarms) and not _count(failed)
        ]

    def fleet(self) -> list[dict[str, Any]]:
        """Every GPU Redis knows, in one round-trip: host, gpu_index, risk, failed, ts and stale per GPU (for
        fleet-wide sums such as the fleet forecast; `risk()` has the full record of one GPU)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrange(k.FLEET_RISK, 0, -1, withscores=True)
        pipe.zrange(k.FLEET_FAILED, 0, -1)
        pipe.zrange(k.LASTSEEN, 0, -1, withscores=True)
        risk, failed, seen = pipe.execute()
        failed_set = {_text(m) for m in failed}
        last = {_text(m): float(ts) for m, ts in seen}
        now = self._clock()
        out = []
        for member, score in risk:
            name = _text(member)
            host, gpu = k.split_member(name)
            ts = last.get(name)
            out.append({"host": host, "gpu_index": gpu, "risk": float(score), "failed": name in failed_set,
                        "ts": ts, "stale": self._is_stale(ts, now)})  # fmt: skip
        return out

    def horizon_s(self) -> float | None:
        """The prediction horizon (s) of the newest risk record of the riskiest GPU, or None when Redis holds
        none: every GPU is scored by the same model, so one record says it for the fleet."""
        top = self._redis.zrevrange(k.FLEET_RISK, 0, 0)
        if not top:
            return None
        host, gpu = k.split_member(_text(top[0]))
        try:
            newest = self.history(host, gpu, 1)
        except DecodeError:  # an entry written by another tool: it does not say
            return None
        return newest[0].horizon_s if newest else None
