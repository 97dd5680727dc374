"""The Slurm executor against a real one-node Slurm cluster (Debian's munged, slurmctld and slurmd).

Each test gets a fresh cluster on free loopback ports (tests/slurm_cluster.py, 0.1 to 1.2 s to start here), and the
executor runs the real `scontrol`, which finds the cluster through SLURM_CONF. What a container cannot do is
reboot: the cluster's RebootProgram only records that slurmd ran it, and the node "comes back" when the
test restarts slurmd with `-b` (Slurm's own switch for "report that this node has just booted").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, program, start_slurm

from gpuwatch.controller.executors import short_reason
from gpuwatch.controller.executors.slurm import SlurmExecutor
from gpuwatch.schemas.codecs import remediation_id
from gpuwatch.schemas.fields import Action
from gpuwatch.schemas.records import Remediation


@pytest.fixture()
def slurm(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SlurmCluster]:
    """A running cluster whose node is idle; parametrize indirectly with {"reboot_program": False} for
    a cluster without a RebootProgram. Stopped afterwards, with nothing left running."""
    cluster = start_slurm(tmp_path, **getattr(request, "param", {}))
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # how the executor's scontrol finds the cluster
    yield cluster
    cluster.stop()


def event(action: Action, host: str) -> Remediation:
    return Remediation(id=remediation_id(host, 5, "GPU-abc", action, 1_750_000_000.0), host=host, gpu_index=5,
                       uuid="GPU-abc", action=action, reason="risk 0.97 >= 0.85, mode memory", risk=0.97,
                       ts=1_750_000_360.0)


def executor() -> SlurmExecutor:
    return SlurmExecutor(program("scontrol"), timeout_s=30)


def flags(node: dict[str, str]) -> set[str]:
    return set(node["State"].split("+"))


def resume_to_idle(slurm: SlurmCluster) -> None:
    """What docs/remediation.md tells the operator to run once the node is healthy."""
    done = slurm.scontrol("update", f"nodename={slurm.node}", "state=resume")
    assert done.returncode == 0, done.stderr
    slurm.wait_node(lambda n: n["State"] == "IDLE", "the node idle again after state=resume")


def test_migrate_and_repair_drain_the_real_node_with_their_reason_and_resume_returns_it(
    slurm: SlurmCluster,
) -> None:
    migrate = event("migrate", slurm.node)
    outcome = executor().execute(migrate)
    assert outcome.ok and outcome.detail == f"drain {slurm.node}: exit 0"
    node = slurm.show_node()
    assert flags(node) == {"IDLE", "DRAIN"}
    assert node["Reason"].startswith(short_reason(migrate) + " [")  # Slurm appends [user@time]

    # A repair of the same node (or a migrate the controller re-runs after taking it over) drains a
    # drained node: Slurm accepts it and only the reason changes.
    repair = event("repair", slurm.node)
    outcome = executor().execute(repair)
    assert outcome.ok
    node = slurm.show_node()
    assert flags(node) == {"IDLE", "DRAIN"} and node["Reason"].startswith(short_reason(repair) + " [")

    resume_to_idle(slurm)


def test_reboot_drains_first_and_the_node_comes_back_from_the_reboot_still_drained(
    slurm: SlurmCluster,
) -> None:
    reboot = event("reboot", slurm.node)
    outcome = executor().execute(reboot)
    assert outcome.ok and outcome.detail == f"{slurm.node}: drained (was IDLE); reboot: exit 0"
    # slurmctld hands the reboot to slurmd, which runs the RebootProgram
    node = slurm.wait_node(
        lambda n: slurm.reboots() == 1 and "REBOOT_ISSUED" in flags(n), "slurmd running the RebootProgram"
    )
    assert "DRAIN" in flags(node) and node["Reason"].startswith(short_reason(reboot))

    slurm.boot_node()
    node = slurm.wait_node(
        lambda n: not any(f.startswith("REBOOT") for f in flags(n)), "the node back from reboot"
    )
    # With `scontrol reboot ASAP` Slurm would have cleared the drain here and put the node back into service.
    assert flags(node) == {"IDLE", "DRAIN"} and node["Reason"].startswith(short_reason(reboot))
    assert slurm.reboots() == 1
    resume_to_idle(slurm)


def test_reboot_of_a_node_an_operator_drained_does_not_drain_it_again(slurm: SlurmCluster) -> None:
    done = slurm.scontrol("update", f"nodename={slurm.node}", "state=drain", "reason=operator: fan noise")
    assert done.returncode == 0, done.stderr
    outcome = executor().execute(event("reboot", slurm.node))
    assert outcome.ok and outcome.detail == f"{slurm.node}: reboot: exit 0"  # no drain step
    slurm.wait_node(lambda n: slurm.reboots() == 1, "slurmd running the RebootProgram")
    slurm.boot_node()
    node = slurm.wait_node(
        lambda n: not any(f.startswith("REBOOT") for f in flags(n)), "the node back from reboot"
    )
    # the operator's drain holds; Slurm replaced the reason with the reboot's
    assert flags(node) == {"IDLE", "DRAIN"} and node["Reason"].startswith("gpuwatch: reboot GPU 5")


def test_real_scontrol_errors_are_failed_outcomes_with_slurms_message(slurm: SlurmCluster) -> None:
    outcome = executor().execute(event("migrate", "gpu-node-99"))
    assert not outcome.ok
    assert outcome.detail == "drain gpu-node-99: exit 1: slurm_update error: Invalid node name specified"

    outcome = executor().execute(event("reboot", "gpu-node-99"))
    assert not outcome.ok
    assert outcome.detail == "reboot gpu-node-99 not attempted: show node exit 1: Node gpu-node-99 not found"
    assert slurm.show_node()["State"] == "IDLE" and slurm.reboots() == 0


def test_a_controller_user_slurm_does_not_allow_to_change_nodes_gets_a_refusal_that_says_what_to_do(
    slurm: SlurmCluster,
) -> None:
    refused = "slurm_update error: Invalid user id; the controller's user may not change Slurm nodes"
    as_nobody = SlurmExecutor(str(slurm.scontrol_as_nobody()), timeout_s=30)
    outcome = as_nobody.execute(event("migrate", slurm.node))
    assert not outcome.ok and outcome.detail.startswith(f"drain {slurm.node}: exit 1: {refused}")
    assert "AdminLevel=Admin" in outcome.detail
    outcome = as_nobody.execute(event("reboot", slurm.node))  # anyone may show the node; not drain it
    assert not outcome.ok
    assert outcome.detail.startswith(f"reboot {slurm.node} not attempted: drain exit 1: {refused}")
    assert slurm.show_node()["State"] == "IDLE" and slurm.reboots() == 0


@pytest.mark.parametrize("slurm", [{"reboot_program": False}], indirect=True)
def test_reboot_on_a_cluster_without_a_reboot_program_fails_and_leaves_the_node_drained(
    slurm: SlurmCluster,
) -> None:
    outcome = executor().execute(event("reboot", slurm.node))
    assert not outcome.ok
    assert outcome.detail.startswith(f"{slurm.node}: drained (was IDLE); reboot: exit 1: ")
    assert "RebootProgram isn't defined" in outcome.detail
    node = slurm.show_node()
    assert flags(node) == {"IDLE", "DRAIN"}  # drained, not rebooting: safe until an operator looks


def test_unsafe_hosts_are_refused_and_a_missing_scontrol_names_the_setting(tmp_path: Path) -> None:
    # The executor never got as far as running its program: it does not exist, and the outcome says refused.
    outcome = SlurmExecutor(str(tmp_path / "no-scontrol")).execute(event("migrate", "node1; rm -rf /"))
    assert not outcome.ok and outcome.detail.startswith("refused: host")
    outcome = SlurmExecutor(str(tmp_path / "no-scontrol")).execute(event("migrate", "gpu-node-07"))
    assert not outcome.ok and "cannot run" in outcome.detail and "controller_scontrol" in outcome.detail
    outcome = SlurmExecutor(str(tmp_path / "no-scontrol")).execute(event("checkpoint", "gpu-node-07"))
    assert not outcome.ok and "checkpoints go to the node agent" in outcome.detail
