"""Writes risk records into Redis (layout in `gpuwatch.schemas.redis_keys`), a whole batch per round-trip.

Each GPU's hash only ever moves forward in time: a Lua script compares the record's `ts` with the stored
one atomically, so duplicates and out-of-order records (redelivery, replays, two sinks) are dropped. A `ts`
ahead of the writer's clock (a node clock running fast) is stored as the writer's clock: a future `ts` would
read as fresh (negative age) and hold back every record of that GPU until the clock caught up with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import redis

from ..schemas import redis_keys as k
from ..schemas.codecs import encode_risk
from ..schemas.records import Risk

_FIELDS_PER_RECORD = 14

# Shared by both scripts: recompute host's rollup from its per-host sorted set (<= a few dozen GPUs).
_ROLLUP_LUA = f"""
local function rollup(host, written_at, expire_ms)
  local zkey = '{k.HOST_GPUS_PREFIX}' .. host
  local hkey = '{k.HOST_PREFIX}' .. host
  local top = redis.call('ZREVRANGE', zkey, 0, 0, 'WITHSCORES')
  if #top == 0 then
    redis.call('DEL', hkey)
    redis.call('ZREM', '{k.HOSTS_RISK}', host)
    return
  end
  local gpus = redis.call('ZRANGE', zkey, 0, -1)
  local members = {{}}
  for i, g in ipairs(gpus) do members[i] = host .. ':' .. g end
  local seen = redis.call('ZMSCORE', '{k.LASTSEEN}', unpack(members))
  local oldest, newest, oldest_s, newest_s = nil, nil, '', ''
  for _, s in ipairs(seen) do
    if s then
      local v = tonumber(s)
      if oldest == nil or v < oldest then oldest, oldest_s = v, s end
      if newest == nil or v > newest then newest, newest_s = v, s end
    end
  end
  local alarms, failed = 0, 0
  for _, gi in ipairs(gpus) do
    local f = redis.call('HMGET', '{k.GPU_PREFIX}' .. host .. ':' .. gi, 'alarm', 'failed')
    if f[1] == '1' then alarms = alarms + 1 end
    if f[2] == '1' then failed = failed + 1 end
  end
  local max_gpu = top[1]
  -- the GPU hash holds the risk as the sink wrote it ("0.9"); the score reads back as "0.90000000000000002"
  local g = redis.call('HMGET', '{k.GPU_PREFIX}' .. host .. ':' .. max_gpu, 'risk', 'mode')
  local max_risk, mode = g[1] or top[2], g[2] or 'none'
  redis.call('HSET', hkey, 'host', host, 'max_risk', max_risk, 'max_gpu', max_gpu, 'max_mode', mode,
             'gpus', tostring(#gpus), 'alarms', tostring(alarms), 'failed', tostring(failed),
             'oldest_ts', oldest_s, 'newest_ts', newest_s, 'written_at', written_at)
  redis.call('PEXPIRE', hkey, expire_ms)
  redis.call('PEXPIRE', zkey, expire_ms)
  redis.call('ZADD', '{k.HOSTS_RISK}', max_risk, host)
end
"""

# ARGV: written_at, history_len, expire_ms, then 13 fields per record:
# host, gpu, uuid, ts, risk, mode, model, scored_at, json, alarm, drain, failed (each "1" or "0"), op, why.
# Returns how many records were applied.
_WRITE_LUA = (
    _ROLLUP_LUA
    + f"""
local written_at, hist_len, expire_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local applied, touched, hosts = 0, {{}}, {{}}
for b = 4, #ARGV, {_FIELDS_PER_RECORD} do
  local host, gpu, ts = ARGV[b], ARGV[b + 1], ARGV[b + 3]
  local m = host .. ':' .. gpu
  local gkey = '{k.GPU_PREFIX}' .. m
  local cur = redis.call('HGET', gkey, 'ts')
  if (not cur) or tonumber(ts) > tonumber(cur) then
    local risk = ARGV[b + 4]
    redis.call('HSET', gkey, 'host', host, 'gpu_index', gpu, 'uuid', ARGV[b + 2], 'ts', ts, 'risk', risk,
               'mode', ARGV[b + 5], 'model', ARGV[b + 6], 'scored_at', ARGV[b + 7], 'written_at', written_at,
               'alarm', ARGV[b + 9], 'drain', ARGV[b + 10], 'failed', ARGV[b + 11], 'op', ARGV[b + 12],
               'why', ARGV[b + 13])
    if ARGV[b + 9] == '1' then redis.call('ZADD', '{k.FLEET_ALARM}', ts, m) else redis.call('ZREM', '{k.FLEET_ALARM}', m) end
    if ARGV[b + 11] == '1' then redis.call('ZADD', '{k.FLEET_FAILED}', ts, m) else redis.call('ZREM', '{k.FLEET_FAILED}', m) end
    redis.call('PEXPIRE', gkey, expire_ms)
    local hkey = '{k.HIST_PREFIX}' .. m
    redis.call('LPUSH', hkey, ARGV[b + 8])
    redis.call('LTRIM', hkey, 0, hist_len - 1)
    redis.call('PEXPIRE', hkey, expire_ms)
    redis.call('ZADD', '{k.FLEET_RISK}', risk, m)
    redis.call('ZADD', '{k.LASTSEEN}', ts, m)
    redis.call('ZADD', '{k.HOST_GPUS_PREFIX}' .. host, risk, gpu)
    applied = applied + 1
    if not touched[host] then
      touched[host] = true
      hosts[#hosts + 1] = host
    end
  end
end
for _, host in ipairs(hosts) do rollup(host, written_at, expire_ms) end
return applied
"""
)

# ARGV: cutoff (ts), limit, written_at, expire_ms. Forgets GPUs whose newest ts is older than cutoff.
_PRUNE_LUA = (
    _ROLLUP_LUA
    + f"""
local gone = redis.call('ZRANGEBYSCORE', '{k.LASTSEEN}', '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local touched, hosts = {{}}, {{}}
for _, m in ipairs(gone) do
  local host, gpu = string.match(m, '^(.*):([^:]*)$')
  redis.call('ZREM', '{k.LASTSEEN}', m)
  redis.call('ZREM', '{k.FLEET_RISK}', m)
  redis.call('ZREM', '{k.FLEET_ALARM}', m)
  redis.call('ZREM', '{k.FLEET_FAILED}', m)
  redis.call('DEL', '{k.GPU_PREFIX}' .. m, '{k.HIST_PREFIX}' .. m)
  redis.call('ZREM', '{k.HOST_GPUS_PREFIX}' .. host, gpu)
  if not touched[host] then
    touched[host] = true
    hosts[#hosts + 1] = host
  end
end
for _, host in ipairs(hosts) do rollup(host, ARGV[3], ARGV[4]) end
return #gone
"""
)


def _num(value: Any) -> str:
    # repr of a float is the shortest text that reads back as the same float, in Lua and in Python
    return repr(float(value))


class RiskWriter:
    """Writes risk records (`gpuwatch.risk/1`) to Redis with timestamp-ordered, idempotent updates.

    `history_len` records are kept per GPU; every key of a GPU expires `expire_after_s` after its last
    write. A batch is split into scripts of `chunk` records (so Redis is never blocked long) that go in
    one pipeline, i.e. one network round-trip.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        history_len: int = 60,
        expire_after_s: float = 86400.0,
        chunk: int = 500,
    ) -> None:
        if history_len < 1 or expire_after_s <= 0 or chunk < 1:
            raise ValueError("history_len and chunk must be >= 1 and expire_after_s > 0")
        self._redis = redis_client
        self.history_len = history_len
        self.expire_after_s = expire_after_s
        self._chunk = chunk
        self._expire_ms = str(math.ceil(expire_after_s * 1000))
        self._shas: dict[str, str] = {}

    def _sha(self, name: str) -> str:
        if name not in self._shas:
            self._shas[name] = str(self._redis.script_load(_WRITE_LUA if name == "write" else _PRUNE_LUA))
        return self._shas[name]

    def _evalsha_all(self, name: str, calls: list[list[str]]) -> list[Any]:
        """One pipeline of EVALSHA calls; reloads the script once if Redis lost it (restart, SCRIPT FLUSH)."""
        for attempt in (0, 1):
            sha = self._sha(name)
            pipe = self._redis.pipeline(transaction=False)
            for args in calls:
                pipe.evalsha(sha, 0, *args)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                # nothing ran (every call failed the same way), so running them again is safe
                self._shas.clear()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def write_batch(self, records: Sequence[Risk], *, written_at: float | None = None) -> int:
        """Writes `records` and returns how many were applied (the others were not newer than Redis's copy).

        `written_at` (default: now) is stored as the wall-clock time the sink wrote the record; a record's
        `ts` later than `written_at` is stored as `written_at` (the history keeps the record as it came).
        Raises redis-py errors (ConnectionError etc.) when Redis cannot be reached; retrying is safe.
        """
        if not records:
            return 0
        written_at = time.time() if written_at is None else written_at
        head = [
            _num(written_at),
            str(self.history_len),
            self._expire_ms,
        ]
        calls: list[list[str]] = []
        for start in range(0, len(records), self._chunk):
            args = list(head)
            for rec in records[start : start + self._chunk]:
                ts = _num(min(rec.ts, written_at))  # never a future ts (see the module doc)
                args += [
                    rec.host,
                    str(rec.gpu_index),
                    rec.uuid,
                    ts,
                    _num(rec.risk),
                    rec.mode,
                    rec.model,
                    _num(rec.scored_at),
                    encode_risk(rec, validate=False).decode(),  # decoded records: checked already
                    "1" if rec.alarm else "0",
                    "1" if rec.drain else "0",
                    "1" if rec.failed else "0",
                    rec.op,
                    k.why_text(rec.why),
                ]
            calls.append(args)
        return sum(int(n) for n in self._evalsha_all("write", calls))

    def prune(self, now: float | None = None, *, limit: int = 1000) -> int:
        """Forgets GPUs whose newest record is older than `expire_after_s` before `now` (default: the clock).

        Their hashes expire by themselves; this removes them from the sorted sets and host rollups too.
        Removes at most `limit` GPUs per call and returns how many it removed; call it every minute or so.
        """
        now = time.time() if now is None else now
        args = [_num(now - self.expire_after_s), str(limit), _num(now), self._expire_ms]
        return int(self._evalsha_all("prune", [args])[0])
