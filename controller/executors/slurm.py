"""Slurm: drain the node for migrate and repair; for reboot, make sure it is drained, then ``scontrol reboot``.

Commands (argument lists, no shell; `scontrol` is the configured path):

* migrate and repair (the GPU has failed): ``scontrol update nodename=<host> state=drain reason=<gpuwatch: ...>``
* reboot:  ``scontrol --oneliner show node <host>``; if its State has no DRAIN, the drain above first;
  then ``scontrol reboot reason=<...> <host>``: Slurm reboots the node once its jobs are gone (drained, it
  gets no new ones). Not ``reboot ASAP``: Slurm clears DRAIN when an ASAP reboot completes, and the node
  would go back into service unchecked. This way it comes back drained, with its reason, until an operator
  resumes it (``scontrol update nodename=<host> state=resume``).

Slurm drains whole nodes: a bad GPU takes its node out of scheduling. Checkpoints are not Slurm's job
here (they go to the node agent, see `make_executor`). tests/test_slurm.py runs all of this against a real
slurmctld and slurmd.
"""

from __future__ import annotations

import logging
import re

from gpuwatch.argv import Completed, run_argv
from gpuwatch.schemas.records import Remediation

from . import Outcome, UnsafeTarget, short_reason, target_values

log = logging.getLogger(__name__)

_STATE_RE = re.compile(r"\bState=(\S+)")
# slurmctld's answer to a user who may not change nodes (only root, SlurmUser and AdminLevel=Admin may)
_NOT_ALLOWED = "Invalid user id"


def _describe(done: Completed) -> str:
    """How an scontrol call ended, with what to do when Slurm refused the controller's user."""
    text = done.describe()
    if not done.ok and _NOT_ALLOWED in done.stderr:
        text += (
            "; the controller's user may not change Slurm nodes: run it as root or SlurmUser, or give it"
            " AdminLevel=Admin (sacctmgr)"
        )
    return text


class SlurmExecutor:
    """Runs `scontrol` (a path or a name on PATH); each call may take `timeout_s`."""

    name = "slurm"

    def __init__(self, scontrol: str = "scontrol", *, timeout_s: float = 120.0) -> None:
        self.scontrol = scontrol
        self.timeout_s = timeout_s

    def drain_argv(self, host: str, reason: str) -> list[str]:
        return [self.scontrol, "update", f"nodename={host}", "state=drain", f"reason={reason}"]

    def reboot_argv(self, host: str, reason: str) -> list[str]:
        # no ASAP: an ASAP reboot clears the drain when the node is back (see the module docstring)
        return [self.scontrol, "reboot", f"reason={reason}", host]

    def show_argv(self, host: str) -> list[str]:
        return [self.scontrol, "--oneliner", "show", "node", host]

    def _run(self, argv: list[str]) -> Completed:
        done = run_argv(argv, timeout_s=self.timeout_s)
        (log.info if done.ok else log.warning)("%s: %s", " ".join(argv), done.describe())
        return done

    def execute(self, event: Remediation) -> Outcome:
        try:
            host = target_values(event)["host"]
        except UnsafeTarget as exc:
            log.warning("remediation %s refused: %s", event.id, exc)
            return Outcome(ok=False, detail=f"refused: {exc}")
        action, reason = event.action, short_reason(event)
        try:
            # repair: the GPU failed; drained, the node waits for a technician
            if action in ("migrate", "repair"):
                done = self._run(self.drain_argv(host, reason))
                return Outcome(ok=done.ok, detail=f"drain {host}: {_describe(done)}")
            if action == "reboot":
                return self._reboot(host, reason)
        except OSError as exc:
            return Outcome(
                ok=False, detail=f"cannot run {self.scontrol}: {exc}; check setting 'controller_scontrol'"
            )
        return Outcome(
            ok=False, detail=f"the slurm executor does not {action}; checkpoints go to the node agent"
        )

    def _reboot(self, host: str, reason: str) -> Outcome:
        shown = self._run(self.show_argv(host))
        if not shown.ok:
            return Outcome(ok=False, detail=f"reboot {host} not attempted: show node {_describe(shown)}")
        match = _STATE_RE.search(shown.stdout)
        state = match.group(1) if match else "?"
        steps = []
        if "DRAIN" not in state.upper():
            drained = self._run(self.drain_argv(host, reason))
            if not drained.ok:
                return Outcome(ok=False, detail=f"reboot {host} not attempted: drain {_describe(drained)}")
            steps.append(f"drained (was {state})")
        done = self._run(self.reboot_argv(host, reason))
        steps.append(f"reboot: {_describe(done)}")
        return Outcome(ok=done.ok, detail=f"{host}: " + "; ".join(steps))
