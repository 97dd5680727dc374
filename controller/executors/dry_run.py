"""The default executor: logs what it would do and changes nothing."""

from __future__ import annotations

import logging

import msgspec

from gpuwatch.schemas.records import Remediation

from . import Outcome

log = logging.getLogger(__name__)

_WOULD = {
    "checkpoint": "would ask the jobs on {host} to checkpoint (GPU {gpu_index}: {reason})",
    "migrate": "would drain {host} GPU {gpu_index} and migrate its jobs (reason {reason})",
    "reboot": "would reboot {host} (drained; GPU {gpu_index}: {reason})",
    "repair": "would drain {host} and ask for a repair of GPU {gpu_index} ({reason})",
    "throttle": "would throttle {host} GPU {gpu_index}: power limit or clocks ({reason})",
    "restore": "would undo the throttle of {host} GPU {gpu_index} ({reason})",
}


class DryRunExecutor:
    """Logs "would drain node-0003 GPU 5 (reason ...)" at INFO and reports success with `dry_run=True`."""

    name = "dry-run"

    def execute(self, event: Remediation) -> Outcome:
        text = _WOULD.get(event.action, "would {action} {host} GPU {gpu_index} ({reason})").format(
            **msgspec.structs.asdict(event)
        )
        log.info("%s [id %s]", text, event.id)
        return Outcome(ok=True, detail=text, dry_run=True)
