"""The policy's fleet-level guard rails as a specification: each trips on a burst of correlated high risk where it
should and nowhere else. Pure logic first (state in memory), then the shared state in a real redis-server, the
`gpuwatch policy` commands, and the sink's wiring (metrics)."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis
from prometheus_client import REGISTRY

from gpuwatch.apps.cli import main
from gpuwatch.config import ConfigError, Settings, load_settings
from gpuwatch.pools import FLEET_POOL, OTHER_POOL, Pools, parse_maintenance_windows
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.records import AuditEntry, Remediation, Risk
from gpuwatch.sinks.drill import T0, risk_record, run_scenario
from gpuwatch.sinks.guard_state import ADMITTED, OPEN, TRIPPED, MemoryGuardState, RedisGuardState
from gpuwatch.sinks.policy import PolicyRules, RemediationPolicy, read_audit, remediation_count
from gpuwatch.sinks.remediation_sink import export_guards, make_policy

DAY = 86400.0
# Production defaults for everything else; the breaker's floor at 1 host so that the share alone sets the limit.
RULES = dataclasses.replace(PolicyRules.from_settings(Settings()), breaker_min_hosts=1)


def drain(host: str, gpu: int, t: float, base: float = T0) -> Risk:
    return risk_record(host, gpu, base + t, ("drain", "memory", 0.0))


def quiet(host: str, gpu: int, t: float, base: float = T0) -> Risk:
    return risk_record(host, gpu, base + t, None)


def failed(host: str, gpu: int, t: float, since: float) -> Risk:
    return risk_record(host, gpu, T0 + t, ("failed", "memory", T0 + since))


class Fleet:
    """A policy fed at 10 s steps with now = record time; `hosts` quiet hosts make up the fleet."""

    def __init__(self, hosts: int = 100, guards: Any = None, **rules: Any) -> None:
        self.audit: list[AuditEntry] = []
        self.trips: list[str] = []
        self.events: list[Remediation] = []
        self.policy = RemediationPolicy(
            dataclasses.replace(RULES, **rules), audit=self.audit.extend, on_trip=self.trips.append,
            guards=guards if guards is not None else MemoryGuardState(),
        )  # fmt: skip
        self.hosts = [f"node-{i:04d}" for i in range(hosts)]
        self.feed(0, [quiet(h, 0, 0) for h in self.hosts])

    def feed(self, t: float, records: list[Risk]) -> list[Remediation]:
        out = self.policy.observe(records, T0 + t)
        self.events += out
        return out

    def run(self, start: float, end: float, records: Any) -> list[Remediation]:
        out = []
        t = start
        while t <= end:
            out += self.feed(t, records(t))
            t += 10
        return out

    def decisions(self, decision: str) -> list[tuple[Any, Any]]:
        return [(a.reason, a.host) for a in self.audit if a.decision == decision]


def disrupted(events: list[Remediation]) -> set[str]:
    return {e.host for e in events if e.action in ("migrate", "reboot", "repair")}


# ------------------------------------------------------------------------------ circuit breaker


def test_a_rack_wide_cooling_failure_trips_the_breaker_before_more_than_the_share_is_drained() -> None:
    r = run_scenario("rack-cooling", RULES, fleet_hosts=100, rack_hosts=10, gpus_per_host=4, duration_s=3000)
    assert r["breaker_limit_hosts"] == 5 == r["share_of_fleet_hosts"]  # 5 % of 100 hosts
    assert r["breaker_opened_at_s"] is not None and r["tripped"]["breaker"] == 1
    # It opens when the sixth host would be drained: five were, none after it opened.
    assert r["hosts_disrupted_before_breaker"] == r["hosts_disrupted"] == 5
    assert r["events"]["checkpoint"] == 40  # checkpoints are not disruptive: every GPU of the rack got one
    assert (
        r["suppressed"]["breaker"] > 0 and "escalation" not in r["tripped"] and "incident" not in r["tripped"]
    )


def test_a_bad_driver_rollout_trips_the_breaker_then_the_incident() -> None:
    rules = dataclasses.replace(RULES, max_unhealthy_hosts=10)
    r = run_scenario("driver-rollout", rules, fleet_hosts=60, rack_hosts=10, gpus_per_host=2, duration_s=1800)
    assert r["breaker_limit_hosts"] == 3 and r["hosts_disrupted"] == 3  # 5 % of 60
    assert r["tripped"] == {"breaker": 1, "incident": 1}  # 11 hosts lost their GPUs: an incident
    assert r["events"] == {"repair": 6}  # every GPU of the three hosts


def test_independent_failures_trip_nothing() -> None:
    r = run_scenario("independent", RULES, fleet_hosts=60, rack_hosts=10, gpus_per_host=8, duration_s=5400)
    assert r["tripped"] == {} and r["breaker_opened_at_s"] is None
    assert r["hosts_disrupted"] == 3 and r["events"]["repair"] == 3 and r["events"]["migrate"] == 3


def test_the_breaker_counts_hosts_not_gpus_and_forgets_them_after_its_window() -> None:
    f = Fleet(hosts=100, max_concurrent_drains=100)
    # Five hosts, all eight GPUs each: five hosts, within the limit of five.
    f.run(0, 60, lambda t: [drain(h, g, t) for h in f.hosts[:5] for g in range(8)])
    assert len(disrupted(f.events)) == 5 and f.trips == []
    # An hour later those five are out of the window: five more may go, the sixth host in the window trips it.
    f.run(3700, 3760, lambda t: [drain(h, 0, t) for h in f.hosts[10:16]])
    assert len(disrupted(f.events)) == 10 and f.trips == ["breaker"]
    assert f.decisions("tripped") == [("breaker", f.hosts[15])]


def test_an_open_breaker_holds_repairs_but_not_checkpoints_and_stays_open() -> None:
    f = Fleet(hosts=20, breaker_share=0.05, breaker_min_hosts=1, max_concurrent_drains=10)  # limit 1 host
    f.run(0, 60, lambda t: [drain(h, 0, t) for h in f.hosts[:2]])
    assert f.trips == ["breaker"] and len(disrupted(f.events)) == 1
    # A day later: a failure on a third host is held, an alarm on a fourth is still checkpointed.
    later = f.run(DAY, DAY + 60, lambda t: [failed(f.hosts[2], 1, t, DAY), drain(f.hosts[3], 0, t)])
    assert [(e.action, e.host) for e in later] == [("checkpoint", f.hosts[3])]
    held = {(a.action, a.reason) for a in f.audit if a.decision == "suppressed"}
    assert {("repair", "breaker"), ("migrate", "breaker")} <= held


# ------------------------------------------------------------------------------ escalation


def test_remediations_less_than_a_drain_hold_apart_are_one() -> None:
    assert remediation_count([], 3600) == 0
    assert (
        remediation_count([0, 10, 3000, 6000], 3600) == 1
    )  # a chain of GPUs, each within the hold of the last
    assert remediation_count([0, 10, 7200, DAY], 3600) == 3


def test_a_host_remediated_twice_in_seven_days_is_escalated_instead_of_remediated_again() -> None:
    f = Fleet(hosts=20, cooldown_s=0)
    host, other = f.hosts[3], f.hosts[4]
    f.run(0, 60, lambda t: [drain(host, 0, t)])  # remediation 1: migrate
    f.run(2 * DAY, 2 * DAY + 60, lambda t: [failed(host, 1, t, 2 * DAY)])  # remediation 2: repair
    assert [e.action for e in f.events] == ["checkpoint", "migrate", "repair"] and f.trips == []
    third = f.run(3 * DAY, 3 * DAY + 60, lambda t: [drain(host, 2, t), drain(other, 2, t)])
    # The host gets its checkpoint, not a third migrate: a human is asked instead; the other host is remediated.
    assert sorted((e.action, e.host) for e in third) == [
        ("checkpoint", host), ("checkpoint", other), ("migrate", other)
    ]  # fmt: skip
    assert f.trips == ["escalation"] and f.decisions("tripped") == [("escalation", host)]
    assert set(f.policy.guard_view.escalated) == {host}
    # Any disruptive action on the escalated host waits for the operator, audited once.
    f.run(3 * DAY + 70, 3 * DAY + 200, lambda t: [failed(host, 5, t, 3 * DAY + 70)])
    assert ("escalated", host) in f.decisions("suppressed") and f.trips == ["escalation"]


def test_one_remediation_of_many_gpus_at_once_is_not_escalated() -> None:
    f = Fleet(hosts=20, cooldown_s=0)
    host = f.hosts[3]
    f.run(0, 60, lambda t: [drain(host, 0, t)])  # remediation 1
    # Two days later a rack event: all eight GPUs at once is one remediation of the host (the second), not eight.
    f.run(2 * DAY, 2 * DAY + 60, lambda t: [drain(host, g, t) for g in range(1, 9)])
    assert [e.action for e in f.events].count("migrate") == 9 and f.trips == []


def test_remediations_more_than_seven_days_apart_are_not_escalated() -> None:
    f = Fleet(hosts=20, cooldown_s=0)
    host = f.hosts[3]
    for day, gpu in ((0, 0), (8, 1), (16, 2)):
        f.run(day * DAY, day * DAY + 60, lambda t, g=gpu: [drain(host, g, t)])
    assert [e.action for e in f.events].count("migrate") == 3 and f.trips == []


# ------------------------------------------------------------------------------ incident


def test_too_many_unhealthy_hosts_is_an_incident_no_action_is_taken_until_fewer() -> None:
    f = Fleet(hosts=40, max_unhealthy_hosts=3)
    assert (
        f.run(0, 30, lambda t: [drain(h, 0, t) for h in f.hosts[:4]]) == []
    )  # four hosts: not even a checkpoint
    assert f.trips == ["incident"] and f.decisions("tripped") == [("incident", None)]
    # Two recover (their records are quiet again): three unhealthy is not more than three, the policy acts.
    out = f.run(
        40, 100, lambda t: [drain(h, 0, t) for h in f.hosts[:2]] + [quiet(h, 0, t) for h in f.hosts[2:4]]
    )
    assert ("incident", None) in f.decisions("cleared")
    assert {(e.action, e.host) for e in out} >= {("checkpoint", f.hosts[0]), ("checkpoint", f.hosts[1])}
    assert f.trips == ["incident"]


def test_old_failures_waiting_for_repair_are_not_an_incident() -> None:
    f = Fleet(hosts=40, max_unhealthy_hosts=3, breaker_share=0.0)
    # Five hosts with a GPU that failed two hours ago (past the breaker's window) and still reports failed.
    f.run(0, 30, lambda t: [failed(h, 0, t, -7200) for h in f.hosts[:5]] + [drain(f.hosts[9], 0, t)])
    assert f.trips == [] and ("checkpoint", f.hosts[9]) in {(e.action, e.host) for e in f.events}


# ------------------------------------------------------------------------------ pools and maintenance


def test_a_pool_limit_holds_a_third_host_of_its_pool_and_no_other_pool() -> None:
    f = Fleet(hosts=100, pool_pattern=r"^(node-\d{3})\d$", pool_max_drains=2, max_concurrent_drains=10)
    rack_a, rack_b = f.hosts[10:13], f.hosts[20:21]  # pools node-001 and node-002
    f.run(0, 100, lambda t: [drain(h, 0, t) for h in rack_a + rack_b])
    migrated = sorted(e.host for e in f.events if e.action == "migrate")
    assert migrated == [*rack_a[:2], *rack_b]
    assert f.decisions("suppressed") == [("pool_limit", rack_a[2])] and f.trips == ["pool_limit"]


def test_a_maintenance_window_holds_disruptive_actions_of_its_pool_only() -> None:
    start = datetime.fromtimestamp(T0, UTC).strftime("%Y-%m-%dT%H:%MZ")
    end = datetime.fromtimestamp(T0 + 3600, UTC).strftime("%Y-%m-%dT%H:%MZ")
    windows = parse_maintenance_windows(f"node-001@{start}/{end}")
    f = Fleet(hosts=40, pool_pattern=r"^(node-\d{3})\d$", maintenance=windows)
    inside, outside = f.hosts[12], f.hosts[25]
    f.run(0, 100, lambda t: [drain(inside, 0, t), drain(outside, 0, t)])
    assert sorted((e.action, e.host) for e in f.events) == [
        ("checkpoint", inside), ("checkpoint", outside), ("migrate", outside)
    ]  # fmt: skip
    assert f.decisions("suppressed") == [("maintenance", inside)]
    # After the window the migrate still due goes out on fresh records.
    assert [e.action for e in f.run(3700, 3700, lambda t: [drain(inside, 0, t)])] == ["migrate"]


def test_maintenance_windows_are_well_defined() -> None:
    mon = datetime(2025, 6, 16, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC
    [w] = parse_maintenance_windows("Sun 22:00-02:00")  # crosses midnight into Monday
    assert w.covers("any", mon - 3600) and w.covers("any", mon + 3600) and not w.covers("any", mon + 3 * 3600)
    assert not w.covers("any", mon - 3 * 3600) and not w.covers("any", mon + DAY - 3600)  # Monday 23:00
    [daily, once] = parse_maintenance_windows(
        " rack-7@daily 00:00-24:00 ; 2025-06-16T01:00Z/2025-06-16T02:00Z;"
    )
    assert daily.covers("rack-7", mon + 5) and not daily.covers("rack-8", mon + 5)
    assert once.covers("rack-8", mon + 3600) and not once.covers("rack-8", mon + 7200)
    for bad, says in [
        ("Sat 02:00", "expected 'DAY HH:MM-HH:MM'"), ("Frei 02:00-03:00", "'Frei' is not a day"),
        ("Sat 02:60-03:00", "02:60 is not a time of day"), ("Sat 03:00-03:00", "start and end must differ"),
        ("@Sat 02:00-03:00", "the pool before '@' is empty"),
        ("2025-06-16T02:00Z/2025-06-16T01:00Z", "the end must be after the start"),
        ("2025-13-16T02:00Z/2025-13-16T03:00Z", "is not a date and time"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=says):
            parse_maintenance_windows(bad)


def test_pools_come_from_host_names() -> None:
    assert Pools("").of("node-0012") == FLEET_POOL
    racks = Pools(r"^(node-\d{3})\d$")
    assert (racks.of("node-0012"), racks.of("node-0019"), racks.of("login-1")) == (
        "node-001",
        "node-001",
        OTHER_POOL,
    )
    assert Pools(r"^[a-z]+").of("gpu-17") == "gpu"  # no group: the whole match
    with pytest.raises(ValueError, match="at most one"):
        Pools(r"(a)(b)")


def test_settings_turn_the_guard_rails_on_replays_leave_them_off_and_bad_values_are_one_line_errors() -> None:
    on, off = PolicyRules.from_settings(Settings()), PolicyRules.from_settings(Settings(), fleet_guards=False)
    assert (on.breaker_share, on.escalate_after, on.max_unhealthy_hosts) == (0.05, 2, 20)
    assert (off.breaker_share, off.escalate_after, off.max_unhealthy_hosts) == (
        0.0,
        0,
        0,
    ) and PolicyRules() == off
    for var, value, says in [
        ("GPUWATCH_POLICY_POOL_PATTERN", "(rack", "'(rack' is not a regular expression"),
        ("GPUWATCH_POLICY_MAINTENANCE_WINDOWS", "Sat 25:00-02:00", "25:00 is not a time of day"),
        ("GPUWATCH_POLICY_BREAKER_SHARE", "5", "must be a number in [0, 1]"),
    ]:
        with pytest.raises(ConfigError, match="environment variable " + var) as err:
            load_settings(env={var: value})
        assert says in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ shared state in Redis


def test_redis_admits_a_host_once_and_opens_the_breaker_at_the_limit(redis_client: redis.Redis) -> None:
    state = RedisGuardState(redis_client)
    trip = {"detail": "test", "now": T0}
    assert [state.admit(h, T0, 3600, 2, trip) for h in ("a", "a", "b", "a")] == [ADMITTED] * 4
    assert state.admit("c", T0 + 1, 3600, 2, trip) == TRIPPED
    assert state.admit("a", T0 + 2, 3600, 2, trip) == OPEN  # open: not even a host already counted
    assert orjson.loads(redis_client.get(k.POLICY_BREAKER)) == trip
    redis_client.delete(k.POLICY_BREAKER)
    assert state.admit("c", T0 + 3601, 3600, 2, trip) == ADMITTED  # a and b left the window


def test_replicas_share_the_breaker_and_a_restarted_sink_finds_it_open(
    redis_client: redis.Redis,
    redis_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    settings = Settings(
        redis_url=redis_server.url, policy_breaker_min_hosts=1, policy_max_concurrent_drains=100
    )
    base = float(int(time.time())) - 600  # `gpuwatch policy status` counts on the wall clock
    before = REGISTRY.get_sample_value("gpuwatch_policy_trips_total", {"guard": "breaker"}) or 0.0
    replicas = [make_policy(settings, redis_client) for _ in range(2)]  # as `gpuwatch sink` builds it, twice
    hosts = [f"node-{i:04d}" for i in range(60)]  # limit: 5 % of 60 = 3 hosts
    events: list[Remediation] = []
    for t in range(0, 200, 10):
        for i, replica in enumerate(replicas):  # each replica reads the hosts of its partitions: here, half
            mine = hosts[i::2]
            records = [drain(h, 0, t, base) for h in mine[:5]] + (
                [quiet(h, 1, t, base) for h in mine] if t == 0 else []
            )
            events += replica.observe(records, base + t)
    assert len(disrupted(events)) == 3  # three hosts in all, not three per replica
    audit = read_audit(redis_client)
    assert [a.reason for a in audit if a.decision == "tripped"] == ["breaker"]  # one trip, one record
    assert REGISTRY.get_sample_value("gpuwatch_policy_trips_total", {"guard": "breaker"}) == before + 1
    export_guards(replicas[1])
    assert REGISTRY.get_sample_value("gpuwatch_policy_breaker_open") == 1.0
    assert REGISTRY.get_sample_value("gpuwatch_policy_fleet_hosts") == 60.0

    restarted = make_policy(settings, redis_client)
    assert [e.action for e in restarted.observe([drain(hosts[50], 0, 300, base)], base + 300)] == [
        "checkpoint"
    ]
    assert restarted.observe([drain(hosts[50], 0, 370, base)], base + 370) == []  # its migrate is held
    assert restarted.guard_view.breaker is not None
    assert (read_audit(redis_client, count=1)[0].reason, read_audit(redis_client, count=1)[0].host) == (
        "breaker", hosts[50]
    )  # fmt: skip

    monkeypatch.setenv("GPUWATCH_REDIS_URL", redis_server.url)
    assert main(["policy", "status", "--json"]) == 0
    status = orjson.loads(capsys.readouterr().out)
    assert (
        status["breaker"]["reason"] == "breaker"
        and len(status["disrupted"]) == 3
        and status["fleet_hosts"] == 60
    )
    assert main(["policy", "status"]) == 0 and "circuit breaker   OPEN since" in capsys.readouterr().out
    assert main(["policy", "reset-breaker", "--note", "alice: rack 1 cooling fixed"]) == 0
    reset = read_audit(redis_client, count=1)[0]
    assert (reset.decision, reset.reason) == (
        "reset",
        "breaker",
    ) and "alice: rack 1 cooling fixed" in reset.detail
    assert not redis_client.exists(k.POLICY_BREAKER, k.POLICY_DISRUPTED)
    # Closed and its window emptied: the migrate still due goes out on the next fresh record.
    assert [e.action for e in restarted.observe([drain(hosts[50], 0, 400, base)], base + 400)] == [
        "migrate"
    ]
    export_guards(restarted)
    assert REGISTRY.get_sample_value("gpuwatch_policy_breaker_open") == 0.0


def test_escalations_live_in_redis_until_an_operator_clears_them(
    redis_client: redis.Redis,
    redis_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    settings = Settings(redis_url=redis_server.url, policy_cooldown_s=0.0)
    host, base = "node-0003", time.time() - 3 * DAY
    for day, gpu in ((0, 0), (1, 1), (2, 2)):  # a fresh policy each day: what it knows is in Redis
        policy = make_policy(settings, redis_client)
        for t in range(0, 70, 10):
            policy.observe([drain(host, gpu, day * DAY + t, base)], base + day * DAY + t)
    assert set(redis_client.hkeys(k.POLICY_ESCALATIONS)) == {host.encode()}
    monkeypatch.setenv("GPUWATCH_REDIS_URL", redis_server.url)
    assert main(["policy", "status"]) == 0 and f"escalations       {host} since" in capsys.readouterr().out
    assert main(["policy", "clear-escalation", "node-0099", "--note", "bob: wrong host"]) == 1
    assert "host 'node-0099' has no open escalation (open: node-0003)" in capsys.readouterr().err
    assert main(["policy", "clear-escalation", host, "--note", "bob: replaced the board"]) == 0
    assert not redis_client.exists(k.POLICY_ESCALATIONS, k.remediated_key(host))
    cleared = read_audit(redis_client, count=1)[0]
    assert (cleared.decision, cleared.reason, cleared.host) == ("reset", "escalation", host)


@pytest.mark.parametrize(
    ("argv", "env", "code", "says"),
    [
        (["reset-breaker", "--note", " "], {}, 2, "--note must say who and why"),
        (["reset-breaker", "--note", "a\x1b[2Jb"], {}, 2, "--note must say who and why"),
        (["clear-escalation", "node 1", "--note", "x: y"], {}, 2, "'node 1' is not a host name"),
        (["status"], {"GPUWATCH_REDIS_URL": ""}, 2, "gpuwatch policy status needs GPUWATCH_REDIS_URL"),
        (
            ["status"],
            {"GPUWATCH_REDIS_URL": "redis://127.0.0.1:1/0"},
            1,
            "cannot reach redis://127.0.0.1:1/0",
        ),
        (["drill", "--rack-hosts", "0"], {}, 2, "1 <= --rack-hosts <= --fleet-hosts"),
    ],
)
def test_policy_commands_say_in_one_line_what_is_wrong(
    argv: list[str], env: dict[str, str], code: int, says: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["policy", *argv]) == code
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err
