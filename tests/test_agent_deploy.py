"""The agent's systemd unit and Kubernetes DaemonSet agree with the code (no cluster runs here: parsed)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpuwatch.apps.cli import build_parser
from gpuwatch.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {f.name for f in fields(Settings)}


def _setting(var: str) -> str:
    assert var.startswith("GPUWATCH_"), var
    return var.removeprefix("GPUWATCH_").lower()


@pytest.fixture(scope="module")
def manifests() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/agent-daemonset.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_daemonset_settings_command_probes_and_spool(manifests: dict[str, Any]) -> None:
    config = manifests["ConfigMap"]["data"]
    pod = manifests["DaemonSet"]["spec"]["template"]["spec"]
    [agent] = pod["containers"]
    env = {e["name"]: e for e in agent["env"]}
    for var in [*config, *(n for n in env if n.startswith("GPUWATCH_"))]:
        assert _setting(var) in SETTINGS, f"{var} is not a gpuwatch setting"
    assert env["GPUWATCH_AGENT_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "secretKeyRef" in env["GPUWATCH_KAFKA_SASL_PASSWORD"]["valueFrom"]

    args = build_parser().parse_args(agent["args"])
    assert args.command == "agent" and not args.simulate
    port = int(config["GPUWATCH_AGENT_METRICS_PORT"])
    assert agent["ports"] == [{"name": "metrics", "containerPort": port}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert "resources" in agent and "nvidia.com/gpu" not in str(agent["resources"])  # never takes a GPU

    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert mounts["spool"] == config["GPUWATCH_AGENT_SPOOL_DIR"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spool"]["hostPath"]["path"] == config["GPUWATCH_AGENT_SPOOL_DIR"]  # survives pod restarts

    # Replay protection survives a pod restart: the nonce file is on a node directory of its own, which the
    # init container hands to the agent's user (the root file system is read-only).
    nonce_dir = str(Path(config["GPUWATCH_AGENT_NONCE_FILE"]).parent)
    [state] = [name for name, path in mounts.items() if path == nonce_dir]
    assert state != "spool" and volumes[state]["hostPath"]["path"] == nonce_dir
    [init] = pod["initContainers"]
    assert {"name": state, "mountPath": nonce_dir} in init["volumeMounts"] and nonce_dir in init["command"][-1]
    assert pod["terminationGracePeriodSeconds"] > Settings().agent_flush_timeout_s


def test_systemd_unit() -> None:
    lines = [ln.strip() for ln in (ROOT / "deploy/systemd/gpuwatch-agent.service").read_text().splitlines()]
    entries = [ln.split("=", 1) for ln in lines if ln and not ln.startswith(("#", "[")) and "=" in ln]
    service = dict(entries)  # the last value of a repeated key, as systemd does for these keys
    exec_start = service["ExecStart"].split()
    assert (
        exec_start[0].endswith("/gpuwatch") and build_parser().parse_args(exec_start[1:]).command == "agent"
    )
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > Settings().agent_flush_timeout_s
    assert service["RestartPreventExitStatus"] == "3"  # NVML missing: restarting cannot help
    env = dict(value.split("=", 1) for key, value in entries if key == "Environment")
    assert env and all(_setting(var) in SETTINGS for var in env)
    assert service["StateDirectory"] == "gpuwatch"  # /var/lib/gpuwatch, kept across restarts and reboots
    assert env["GPUWATCH_AGENT_SPOOL_DIR"].startswith("/var/lib/gpuwatch/")
    # Replay protection survives a restart: the nonce file is in the StateDirectory too (writable under
    # ProtectSystem=strict), not in the spool.
    nonce_file = Path(env["GPUWATCH_AGENT_NONCE_FILE"])
    assert nonce_file.is_relative_to("/var/lib/gpuwatch") and not nonce_file.is_relative_to(env["GPUWATCH_AGENT_SPOOL_DIR"])
