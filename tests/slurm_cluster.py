"""A real one-node Slurm cluster on loopback for tests: Debian's munged, slurmctld and slurmd as children.

`start_slurm(workdir)` writes a munge key and a slurm.conf for one node (NodeAddr 127.0.0.1, free loopback
ports, state, spool and logs under `workdir`, no cgroups, no accounting), starts the three daemons in the
foreground and returns once `sinfo` shows the node idle. A daemon that exits or a node that never gets
idle is an AssertionError with the daemons' log tails, never a skip. Missing programs are installed from
Debian's packages when this runs as root with apt-get (scripts/test.sh installs them up front).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The same "die with the test process, even on SIGKILL" hook the embedded Kafka and Redis use.
from gpuwatch.embedded import _die_with_parent, free_port

PACKAGES = ("slurmctld", "slurmd", "munge", "slurm-client")
PROGRAMS = ("munged", "slurmctld", "slurmd", "scontrol", "sinfo")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons live in sbin


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def program(name: str) -> str:
    """The path of a Slurm or munge program (its bare name if it is not installed)."""
    return _which(name) or name


def ensure_slurm_installed() -> None:
    """Installs Debian's Slurm and munge packages if a program is missing (as root, with apt-get);
    otherwise an AssertionError that says what to install."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if not missing:
        return
    how = f"apt-get install -y --no-install-recommends {' '.join(PACKAGES)}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise AssertionError(f"the Slurm tests need {', '.join(missing)}: install Debian's packages ({how})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}"
            )
    still = [p for p in PROGRAMS if _which(p) is None]
    assert not still, f"installed {' '.join(PACKAGES)} but {', '.join(still)} still missing"


_FIELD_RE = re.compile(r"\b(State|Reason)=(.*?)(?= [A-Za-z]+=|$)")


@dataclass
class SlurmCluster:
    """The running cluster: `conf` is its slurm.conf (give it to clients as SLURM_CONF), `node` its one node."""

    workdir: Path
    conf: Path
    node: str
    reboot_log: Path  # the RebootProgram appends a line here each time slurmd runs it
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    socket_dir: Path | None = None

    def scontrol(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [program("scontrol"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def show_node(self) -> dict[str, str]:
        """The node's `State` and `Reason` as `scontrol --oneliner show node` prints them."""
        shown = self.scontrol("--oneliner", "show", "node", self.node)
        assert shown.returncode == 0, f"scontrol show node {self.node}: {shown.stderr or shown.stdout}"
        return dict(_FIELD_RE.findall(shown.stdout.strip()))

    def wait_node(
        self, cond: Callable[[dict[str, str]], bool], what: str, timeout: float = 20.0
    ) -> dict[str, str]:
        """Polls the node until `cond(show_node())` holds; the timeout only guards against a hang."""
        deadline = time.monotonic() + timeout
        node = self.show_node()
        while not cond(node):
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}; node: {node}\n{self.log_tails()}"
                )
            time.sleep(0.05)
            node = self.show_node()
        return node

    def reboots(self) -> int:
        """How many times slurmd ran the RebootProgram."""
        return len(self.reboot_log.read_text().splitlines()) if self.reboot_log.exists() else 0

    def boot_node(self) -> None:
        """Restarts slurmd with `-b` ("report node reboot now"): slurmctld sees the node come back from a
        reboot, as it would after a real one (a test container cannot reboot)."""
        _stop("slurmd", self.procs.pop("slurmd"))
        self._spawn("slurmd", [program("slurmd"), "-D", "-N", self.node, "-b"])

    def scontrol_as_nobody(self) -> Path:
        """A wrapper that runs scontrol as user `nobody`, a user Slurm does not allow to change nodes (needs root).

        nobody cannot enter the test's directory: the wrapper's slurm.conf is a readable copy beside the
        munge socket, whose directory is opened to all.
        """
        assert os.geteuid() == 0, "running scontrol as another user needs root"
        assert self.socket_dir is not None
        self.socket_dir.chmod(0o755)
        conf = self.socket_dir / "slurm.conf"
        shutil.copyfile(self.conf, conf)
        conf.chmod(0o644)
        wrapper = self.socket_dir / "scontrol-as-nobody"
        wrapper.write_text(
            f"#!/bin/sh\nSLURM_CONF='{conf}' exec setpriv --reuid=nobody --regid=nogroup --clear-groups "
            f"'{program('scontrol')}' \"$@\"\n"
        )
        wrapper.chmod(0o755)
        return wrapper

    def stop(self) -> None:
        """Stops slurmd, slurmctld and munged (in that order); idempotent."""
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.procs:
                _stop(name, self.procs.pop(name))
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    def log_tails(self, n: int = 15) -> str:
        tails = []
        for name in ("munged", "slurmctld", "slurmd"):
            log = self.workdir / f"{name}.log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            tails.append(f"--- {name}.log (last {n} lines)\n" + "\n".join(lines[-n:]))
        return "\n".join(tails)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                preexec_fn=_die_with_parent, start_new_session=True,
            )  # fmt: skip

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with code {proc.returncode}\n{self.log_tails()}")


