"""`gpuwatch policy`: what an operator does with the remediation policy's guard rails.

* ``status`` shows the circuit breaker, the hosts acted on in its window, escalations, the incident, the
  maintenance windows and pools, and the kill switch (``--json`` for scripts);
* ``reset-breaker --note WHO:WHY`` closes the breaker and empties its window, audited;
* ``clear-escalation HOST --note WHO:WHY`` closes a host's escalation and forgets its remediations, audited;
* ``drill`` feeds correlated high risk to the policy in memory and prints where its guard rails tripped
  (`sinks/drill.py`; nothing is read from or written to Redis).

Every mistake is one line on stderr naming the input and the fix, with a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from gpuwatch.config import ConfigError, Settings, redact_url
from gpuwatch.pools import Pools

from ..schemas import redis_keys as k
from ..schemas.codecs import encode_audit
from .guard_state import parse_record, read_guards
from .policy import FLEET_KEEP_S, PolicyRules, operator_entry

NOTE_MAX = 500


def policy_command(args: argparse.Namespace, settings: Settings) -> int:
    """Runs one `gpuwatch policy` subcommand; returns the exit code."""
    rules = PolicyRules.from_settings(settings)
    if args.policy_command == "drill":
        return _drill(args, rules)
    say = f"gpuwatch policy {args.policy_command}"
    note = ""
    if args.policy_command != "status":
        note = " ".join(str(args.note).split())
        if not note or len(note) > NOTE_MAX or not note.isprintable():
            print(f"{say}: --note must say who and why in up to {NOTE_MAX} printable characters, e.g. "
                  "--note 'alice: rack 12 cooling fixed'", file=sys.stderr)  # fmt: skip
            return 2
    if args.policy_command == "clear-escalation" and not _host_ok(args.host):
        print(f"{say}: {args.host!r} is not a host name; give the host as `gpuwatch policy status` lists it",
              file=sys.stderr)  # fmt: skip
        return 2
    if not settings.redis_url:
        raise ConfigError(f"{say} needs GPUWATCH_REDIS_URL (or redis_url in the config file)")
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        if args.policy_command == "status":
            return _status(client, rules, settings, as_json=args.json)
        if args.policy_command == "reset-breaker":
            return _reset_breaker(client, note, settings.audit_maxlen)
        return _clear_escalation(client, args.host, note, settings.audit_maxlen)
    except redis.RedisError as exc:
        print(f"{say}: cannot reach {redact_url(settings.redis_url)} ({exc}); check redis_url and that Redis is up",
              file=sys.stderr)  # fmt: skip
        return 1
    finally:
        client.close()


def _host_ok(host: str) -> bool:
    return 0 < len(host) <= 255 and host.isprintable() and not any(c.isspace() for c in host)


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def _reset_breaker(client: redis.Redis, note: str, maxlen: int) -> int:
    """Closes the breaker and empties its window, with the audit entry in the same transaction."""
    now = time.time()

    def reset(pipe: Any) -> dict[str, Any] | None:
        breaker = parse_record(pipe.get(k.POLICY_BREAKER))
        if breaker is None:
            return None
        detail = (f"circuit breaker reset by an operator ({note}); it was open since {_when(breaker.get('now'))}: "
                  f"{breaker.get('detail', '')}")  # fmt: skip
        pipe.multi()
        pipe.delete(k.POLICY_BREAKER, k.POLICY_DISRUPTED)
        pipe.xadd(k.AUDIT, {"json": encode_audit(operator_entry(now, "breaker", detail))}, maxlen=maxlen,
                  approximate=True)  # fmt: skip
        return breaker

    # redis-py types the callable as returning None; with value_from_callable the transaction returns its value.
    breaker = cast(
        "dict[str, Any] | None",
        client.transaction(cast(Any, reset), k.POLICY_BREAKER, value_from_callable=True),
    )
    if breaker is None:
        print("the circuit breaker is closed; nothing to reset")
        return 0
    print(f"circuit breaker closed (it was open since {_when(breaker.get('now'))}); the policy acts again on its "
          "next records. Audited.")  # fmt: skip
    return 0


def _clear_escalation(client: redis.Redis, host: str, note: str, maxlen: int) -> int:
    """Closes `host`'s escalation and forgets its remediations, with the audit entry in the same transaction."""
    now = time.time()

    def clear(pipe: Any) -> dict[str, Any] | None:
        record = parse_record(pipe.hget(k.POLICY_ESCALATIONS, host))
        if record is None:
            return None
        detail = f"escalation of {host} cleared by an operator ({note}); it said: {record.get('detail', '')}"
        pipe.multi()
        pipe.hdel(k.POLICY_ESCALATIONS, host)
        pipe.delete(k.remediated_key(host))
        pipe.xadd(k.AUDIT, {"json": encode_audit(operator_entry(now, "escalation", detail, host))}, maxlen=maxlen,
                  approximate=True)  # fmt: skip
        return record

    record = cast(
        "dict[str, Any] | None",
        client.transaction(cast(Any, clear), k.POLICY_ESCALATIONS, value_from_callable=True),
    )
    if record is None:
        open_hosts = sorted(
            h.decode() if isinstance(h, bytes) else str(h) for h in client.hkeys(k.POLICY_ESCALATIONS)
        )
        listed = ", ".join(open_hosts) if open_hosts else "none"
        print(f"gpuwatch policy clear-escalation: host {host!r} has no open escalation (open: {listed}); see "
              "`gpuwatch policy status`", file=sys.stderr)  # fmt: skip
        return 1
    print(f"escalation of {host} cleared; its remediation history is forgotten. Audited.")
    return 0


