"""`gpuwatch top`: the riskiest GPUs from Redis, redrawn in place every few seconds (ANSI, no curses).

`render` turns rows from `RiskClient.top` into a table; `run_top` polls Redis and redraws (or prints once
with ``--once``, plain text, for scripts and logs).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

import redis

from gpuwatch.config import Settings

from ..schemas import redis_keys as k
from ..schemas.records import GpuRisk
from .risk_client import RiskClient

_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
_HIDE, _SHOW = "\x1b[?25l", "\x1b[?25h"
_RED, _DIM, _BOLD, _RESET = "\x1b[31;1m", "\x1b[2m", "\x1b[1m", "\x1b[0m"
_MAX_GPU_CHARS = 40
_MAX_WHY_CHARS = 80


@dataclass(frozen=True)
class Frame:
    """One refresh: the riskiest GPUs (as `RiskClient.top` answers) and fleet-wide counts."""

    rows: list[GpuRisk]
    total: int  # GPUs with a risk in Redis
    stale: int  # of those, how many have not reported for stale_after_s
    alarms: int  # GPUs in alarm at the model's operating point
    failed: int  # GPUs that have failed
    killswitch: str | None  # the kill switch note while it is on
    at: float  # wall clock of the read


def read_frame(client: RiskClient, redis_client: redis.Redis, n: int) -> Frame:
    """Reads one frame (raises redis-py errors when Redis cannot be reached)."""
    rows = client.top(n)
    now = time.time()
    pipe = redis_client.pipeline(transaction=False)
    pipe.zcard(k.FLEET_RISK)
    pipe.zcount(k.LASTSEEN, "-inf", f"({now - client.stale_after_s!r}")
    pipe.get(k.KILLSWITCH)
    pipe.zcard(k.FLEET_ALARM)
    pipe.zcard(k.FLEET_FAILED)
    total, stale, kill, alarms, failed = pipe.execute()
    note = (
        None
        if kill is None
        else _printable(kill.decode(errors="replace") if isinstance(kill, bytes) else str(kill))
    )
    return Frame(rows, int(total), int(stale), int(alarms), int(failed), note, now)


def age(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h`` (negative ages, from clock skew, read as 0s; ``?`` unknown)."""
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def state(row: GpuRisk) -> str:
    """FAILED, DRAIN (the drain operating point holds), ALARM (the model's alarm operating point holds) or -."""
    return "FAILED" if row.failed else "DRAIN" if row.drain else "ALARM" if row.alarm else "-"


def render(frame: Frame, *, n: int, color: bool = False) -> str:
    """The table for `frame`: rank, GPU (host:index), risk, state, mode, age, stale, model, why (the first reason
    of a GPU in alarm, cut to fit); a header line first.

    Risk is the probability of failing within the hour at the fleet's failure rate, so most read 1e-05 or
    less. State is the stream's call at the model's operating points (what the policy and the alerts act on).
    With `color`, ALARM, DRAIN and FAILED rows are red, stale rows dim.
    """
    when = time.strftime("%H:%M:%S", time.localtime(frame.at))
    kill = f"kill switch ON ({frame.killswitch})" if frame.killswitch is not None else "kill switch off"
    head = (
        f"gpuwatch top  {when}  {min(n, len(frame.rows))} riskiest of {frame.total} GPUs  {frame.alarms} in alarm  "
        f"{frame.failed} failed  {frame.stale} stale  {kill}"
    )
    lines = [f"{_BOLD}{head}{_RESET}" if color else head, ""]
    if not frame.rows:
        lines.append("no risk recorded yet: is `gpuwatch sink` running and writing to this Redis?")
        return "\n".join(lines) + "\n"
    names = [_gpu_name(r) for r in frame.rows]
    model_w = max(5, *(len(_printable(r.model)) for r in frame.rows))
    width = max(3, *(len(x) for x in names))
    lines.append(f"{'#':>3}  {'GPU':<{width}}  {'RISK':>7}  {'STATE':<6}  {'MODE':<12}  {'AGE':>7}  {'STALE':<5}  {'MODEL':<{model_w}}  WHY")
    for rank, (row, name) in enumerate(zip(frame.rows, names, strict=True), 1):
        flag = state(row)
        line = (
            f"{rank:>3}  {name:<{width}}  {_risk(row.risk)}  {flag:<6}  {_printable(row.mode):<12}  "
            f"{age(row.age_s):>7}  {'STALE' if row.stale else '':<5}  {_printable(row.model):<{model_w}}  "
            f"{_why(row)}"
        ).rstrip()
        if color and row.stale:
            line = f"{_DIM}{line}{_RESET}"
        elif color and flag != "-":
            line = f"{_RED}{line}{_RESET}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _why(row: GpuRisk) -> str:
    text = _printable(row.why[0]) if row.why else ""
    return text if len(text) <= _MAX_WHY_CHARS else text[: _MAX_WHY_CHARS - 3] + "..."


def _risk(risk: float | None) -> str:
    return f"{risk:7.2g}" if risk is not None else f"{'?':>7}"


def _printable(text: str) -> str:
    # values come from Redis (host names, notes): a control character could drive the terminal
    return "".join(c if c.isprintable() else "?" for c in text)


def _gpu_name(row: GpuRisk) -> str:
    name = _printable(k.member(row.host, row.gpu_index))
    return name if len(name) <= _MAX_GPU_CHARS else name[: _MAX_GPU_CHARS - 3] + "..."


def run_top(
    settings: Settings,
    *,
    n: int = 20,
    once: bool = False,
    interval_s: float = 2.0,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
    redis_client: redis.Redis | None = None,
) -> int:
    """Shows the `n` riskiest GPUs of `settings.redis_url`; returns the exit code.

    ``once``: print one plain table and return (1 if Redis cannot be read). Otherwise redraw every
    `interval_s` until Ctrl-C or `stop` is set; Redis errors are shown in place and retried.
    Colors only when `out` is a terminal.
    """
    out = out or sys.stdout
    client_redis = redis_client or redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=3
    )
    client = RiskClient(client_redis, stale_after_s=settings.stale_after_s)
    style = {"n": n}
    stop = stop or threading.Event()
    try:
        if once:
            try:
                out.write(render(read_frame(client, client_redis, n), **style))
            except redis.RedisError as exc:
                print(f"gpuwatch top: cannot read Redis at {_where(settings)}: {exc}", file=sys.stderr)
                return 1
            return 0
        color = bool(getattr(out, "isatty", lambda: False)())
        out.write(_HIDE if color else "")
        try:
            while True:
                try:
                    text = render(read_frame(client, client_redis, n), **style, color=color)
                except redis.RedisError as exc:
                    text = f"gpuwatch top  {time.strftime('%H:%M:%S')}  Redis at {_where(settings)} unreachable: {exc}; retrying\n"
                out.write(_CLEAR + text)
                out.flush()
                if stop.wait(interval_s):
                    return 0
        except KeyboardInterrupt:
            return 0
        finally:
            out.write(_SHOW if color else "")
            out.flush()
    finally:
        if redis_client is None:
            client_redis.close()


def _where(settings: Settings) -> str:
    # the URL without credentials: redis://user:password@host -> host
    return settings.redis_url.rpartition("@")[2] or "(no redis_url)"
