"""compose/docker-compose.yml, the Prometheus config and the Grafana files agree with the code.

No Docker engine runs here, so the files are parsed and checked: services and images, the GPUWATCH_*
variables (each must be a Settings field), topic names (the code's defaults), the commands (real gpuwatch
subcommands), the metrics ports Prometheus scrapes, and the metric names the dashboard and alerts query.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

import gpuwatch.metrics  # noqa: F401 - registers every gpuwatch metric
from gpuwatch.apps.cli import build_parser
from gpuwatch.config import Settings
from gpuwatch.producers.agent import AgentCollector, build_agent

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
GPUWATCH_SERVICES = {"stream": "stream", "sink": "sink", "controller": "controller", "agent": "agent", "fleet": "fleet"}
FIELDS = {f.name for f in fields(Settings)}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """{container path: host path} of the bind mounts (relative host paths resolved from compose/)."""
    out = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith((".", "/")):
            out[container] = (COMPOSE.parent / host).resolve()
    return out


def test_stack_has_every_component(services: dict[str, Any]) -> None:
    assert set(services) == {"kafka", "redis", "prometheus", "grafana", *GPUWATCH_SERVICES}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_kafka_runs_in_kraft_mode_with_the_listener_gpuwatch_uses(services: dict[str, Any]) -> None:
    env = env_of(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(env).upper()
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    bootstrap = env_of(services["sink"])["GPUWATCH_KAFKA_BOOTSTRAP"]
    assert f"PLAINTEXT://{bootstrap}" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_gpuwatch_services_build_the_repository_image(services: dict[str, Any]) -> None:
    for name in GPUWATCH_SERVICES:
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in dockerfile
    assert 'ENTRYPOINT ["gpuwatch"]' in dockerfile


def test_commands_are_real_gpuwatch_subcommands(services: dict[str, Any]) -> None:
    parser = build_parser()
    for name, subcommand in GPUWATCH_SERVICES.items():
        command = services[name]["command"]
        assert command[0] == subcommand
        try:
            parser.parse_args(command)
        except SystemExit as exc:
            pytest.fail(
                f"compose service {name}: `gpuwatch {' '.join(command)}` is not a valid command ({exc})"
            )


def test_environment_uses_only_real_settings_wired_to_the_stack(services: dict[str, Any]) -> None:
    defaults = Settings()
    for name in GPUWATCH_SERVICES:
        env = env_of(services[name])
        for var in env:
            assert var.startswith("GPUWATCH_"), f"{name}: {var} is not a gpuwatch setting"
            assert var[len("GPUWATCH_") :].lower() in FIELDS, f"{name}: {var} names no field of Settings"
        assert env["GPUWATCH_KAFKA_BOOTSTRAP"].split(":")[0] == "kafka"
        assert env["GPUWATCH_REDIS_URL"].startswith("redis://redis:6379")
        for var, value in env.items():
            if var.startswith("GPUWATCH_TOPIC_") or var == "GPUWATCH_STREAM_APP_ID":
                assert value == getattr(defaults, var[len("GPUWATCH_") :].lower()), f"{name}: {var}={value}"
        assert {"kafka", "redis"} <= set(services[name]["depends_on"])
    topics = {f.name for f in fields(Settings) if f.name.startswith("topic_")}
    shared = env_of(services["sink"])
    assert {f"GPUWATCH_{t.upper()}" for t in topics} <= set(shared), "every topic is wired explicitly"


def test_prometheus_scrapes_each_service_on_its_metrics_port(services: dict[str, Any]) -> None:
    config_dir = mounts(services["prometheus"])["/etc/prometheus"]
    assert config_dir == ROOT / "deploy" / "prometheus"
    prom = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"] and (config_dir / "alerts.yml").exists()
    targets: dict[str, int] = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                targets[host] = sd["port"]
    assert set(targets) == set(GPUWATCH_SERVICES)
    for name in GPUWATCH_SERVICES:
        port = int(env_of(services[name])[f"GPUWATCH_{name.upper()}_METRICS_PORT"])
        assert targets[name] == port, (
            f"Prometheus scrapes {name} on {targets[name]}, the service serves {port}"
        )
        assert str(port) in services[name]["expose"]
        # Prometheus is another container: the exporter must not listen on loopback only.
        host = env_of(services[name]).get("GPUWATCH_METRICS_HOST", Settings().metrics_host)
        addr = env_of(services[name]).get("GPUWATCH_AGENT_METRICS_ADDR", Settings().agent_metrics_addr)
        assert (addr if name == "agent" else host) == "0.0.0.0", name


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(services: dict[str, Any]) -> None:
    m = mounts(services["grafana"])
    provisioning, dashboards = m["/etc/grafana/provisioning"], m["/var/lib/grafana/dashboards"]
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "gpuwatch.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((dashboards / "gpuwatch.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {ds["uid"]}
    home = env_of(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/gpuwatch.json"


@pytest.fixture()
def agent_registry(tmp_path: Path) -> Iterator[CollectorRegistry]:
    """The registry a (simulated) node agent serves: it exports its own gpuwatch_agent_* metrics."""
    settings = Settings(
        kafka_bootstrap="127.0.0.1:9", agent_spool_dir=str(tmp_path), agent_flush_timeout_s=0.1
    )
    agent = build_agent(settings, simulate_hosts=1)
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    yield registry
    agent.shutdown()


def exported_metric_names(*registries: CollectorRegistry) -> set[str]:
    """Series names gpuwatch's registries expose (histograms with their _bucket/_count/_sum series)."""
    names = set()
    text = "".join(generate_latest(r).decode() for r in (REGISTRY, *registries))
    for line in text.splitlines():
        if line.startswith("# TYPE gpuwatch_"):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update({name + "_bucket", name + "_count", name + "_sum"})
    # The stream worker registers its per-GPU telemetry collector when it starts.
    names.update({"gpuwatch_gpu_temperature_celsius", "gpuwatch_gpu_power_ratio"})
    return names


def test_dashboard_and_alerts_query_only_metrics_gpuwatch_exports(agent_registry: CollectorRegistry) -> None:
    dashboard = (ROOT / "deploy" / "grafana" / "dashboards" / "gpuwatch.json").read_text()
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    used = set(re.findall(r"\bgpuwatch_[a-z_]+", dashboard + alerts))
    unknown = used - exported_metric_names(agent_registry)
    assert not unknown, f"queried but never exported: {sorted(unknown)}"
    for wanted in (
        "gpuwatch_failure_risk",
        "gpuwatch_consumer_lag_messages",
        "gpuwatch_remediation_actions_total",
        "gpuwatch_gpu_temperature_celsius",
        "gpuwatch_gpu_power_ratio",
        "gpuwatch_inference_latency_seconds_bucket",
        "gpuwatch_stream_samples_total",
    ):
        assert wanted in dashboard, f"the dashboard has no panel on {wanted}"


def test_dashboard_has_the_operator_panels() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "gpuwatch.json").read_text())
    kinds = {p["title"]: p["type"] for p in dashboard["panels"]}
    assert kinds["Fleet risk by host (highest GPU of each host)"] == "heatmap"
    assert kinds["Riskiest GPUs"] == "table"
    assert {"Remediation timeline", "Pipeline throughput", "Consumer lag"} <= set(kinds)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
