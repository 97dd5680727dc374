"""Throttle before you drain (issue 17): the agent's power limiter on the NVML stand-in, the signed throttle and
restore commands, the policy's throttle step and the simulator's power cap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import orjson
import pytest

from gpuwatch.config import ConfigError, Settings, load_settings
from gpuwatch.costs import CostModel
from gpuwatch.producers.commands import CommandListener, Handled
from gpuwatch.producers.throttle import PowerLimiter, Saved, ThrottleState
from gpuwatch.schemas.codecs import decode_remediation, encode_remediation
from gpuwatch.schemas.records import Command, Remediation, Risk
from gpuwatch.signing import MemoryNonceStore, sign
from gpuwatch.simulator.fake_nvml import FakeNvml
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.sinks.policy import PolicyRules, RemediationPolicy

HOST = "node-0003"
KEY = "controller-key-7f3a9c1e5b"
T0 = 1_750_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def nvml(privileged: bool = True) -> FakeNvml:
    fake = FakeNvml(2, privileged=privileged)
    fake.nvmlInit()
    return fake


def throttle(gpu: int, uuid: str, *, frac: float | None = 0.7, watts: float | None = None,
             mhz: int | None = None, clock_frac: float | None = None, duration_s: float = 600.0,
             action: str = "throttle") -> Command:  # fmt: skip
    extra: dict[str, object] = {"power_limit_frac": frac} if frac is not None else {}
    if watts is not None:
        extra = {"power_limit_w": watts}
    if mhz is not None:
        extra = {"sm_clock_max_mhz": mhz}
    if clock_frac is not None:
        extra = {"sm_clock_frac": clock_frac}
    return Command(id="t1", host=HOST, gpu_index=gpu, uuid=uuid, action=action, reason="test", risk=0.9,  # type: ignore[arg-type]
                   nonce="0" * 32, issued_at=1.0, expires_at=2.0, sig="0" * 64,
                   duration_s=duration_s if action == "throttle" else msgspec.UNSET, **extra)  # fmt: skip


def limiter(tmp_path: Path, fake: FakeNvml, clock: Clock) -> PowerLimiter:
    return PowerLimiter(fake, ThrottleState(tmp_path / "throttle.json"), clock=clock)


def limit_w(fake: FakeNvml, gpu: int) -> float:
    return fake.nvmlDeviceGetEnforcedPowerLimit(fake.nvmlDeviceGetHandleByIndex(gpu)) / 1000


def sm_mhz(fake: FakeNvml, gpu: int) -> int:
    return fake.nvmlDeviceGetClockInfo(fake.nvmlDeviceGetHandleByIndex(gpu), fake.NVML_CLOCK_SM)


# ---------------------------------------------------------------- the agent's power limiter


def test_throttle_saves_the_limit_before_changing_it_and_restores_it_when_its_time_runs_out(tmp_path: Path) -> None:
    fake, clock = nvml(), Clock()
    seen: list[object] = []
    real_set = fake.nvmlDeviceSetPowerManagementLimit

    def set_limit(handle: object, mw: int) -> None:  # what the state file holds at the moment NVML changes
        seen.append(orjson.loads((tmp_path / "throttle.json").read_bytes()))
        real_set(handle, mw)

    fake.nvmlDeviceSetPowerManagementLimit = set_limit  # type: ignore[method-assign]
    lim = limiter(tmp_path, fake, clock)
    done = lim(throttle(1, fake.gpus[1].uuid, frac=0.7, duration_s=600.0))
    assert done.ok and limit_w(fake, 1) == 490.0 and limit_w(fake, 0) == 700.0
    assert seen[0][0]["original_mw"] == 700_000 and seen[0][0]["limit_mw"] == 490_000
    # a second throttle keeps the saved original and moves the end of the hold
    fake.gpus[1].power_limit_mw = 490_000
    clock.now += 300
    assert lim(throttle(1, fake.gpus[1].uuid, watts=400.0, duration_s=600.0)).ok and limit_w(fake, 1) == 400.0
    clock.now += 400  # 700 s after the first throttle, 400 s after the second: still held
    assert lim.restore_due() == [] and limit_w(fake, 1) == 400.0
    clock.now += 200
    restored = lim.restore_due()
    assert [h.ok for h in restored] == [True] and limit_w(fake, 1) == 700.0
    assert ThrottleState(tmp_path / "throttle.json").load() == {}


def test_throttle_is_clamped_to_the_boards_constraints_and_the_stand_in_refuses_a_limit_outside_them(
    tmp_path: Path,
) -> None:
    fake = nvml()
    done = limiter(tmp_path, fake, Clock())(throttle(0, fake.gpus[0].uuid, frac=0.1))
    assert done.ok and limit_w(fake, 0) == 200.0 and "the board allows 200..700 W" in done.detail
    with pytest.raises(Exception, match="Invalid Argument|InvalidArgument"):
        fake.nvmlDeviceSetPowerManagementLimit(fake.nvmlDeviceGetHandleByIndex(0), 150_000)


def test_without_permission_the_throttle_fails_says_what_the_agent_needs_and_leaves_no_state(tmp_path: Path) -> None:
    fake = nvml(privileged=False)
    done = limiter(tmp_path, fake, Clock())(throttle(0, fake.gpus[0].uuid))
    assert not done.ok and "not permitted" in done.detail and "root" in done.detail
    assert limit_w(fake, 0) == 700.0 and ThrottleState(tmp_path / "throttle.json").load() == {}


def test_restore_command_and_agent_start_put_the_saved_limit_back(tmp_path: Path) -> None:
    fake, clock = nvml(), Clock()
    lim = limiter(tmp_path, fake, clock)
    uuid0, uuid1 = fake.gpus[0].uuid, fake.gpus[1].uuid
    assert lim(throttle(0, uuid0, duration_s=3600.0)).ok and lim(throttle(1, uuid1, duration_s=3600.0)).ok
    assert lim(throttle(0, uuid0, action="restore")).ok and limit_w(fake, 0) == 700.0
    assert lim(throttle(0, uuid0, action="restore")).detail.startswith("GPU 0 is not throttled")
    # the agent stops with GPU 1 throttled; a new one (a new limiter on the same file) restores it at start
    restarted = limiter(tmp_path, fake, clock)
    assert [h.ok for h in restarted.restore_all()] == [True] and limit_w(fake, 1) == 700.0
    assert ThrottleState(tmp_path / "throttle.json").load() == {}


def test_a_board_replaced_while_throttled_is_forgotten_not_restored(tmp_path: Path) -> None:
    fake, clock = nvml(), Clock()
    lim = limiter(tmp_path, fake, clock)
    assert lim(throttle(0, fake.gpus[0].uuid)).ok
    fake.gpus[0].uuid, fake.gpus[0].power_limit_mw = "GPU-new-board", 650_000
    done = lim.restore_all()
    assert done[0].ok and "forgotten" in done[0].detail and limit_w(fake, 0) == 650.0


def test_an_unreadable_state_file_is_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "throttle.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"throttle state file .*throttle.json is unreadable.*delete it"):
        ThrottleState(tmp_path / "throttle.json").load()


# ---------------------------------------------------------------- the agent's clock lock


def test_a_clock_throttle_records_the_lock_before_locking_and_resets_it_at_its_end(tmp_path: Path) -> None:
    fake, clock = nvml(), Clock()
    seen: list[object] = []
    real_lock = fake.nvmlDeviceSetGpuLockedClocks

    def lock(handle: object, lo: int, hi: int) -> None:  # the state file at the moment NVML changes
        seen.append(orjson.loads((tmp_path / "throttle.json").read_bytes()))
        real_lock(handle, lo, hi)

    fake.nvmlDeviceSetGpuLockedClocks = lock  # type: ignore[method-assign]
    lim = limiter(tmp_path, fake, clock)
    done = lim(throttle(1, fake.gpus[1].uuid, clock_frac=0.7, duration_s=600.0))
    assert done.ok and "345..1386 MHz" in done.detail
    assert fake.gpus[1].locked_clocks == (345, 1386) and sm_mhz(fake, 1) == 1386 and sm_mhz(fake, 0) == 1980
    assert seen[0][0]["clock_max_mhz"] == 1386 and seen[0][0]["original_mw"] is None
    clock.now += 599
    assert lim.restore_due() == [] and fake.gpus[1].locked_clocks is not None
    clock.now += 1
    assert [h.ok for h in lim.restore_due()] == [True] and fake.gpus[1].locked_clocks is None
    assert sm_mhz(fake, 1) == 1980 and ThrottleState(tmp_path / "throttle.json").load() == {}


def test_a_clock_ceiling_is_clamped_to_the_supported_clocks_and_the_stand_in_refuses_others(tmp_path: Path) -> None:  # noqa: E501 # fmt: skip
    fake = nvml()
    done = limiter(tmp_path, fake, Clock())(throttle(0, fake.gpus[0].uuid, mhz=100))
    assert done.ok and fake.gpus[0].locked_clocks == (345, 345)
    assert "the board supports 345..1980 MHz" in done.detail
    with pytest.raises(Exception, match="InvalidArgument"):
        fake.nvmlDeviceSetGpuLockedClocks(fake.nvmlDeviceGetHandleByIndex(0), 345, 2100)


def test_power_and_clock_throttles_of_one_gpu_both_hold_and_one_restore_undoes_both(tmp_path: Path) -> None:
    fake, clock = nvml(), Clock()
    lim = limiter(tmp_path, fake, clock)
    uuid = fake.gpus[0].uuid
    assert lim(throttle(0, uuid, frac=0.7, duration_s=600.0)).ok
    clock.now += 300
    assert lim(throttle(0, uuid, mhz=1200, duration_s=600.0)).ok  # the end of the hold moves to T0 + 900
    assert limit_w(fake, 0) == 490.0 and fake.gpus[0].locked_clocks == (345, 1200)
    saved = ThrottleState(tmp_path / "throttle.json").load()[0]
    assert (saved.original_mw, saved.limit_mw, saved.clock_max_mhz) == (700_000, 490_000, 1200)
    clock.now += 400
    assert lim.restore_due() == []
    done = lim(throttle(0, uuid, action="restore"))
    assert done.ok and "power limit restored to 700 W and clocks unlocked" in done.detail
    assert limit_w(fake, 0) == 700.0 and fake.gpus[0].locked_clocks is None


def test_locked_clocks_are_reset_at_agent_start(tmp_path: Path) -> None:
    fake, clock = nvml(), Clock()
    assert limiter(tmp_path, fake, clock)(throttle(1, fake.gpus[1].uuid, mhz=1500, duration_s=3600.0)).ok
    restarted = limiter(tmp_path, fake, clock)  # the agent stopped with the lock held; a new one starts
    assert [h.ok for h in restarted.restore_all()] == [True] and fake.gpus[1].locked_clocks is None


@pytest.mark.parametrize(("privileged", "unsupported", "expected"), [
    (False, set(), "not permitted"), (True, {"clock_lock"}, "not supported")])  # fmt: skip
def test_a_clock_lock_nvml_refuses_fails_with_the_fix_and_leaves_no_state(
    tmp_path: Path, privileged: bool, unsupported: set[str], expected: str
) -> None:
    fake = nvml(privileged=privileged)
    fake.gpus[0].unsupported = unsupported
    done = limiter(tmp_path, fake, Clock())(throttle(0, fake.gpus[0].uuid, clock_frac=0.6))
    assert not done.ok and expected in done.detail
    assert ("root" if not privileged else "Volta or newer") in done.detail and "\n" not in done.detail
    assert fake.gpus[0].locked_clocks is None and ThrottleState(tmp_path / "throttle.json").load() == {}


def test_a_lock_reset_nvml_refuses_is_kept_and_retried_after_the_power_limit_is_back(tmp_path: Path) -> None:
    fake, clock = nvml(), Clock()
    lim = limiter(tmp_path, fake, clock)
    uuid = fake.gpus[0].uuid
    assert lim(throttle(0, uuid, frac=0.6)).ok and lim(throttle(0, uuid, mhz=1000)).ok
    fake.gpus[0].unsupported = {"clock_lock"}
    done = lim(throttle(0, uuid, action="restore"))
    assert not done.ok and "reset the lock" in done.detail and limit_w(fake, 0) == 700.0
    saved = ThrottleState(tmp_path / "throttle.json").load()[0]
    assert (saved.original_mw, saved.clock_max_mhz) == (None, 1000)  # the power limit is not put back twice
    fake.gpus[0].unsupported = set()
    assert lim.restore_all()[0].ok and fake.gpus[0].locked_clocks is None


def test_a_state_file_of_an_agent_without_clock_locking_still_reads() -> None:
    old = b'[{"gpu_index":0,"uuid":"GPU-0","original_mw":700000,"limit_mw":490000,"until":1.0,"command_id":"t"}]'
    saved = msgspec.json.decode(old, type=list[Saved])[0]
    assert (saved.original_mw, saved.clock_max_mhz) == (700_000, None)


# ---------------------------------------------------------------- signed commands through the listener


def _listener(tmp_path: Path, fake: FakeNvml, with_limiter: bool = True) -> CommandListener:
    lim = limiter(tmp_path, fake, Clock()) if with_limiter else None
    return CommandListener(Settings(), HOST, keys=[KEY.encode()], seen_nonce_store=MemoryNonceStore(),
                           handler=lambda c: Handled(True, "checkpointed"), limiter=lim,
                           clock=lambda: T0)  # fmt: skip


def _signed(fake: FakeNvml, **fields: object) -> bytes:
    base = {"schema": "gpuwatch.command/1", "id": "r1", "host": HOST, "gpu_index": 1, "uuid": fake.gpus[1].uuid,
            "action": "throttle", "reason": "alarm", "risk": 0.9, **fields}  # fmt: skip
    return orjson.dumps(sign(base, KEY, now=T0))


def test_the_listener_runs_a_signed_throttle_and_refuses_a_malformed_or_unsupported_one(tmp_path: Path) -> None:
    fake = nvml()
    listener = _listener(tmp_path, fake)
    ack = listener.process(HOST, _signed(fake, power_limit_frac=0.6, duration_s=900))  # an int duration is fine
    assert ack is not None and ack.accepted and ack.ok and limit_w(fake, 1) == 420.0
    bad = listener.process(HOST, _signed(fake, power_limit_frac=0.6, power_limit_w=400.0, duration_s=900.0))
    assert bad is not None and (bad.accepted, bad.reason) == (False, "malformed") and "exactly one" in bad.detail
    both = listener.process(HOST, _signed(fake, power_limit_frac=0.6, sm_clock_max_mhz=1200, duration_s=90.0))
    assert both is not None and both.reason == "malformed" and "sm_clock_max_mhz" in both.detail
    fractional = listener.process(HOST, _signed(fake, sm_clock_max_mhz=1200.5, duration_s=900.0))
    assert fractional is not None and fractional.reason == "malformed" and "sm_clock_max_mhz" in fractional.detail  # fmt: skip
    clocks = listener.process(HOST, _signed(fake, sm_clock_frac=0.5, duration_s=900.0))
    assert clocks is not None and clocks.ok and fake.gpus[1].locked_clocks == (345, 990)
    fake.gpus[1].unsupported = {"clock_lock"}  # a pre-Volta board: accepted, failed, one line saying why
    old = listener.process(HOST, _signed(fake, sm_clock_frac=0.5, duration_s=900.0))
    assert old is not None and (old.accepted, old.ok) == (True, False) and "Volta or newer" in old.detail
    no_time = listener.process(HOST, _signed(fake, power_limit_w=400.0))
    assert no_time is not None and no_time.reason == "malformed" and "duration_s" in no_time.detail
    out_of_range = listener.process(HOST, _signed(fake, power_limit_frac=1.5, duration_s=60.0))
    assert out_of_range is not None and out_of_range.reason == "malformed" and "power_limit_frac" in out_of_range.detail
    plain = _listener(tmp_path / "other", fake, with_limiter=False)
    refused = plain.process(HOST, _signed(fake, power_limit_frac=0.6, duration_s=60.0))
    assert refused is not None and refused.reason == "unsupported_action" and "agent_throttle_state_file" in refused.detail


def test_listener_from_settings_has_a_limiter_only_with_a_state_file(tmp_path: Path) -> None:
    settings = Settings(command_signing_key=KEY)
    assert CommandListener.from_settings(settings, HOST, nvml()).limiter is None
    listener = CommandListener.from_settings(
        settings.replace(agent_throttle_state_file=str(tmp_path / "t.json")), HOST, nvml()
    )
    assert listener.limiter is not None and listener.limiter.state.path == tmp_path / "t.json"


# ---------------------------------------------------------------- the policy


def risk(ts: float, *, alarm: bool, drain: bool = False, mode: str = "thermal") -> Risk:
    return Risk(host=HOST, gpu_index=1, uuid="GPU-1", ts=ts, risk=0.5 if alarm else 0.01, horizon_s=3600.0,
                mode=mode, model="m", scored_at=ts, score=0.99 if alarm else 0.1, alarm=alarm, drain=drain,  # type: ignore[arg-type]
                op="model:0.9x1/10s")  # fmt: skip


def actions(policy: RemediationPolicy, records: list[Risk]) -> list[Remediation]:
    out = []
    for rec in records:
        out += policy.observe([rec], now=rec.ts)
    return out


def test_policy_throttles_a_thermal_alarm_first_and_restores_when_risk_falls() -> None:
    policy = RemediationPolicy(throttle_s=1800.0, throttle_frac=0.7, throttle_grace_s=300.0, episode_gap_s=600.0)
    events = actions(policy, [risk(T0, alarm=True), risk(T0 + 100, alarm=True), risk(T0 + 200, alarm=False),
                              risk(T0 + 900, alarm=False)])  # fmt: skip
    assert [e.action for e in events] == ["throttle", "restore"]
    first = events[0]
    assert (first.power_limit_frac, first.duration_s) == (0.7, 1800.0)
    assert decode_remediation(encode_remediation(first)) == first
    # the alarm comes back within the cooldown: the throttle did not hold, the ladder starts at once
    again = actions(policy, [risk(T0 + 1000, alarm=True, drain=True), risk(T0 + 1100, alarm=True, drain=True)])
    assert [e.action for e in again] == ["checkpoint", "migrate"]


def test_policy_goes_down_the_ladder_when_the_alarm_holds_after_the_throttle_and_never_throttles_memory() -> None:
    policy = RemediationPolicy(throttle_s=1800.0, throttle_grace_s=300.0)
    held = [risk(T0 + s, alarm=True, drain=True, mode="power") for s in (0, 100, 299, 300, 400)]
    assert [(e.action, e.ts - T0) for e in actions(policy, held)] == [
        ("throttle", 0), ("checkpoint", 300), ("migrate", 400)]  # fmt: skip
    memory = RemediationPolicy(throttle_s=1800.0)
    assert [e.action for e in actions(memory, [risk(T0, alarm=True, mode="memory")])] == ["checkpoint"]
    off = RemediationPolicy()  # throttle_s 0: the ladder as before
    assert [e.action for e in actions(off, [risk(T0, alarm=True)])] == ["checkpoint"]


def test_policy_with_throttle_kind_clocks_locks_clocks_instead_and_settings_check_the_kind() -> None:
    policy = RemediationPolicy(throttle_s=1800.0, throttle_kind="clocks", throttle_clock_frac=0.6,
                               throttle_grace_s=300.0, episode_gap_s=600.0)  # fmt: skip
    events = actions(policy, [risk(T0, alarm=True), risk(T0 + 200, alarm=False), risk(T0 + 900, alarm=False)])
    assert [e.action for e in events] == ["throttle", "restore"]
    first = events[0]
    assert (first.sm_clock_frac, first.power_limit_frac, first.duration_s) == (0.6, msgspec.UNSET, 1800.0)
    assert "SM clock" in events[0].reason and "clocks unlocked" in events[1].reason
    assert decode_remediation(encode_remediation(events[0])) == events[0]
    rules = PolicyRules.from_settings(Settings(policy_throttle_s=1800.0, policy_throttle_kind="clocks"))
    assert (rules.throttle_kind, rules.throttle_clock_frac) == ("clocks", 0.7)
    assert Settings().policy_throttle_kind == "power"  # nothing changes by default
    with pytest.raises(ConfigError, match=r"THROTTLE_KIND=fans: must be one of .*power.*clocks"):
        load_settings(env={"GPUWATCH_POLICY_THROTTLE_KIND": "fans"})
    with pytest.raises(ConfigError, match=r"policy_throttle_clock_frac = 1.5: must be"):
        load_settings(env={}, policy_throttle_clock_frac=1.5)


def test_throttling_is_on_only_where_the_cost_model_favours_it() -> None:
    costs = CostModel(throttle_s=1800.0, throttle_slowdown=0.15)
    assert costs.throttle_cost(1800.0) == pytest.approx(1024 * 0.15 * 0.5)
    assert costs.throttle_favoured() and not CostModel(throttle_s=1800.0, throttle_slowdown=0.5).throttle_favoured()
    on = Settings(policy_throttle_s=1800.0)
    assert PolicyRules.from_settings(on).throttle_s == 1800.0
    assert PolicyRules.from_settings(on.replace(policy_throttle_slowdown=0.5)).throttle_s == 0.0


# ---------------------------------------------------------------- the simulator


def _failing_host(act: Callable[[FleetSimulator], None] | None) -> tuple[FleetSimulator, list[dict]]:
    """A 2-GPU host whose GPU 0 has a thermal precursor; `act` (a cap, a lock) is applied after 15 samples, then
    60 samples are taken."""
    sim = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=2, seed=3, interval_s=20.0, start_ts=T0,
                                     rate_per_gpu_day=0.0, job_len_s=(1e6, 1e6), idle_len_s=(1.0, 1.0)))  # fmt: skip
    sim.schedule_failure(0, 0, "thermal", 3000.0, 2900.0, strength=1.0)
    for _ in range(15):
        sim.step()
    if act is not None:
        act(sim)
    return sim, [sim.step()[0] for _ in range(60)]


def test_a_power_cap_cools_the_gpu_reports_the_limit_and_slows_a_thermal_precursor() -> None:
    def cap(sim: FleetSimulator) -> None:
        assert sim.set_power_limit(0, 0, 0.6) == pytest.approx(700.0 * 0.6)

    free, free_snaps = _failing_host(None)
    capped, capped_snaps = _failing_host(cap)
    assert capped_snaps[-1]["gpus"][0]["power_limit_w"] == pytest.approx(420.0)
    assert capped_snaps[-1]["gpus"][1]["power_limit_w"] == pytest.approx(700.0)
    assert capped_snaps[-1]["gpus"][0]["temp_c"] < free_snaps[-1]["gpus"][0]["temp_c"] - 5
    assert capped._f_fail[0] > free._f_fail[0] + 600  # noqa: SLF001 - the precursor slowed: failure later
    with pytest.raises(ValueError, match="not in"):
        capped.set_power_limit(0, 0, 1.5)


def test_a_clock_lock_lowers_the_reported_clock_and_the_power_that_follows_it_and_slows_a_precursor() -> None:
    def lock(sim: FleetSimulator) -> None:
        assert sim.lock_clocks(0, 0, 0.6) == pytest.approx(1980.0 * 0.6)

    free, free_snaps = _failing_host(None)
    locked, locked_snaps = _failing_host(lock)
    gpu, other, was = locked_snaps[-1]["gpus"][0], locked_snaps[-1]["gpus"][1], free_snaps[-1]["gpus"][0]
    assert gpu["sm_clock_mhz"] <= 1188 < was["sm_clock_mhz"] and other["sm_clock_mhz"] > 1188
    assert gpu["power_limit_w"] == pytest.approx(700.0) and gpu["power_w"] < was["power_w"] - 100
    assert gpu["temp_c"] < was["temp_c"] - 5
    assert locked._f_fail[0] > free._f_fail[0] + 600  # noqa: SLF001 - the precursor slowed: failure later
    with pytest.raises(ValueError, match="not in"):
        locked.lock_clocks(0, 0, 0.0)


# ---------------------------------------------------------------- the controller


def test_the_controller_sends_throttle_and_restore_to_the_agent_signed_with_the_limit_and_duration() -> None:
    from gpuwatch.controller.executors import CheckpointRouter
    from gpuwatch.controller.executors import Outcome as Done
    from gpuwatch.controller.executors.agent_command import AgentCommandExecutor, command_from_event
    from gpuwatch.signing import sign_command, verify

    class Recording:
        def __init__(self, name: str) -> None:
            self.name, self.seen = name, []

        def execute(self, event: Remediation) -> Done:
            self.seen.append(event.action)
            return Done(ok=True, detail=self.name)

    event = Remediation(id="abc123", host=HOST, gpu_index=1, uuid="GPU-1", action="throttle", reason="alarm",
                        risk=0.5, ts=T0, power_limit_frac=0.7, duration_s=1800.0)  # fmt: skip
    main, agent = Recording("main"), Recording("agent")
    router = CheckpointRouter(main, agent)
    for action in ("throttle", "restore", "checkpoint", "migrate"):
        router.execute(msgspec.structs.replace(event, action=action))
    assert (agent.seen, main.seen) == (["throttle", "restore", "checkpoint"], ["migrate"])
    signed = msgspec.to_builtins(sign_command(command_from_event(event), KEY, now=T0))
    verify(signed, [KEY.encode()], now=T0, seen_nonces=MemoryNonceStore())
    assert (signed["power_limit_frac"], signed["duration_s"]) == (0.7, 1800.0)
    # a throttle event without its limit is not sent (checked before any Kafka producer exists)
    bare = msgspec.structs.replace(event, power_limit_frac=msgspec.UNSET)
    done = AgentCommandExecutor(Settings(), key=KEY.encode()).execute(bare)
    assert not done.ok and "power_limit_frac" in done.detail
    # a clock throttle carries its ceiling as a share of the board's maximum; naming both limits is not sent
    clocks = msgspec.structs.replace(bare, sm_clock_frac=0.6)
    assert msgspec.to_builtins(command_from_event(clocks))["sm_clock_frac"] == 0.6
    both = msgspec.structs.replace(event, sm_clock_frac=0.6)
    assert not AgentCommandExecutor(Settings(), key=KEY.encode()).execute(both).ok


# ---------------------------------------------------------------- the evaluation's accounting


def test_the_evaluation_prices_a_delayed_failure_and_the_throttle_that_delayed_it() -> None:
    from gpuwatch.training.throttle_eval import ArmRun, failure_costs

    costs = CostModel(throttle_slowdown=0.1)
    plan = [{"gpu": 0, "mode": "thermal", "fail_in_s": 1000.0}, {"gpu": 1, "mode": "power", "fail_in_s": 2000.0}]
    run = ArmRun(events=[("throttle", T0 + 500, 0), ("checkpoint", T0 + 900, 0), ("migrate", T0 + 1500, 1)],
                 failed={0: T0 + 1000 + 4000}, throttled_s={0: 3600.0})  # fmt: skip
    first, second = failure_costs(run, plan, costs, horizon_s=3600.0, start_ts=T0)
    assert first["averted_or_delayed"] and first["delayed_s"] == 4000.0
    # the checkpoint came 4,100 s before the (delayed) failure: it saved nothing; the throttle cost 1024 x 0.1 x 1 h
    assert first["gpu_h"] == pytest.approx(costs.failure_loss() + costs.action_cost("checkpoint", real=True) + 102.4)
    # not failed within the run, but its job moved: only the migration and the work since the last checkpoint
    assert second["averted_or_delayed"] and second["fail_ts"] is None
    assert second["gpu_h"] == pytest.approx(costs.action_cost("migrate", real=True) + 1024 * 0.5)


def test_bench_throttle_refuses_bad_arguments_in_one_line() -> None:
    import argparse

    from gpuwatch.apps.bench.throttle import run_throttle_bench

    args = argparse.Namespace(gpus=4, healthy_gpu_days=0.0, false_alarms_per_1000=None, seed=0, halt_cut=0.0,
                              throttle_kind="power", json_path=None)  # fmt: skip
    with pytest.raises(SystemExit, match="--halt-cut > 0"):
        run_throttle_bench(args, Settings())
    args.halt_cut, args.throttle_kind = 0.3, "fans"
    with pytest.raises(SystemExit, match=r"--throttle-kind fans: give one of power, clocks$"):
        run_throttle_bench(args, Settings())


def test_the_closed_loops_agent_locks_clocks_for_a_clocks_throttle_and_unlocks_them_at_restore() -> None:
    from gpuwatch.training.throttle_eval import SimulatedAgent, ThrottleSpec, rules_for

    def sim() -> FleetSimulator:
        return FleetSimulator(FleetConfig(hosts=1, gpus_per_host=2, seed=3, interval_s=20.0, start_ts=T0,
                                          rate_per_gpu_day=0.0, job_len_s=(1e6, 1e6), idle_len_s=(1.0, 1.0)))  # fmt: skip

    def clocks(s: FleetSimulator) -> list[int]:
        return [g["sm_clock_mhz"] for g in s.step()[0]["gpus"]]

    spec = ThrottleSpec(throttle_kind="clocks", throttle_clock_frac=0.6)
    policy = RemediationPolicy(rules_for(spec, throttle=True))
    throttle, restore = actions(policy, [risk(T0, alarm=True), risk(T0 + 200, alarm=False),
                                         risk(T0 + 900, alarm=False)])  # fmt: skip
    assert (throttle.action, throttle.sm_clock_frac, restore.action) == ("throttle", 0.6, "restore")
    sims = [sim(), sim()]
    agent = SimulatedAgent(sims)
    for _ in range(15):
        clocks(sims[1])
    assert agent.throttle(3, throttle)  # code 3: the second simulator's GPU 1
    locked = clocks(sims[1])
    assert locked[1] <= 0.6 * 1980 < locked[0]
    agent.restore(3)
    assert min(clocks(sims[1])) > 0.6 * 1980
    # a power throttle sets the limit instead, and its restore puts it back
    power = RemediationPolicy(rules_for(ThrottleSpec(), throttle=True))
    (capped,) = actions(power, [risk(T0, alarm=True)])
    assert agent.throttle(3, capped) and sims[1].step()[0]["gpus"][1]["power_limit_w"] == pytest.approx(490.0)
    agent.restore(3)
    assert sims[1].step()[0]["gpus"][1]["power_limit_w"] == pytest.approx(700.0)