def _status(client: redis.Redis, rules: PolicyRules, settings: Settings, *, as_json: bool) -> int:
    now = time.time()
    state = read_guards(client, now, rules.breaker_window_s, FLEET_KEEP_S, rules.stale_after_s)
    pools = Pools(rules.pool_pattern)
    limit = rules.breaker_limit(state["fleet_hosts"])
    windows = [
        {"window": w.text, "pool": w.pool or "fleet-wide", "active_now": w.covers(w.pool or "", now)}
        for w in rules.maintenance
    ]
    status = {
        **state,
        "breaker_on": rules.breaker_share > 0,
        "breaker_limit_hosts": limit,
        "breaker_window_s": rules.breaker_window_s,
        "max_unhealthy_hosts": rules.max_unhealthy_hosts,
        "escalate_after": rules.escalate_after,
        "pool_pattern": rules.pool_pattern,
        "pool_max_drains": rules.pool_max_drains,
        "disrupted_pools": {h: pools.of(h) for h in state["disrupted"]},
        "maintenance": windows,
        "now": now,
    }
    if as_json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(_status_text(status, rules, now))
    return 0


def _status_text(s: dict[str, Any], rules: PolicyRules, now: float) -> str:
    lines = []
    b = s["breaker"]
    acted = ", ".join(sorted(s["disrupted"])) or "none"
    share = f"{rules.breaker_share:.3g} of {s['fleet_hosts']} hosts, at least {rules.breaker_min_hosts}"
    if not s["breaker_on"]:
        lines.append("circuit breaker   off (policy_breaker_share = 0)")
    elif b is not None:
        lines.append(f"circuit breaker   OPEN since {_when(b.get('now'))}: {b.get('detail', '')}")
        lines.append("                  close it with: gpuwatch policy reset-breaker --note 'who: why'")
    else:
        lines.append(f"circuit breaker   closed; {len(s['disrupted'])} of {s['breaker_limit_hosts']} hosts ({share}) "
                     f"acted on in the last {rules.breaker_window_s:g} s: {acted}")  # fmt: skip
    if not rules.max_unhealthy_hosts:
        lines.append(
            f"incident          off (policy_max_unhealthy_hosts = 0); {s['unhealthy_hosts']} hosts unhealthy"
        )
    elif s["incident"] is not None:
        lines.append(f"incident          YES since {_when(s['incident'].get('now'))}: {s['unhealthy_hosts']} hosts "
                     f"unhealthy, more than {rules.max_unhealthy_hosts}; the policy takes no action")  # fmt: skip
    else:
        lines.append(
            f"incident          none; {s['unhealthy_hosts']} hosts unhealthy (limit {rules.max_unhealthy_hosts})"
        )
    if not s["escalations"]:
        lines.append(
            "escalations       none" + ("" if rules.escalate_after else " (policy_escalate_after = 0: off)")
        )
    for i, (host, e) in enumerate(sorted(s["escalations"].items())):
        label = "escalations" if i == 0 else ""
        lines.append(f"{label:<18}{host} since {_when(e.get('now'))}: {e.get('detail', '')}")
    if not s["maintenance"]:
        lines.append("maintenance       no windows (policy_maintenance_windows)")
    for i, w in enumerate(s["maintenance"]):
        label = "maintenance" if i == 0 else ""
        active = "  ACTIVE NOW" if w["active_now"] else ""
        lines.append(f"{label:<18}{w['window']} ({w['pool']}){active}")
    pools = (
        f"pattern {rules.pool_pattern!r}"
        if rules.pool_pattern
        else "one pool, fleet (policy_pool_pattern empty)"
    )
    limit = (
        f"at most {rules.pool_max_drains} draining per pool" if rules.pool_max_drains else "no per-pool limit"
    )
    lines.append(f"pools             {pools}; {limit}")
    kill = s["killswitch"]
    lines.append(f"kill switch       {'ON (' + kill + ')' if kill is not None else 'off'}")
    return "\n".join(lines)


def _drill(args: argparse.Namespace, rules: PolicyRules) -> int:
    from .drill import drill_table, run_drill

    if args.fleet_hosts < 1 or args.gpus_per_host < 1 or not 1 <= args.rack_hosts <= args.fleet_hosts:
        print(f"gpuwatch policy drill: need --fleet-hosts >= 1, --gpus-per-host >= 1 and 1 <= --rack-hosts <= "
              f"--fleet-hosts (got {args.fleet_hosts}, {args.gpus_per_host}, {args.rack_hosts})",
              file=sys.stderr)  # fmt: skip
        return 2
    if not 0 < args.hours <= 48:
        print(f"gpuwatch policy drill: --hours must be in (0, 48], got {args.hours}", file=sys.stderr)
        return 2
    results = run_drill(rules, fleet_hosts=args.fleet_hosts, rack_hosts=args.rack_hosts,
                        gpus_per_host=args.gpus_per_host, duration_s=args.hours * 3600)  # fmt: skip
    print(f"gpuwatch policy drill: the policy with the settings' rules (breaker {rules.breaker_share:g} of the fleet "
          f"per {rules.breaker_window_s:g} s, at least {rules.breaker_min_hosts} hosts; blast radius "
          f"{rules.max_concurrent_drains}; escalation after {rules.escalate_after}; incident above "
          f"{rules.max_unhealthy_hosts} unhealthy hosts)\n")  # fmt: skip
    print(drill_table(results))
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps({"scenarios": results, "measured_at": time.time()},
                                      option=orjson.OPT_INDENT_2))  # fmt: skip
        print(f"figures written to {path}")
    return 0