def _stop(name: str, proc: subprocess.Popen[bytes]) -> None:
    """Stops a daemon (SIGTERM, then SIGKILL after 10 s); AssertionError if anything of its session is left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    try:  # each daemon leads its own process group (start_new_session): nothing may outlive it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    raise AssertionError(f"{name} left processes behind in its group {proc.pid} (killed now)")


def slurm_conf(workdir: Path, node: str, munge_socket: Path, *, reboot_program: Path | None) -> str:
    """A minimal slurm.conf: one node on 127.0.0.1, the controller on this host, everything under `workdir`."""
    user = pwd.getpwuid(os.getuid()).pw_name
    ctld_port = slurmd_port = free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    lines = [
        "ClusterName=gpuwatch-test",
        f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={workdir / 'state'}",
        f"SlurmdSpoolDir={workdir / 'spool'}",
        f"SlurmctldPidFile={workdir / 'slurmctld.pid'}",
        f"SlurmdPidFile={workdir / 'slurmd.pid'}",
        # No cgroups (not available in a container), no accounting, no MPI: only what node states need.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/linear",
        "SchedulerType=sched/builtin",
        "MpiDefault=none",
        "ReturnToService=2",
        *([f"RebootProgram={reboot_program}"] if reboot_program else []),
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs=1 RealMemory=1 State=UNKNOWN",
        f"PartitionName=gpu Nodes={node} Default=YES State=UP",
    ]
    return "\n".join(lines) + "\n"


def start_slurm(
    workdir: Path, node: str = "gpu-node-07", *, reboot_program: bool = True, timeout: float = 30.0
) -> SlurmCluster:
    """Starts munged, slurmctld and slurmd for one node and waits until the node is idle.

    With `reboot_program`, slurm.conf names a RebootProgram that only records that it ran (see
    `SlurmCluster.reboots`); without it, `scontrol reboot` fails as it does on a cluster that has none.
    """
    ensure_slurm_installed()
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    # The munge socket lives in a short directory of its own: a unix socket path has at most 107 bytes,
    # and pytest's tmp_path is often longer.
    socket_dir = Path(tempfile.mkdtemp(prefix="munge-"))
    munge_socket = socket_dir / "munge.socket"
    key = workdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    reboot_log = workdir / "reboots.log"
    script = None
    if reboot_program:
        script = workdir / "reboot-program"
        script.write_text(f"#!/bin/sh\necho \"reboot requested $*\" >> '{reboot_log}'\n")
        script.chmod(0o755)
    conf = workdir / "slurm.conf"
    conf.write_text(slurm_conf(workdir, node, munge_socket, reboot_program=script))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(workdir, conf, node, reboot_log, env, socket_dir=socket_dir)
    try:
        # -f: munged otherwise refuses a socket directory whose parents are not executable by all (tmp dirs)
        cluster._spawn("munged", [program("munged"), "-F", "-f", f"--socket={munge_socket}",
                                  f"--key-file={key}", f"--log-file={workdir / 'munged.log'}",
                                  f"--pid-file={workdir / 'munged.pid'}", f"--seed-file={workdir / 'munged.seed'}"])  # fmt: skip
        deadline = time.monotonic() + timeout
        while not munge_socket.exists():
            cluster._check_alive()
            assert time.monotonic() < deadline, (
                f"munged made no socket within {timeout:.0f} s\n{cluster.log_tails()}"
            )
            time.sleep(0.02)
        cluster._spawn("slurmctld", [program("slurmctld"), "-D"])
        cluster._spawn("slurmd", [program("slurmd"), "-D", "-N", node])
        sinfo = [program("sinfo"), "--noheader", "--nodes", node, "--format", "%T"]
        state = ""
        while state != "idle":
            cluster._check_alive()
            assert time.monotonic() < deadline, (
                f"node {node} not idle within {timeout:.0f} s (sinfo: {state!r})\n{cluster.log_tails()}"
            )
            time.sleep(0.05)
            done = subprocess.run(sinfo, env=env, capture_output=True, text=True, timeout=30)
            state = done.stdout.strip()
    except BaseException:
        cluster.stop()
        raise
    return cluster
