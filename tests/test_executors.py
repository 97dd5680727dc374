"""Executors against real programs and real HTTP servers on loopback (no broker needed).

The Kubernetes executor talks to a tiny HTTP server implementing the three API calls it uses. The Slurm
executor is tested against a real Slurm cluster in tests/test_slurm.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import orjson
import pytest

from gpuwatch.config import ConfigError, Settings
from gpuwatch.controller.executors import CheckpointRouter, make_executor
from gpuwatch.controller.executors.command import CommandExecutor
from gpuwatch.controller.executors.dry_run import DryRunExecutor
from gpuwatch.controller.executors.kubernetes import REBOOT_ANNOTATION, KubernetesExecutor
from gpuwatch.controller.executors.webhook import WebhookExecutor, webhook_signature
from gpuwatch.schemas.codecs import decode_remediation, remediation_id
from gpuwatch.schemas.fields import Action
from gpuwatch.schemas.records import Remediation

MALICIOUS_HOSTS = [
    "node1; rm -rf /",
    "node1 && reboot",
    "$(reboot)",
    "-oProxyCommand=x",
    "node1\n",
    "a/b",
    "",
]


def event(action: Action = "migrate", host: str = "node-0003", gpu: Any = 5) -> Remediation:
    """A remediation event as the controller hands it over; `host` and `gpu` may be anything (a typed record
    built by hand is not checked: the executors check what reaches a command line)."""
    return Remediation(
        id=remediation_id("node-0003", 5, "GPU-abc", action, 1_750_000_000.0),
        host=host,
        gpu_index=gpu,
        uuid="GPU-abc",
        action=action,
        reason="risk 0.97 >= 0.85, mode memory",
        risk=0.97,
        ts=1_750_000_360.0,
    )


def recorder(tmp_path: Path, name: str = "record", body: str = "") -> tuple[Path, Path]:
    """An executable Python script appending its argv (and GPUWATCH_* env names) as JSON lines to a log."""
    log = tmp_path / f"{name}.jsonl"
    script = tmp_path / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': sorted(k for k in os.environ if k.startswith('GPUWATCH_'))}) + '\\n')\n"
        + body
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ------------------------------------------------------------------------------------------ command


def test_command_runs_the_template_as_an_argument_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUWATCH_COMMAND_SIGNING_KEY", "do-not-leak-0123456789")
    script, log = recorder(tmp_path)
    ex = CommandExecutor(f"{script} --node={{host}} {{gpu_index}} '{{action}} now' {{id}} {{risk}}")
    outcome = ex.execute(event())
    assert outcome.ok and "exit 0" in outcome.detail
    [call] = calls(log)
    assert call["argv"] == ["--node=node-0003", "5", "migrate now", event().id, "0.9700"]
    assert call["env"] == []  # settings (and their secrets) are not passed to the program


@pytest.mark.parametrize("host", MALICIOUS_HOSTS)
def test_command_refuses_a_malicious_host_before_running_anything(tmp_path: Path, host: str) -> None:
    script, log = recorder(tmp_path)
    outcome = CommandExecutor([str(script), "{host}", "{gpu_index}"]).execute(event(host=host))
    assert not outcome.ok and outcome.detail.startswith("refused: host")
    assert not log.exists()


@pytest.mark.parametrize("gpu", ["5", "5; reboot", -1, True, 2.0, None])
def test_command_refuses_a_gpu_index_that_is_not_a_non_negative_int(tmp_path: Path, gpu: Any) -> None:
    script, log = recorder(tmp_path)
    outcome = CommandExecutor([str(script), "{gpu_index}"]).execute(event(gpu=gpu))
    assert not outcome.ok and "gpu_index" in outcome.detail and not log.exists()


def test_command_failures_timeouts_and_missing_programs_are_failed_outcomes(tmp_path: Path) -> None:
    failing, _ = recorder(tmp_path, "fail", "sys.stderr.write('node is busy'); sys.exit(3)\n")
    outcome = CommandExecutor([str(failing), "{host}"]).execute(event())
    assert not outcome.ok and "exit 3: node is busy" in outcome.detail

    slow, log = recorder(tmp_path, "slow", "import time; time.sleep(60)\n")
    outcome = CommandExecutor([str(slow), "{host}"], timeout_s=0.5).execute(event())
    assert not outcome.ok and "timed out (killed)" in outcome.detail and len(calls(log)) == 1

    outcome = CommandExecutor([str(tmp_path / "missing"), "{host}"]).execute(event())
    assert not outcome.ok and "cannot run" in outcome.detail


@pytest.mark.parametrize(
    "template, message",
    [
        ("", "is empty"),
        ("{host} x", "must be fixed"),
        ("/bin/drain {host.__class__}", "not allowed"),
        ("/bin/drain {host!r}", "not allowed"),
        ("/bin/drain {hostname}", "not allowed"),
        ("/bin/drain '{host}", "cannot split"),
    ],
)
def test_command_templates_are_checked_when_configured(template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CommandExecutor(template)


# ------------------------------------------------------------------------------------------ HTTP servers


Route = Callable[[BaseHTTPRequestHandler, bytes], tuple[int, dict[str, str], bytes]]


class Server:
    """A real HTTP server on 127.0.0.1 that records each request and answers with `route`."""

    def __init__(self, route: Route) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
                status, headers, out = route(self, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PATCH = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def serve() -> Iterator[Callable[[Route], Server]]:
    servers: list[Server] = []

    def start(route: Route) -> Server:
        servers.append(Server(route))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# ------------------------------------------------------------------------------------------ webhook


def test_webhook_posts_the_event_with_a_verifiable_signature(serve: Callable[[Route], Server]) -> None:
    server = serve(lambda req, body: (202, {}, b"queued"))
    key = b"webhook-key-0123456789"
    ev = event()
    outcome = WebhookExecutor(server.url + "/hooks/gpu", key=key, timeout_s=5).execute(ev)
    assert outcome.ok and "answered 202: queued" in outcome.detail
    [req] = server.requests
    assert (req["method"], req["path"]) == ("POST", "/hooks/gpu")
    assert (
        orjson.loads(req["body"]) == msgspec.to_builtins(ev)
        and req["headers"]["Content-Type"] == "application/json"
    )
    assert decode_remediation(req["body"]) == ev and req["headers"]["X-Gpuwatch-Id"] == ev.id
    stamp = req["headers"]["X-Gpuwatch-Timestamp"]
    expected = "sha256=" + hmac.new(key, stamp.encode() + b"." + req["body"], hashlib.sha256).hexdigest()
    assert req["headers"]["X-Gpuwatch-Signature"] == expected == webhook_signature(key, stamp, req["body"])


def test_webhook_errors_redirects_and_unreachable_servers_fail(serve: Callable[[Route], Server]) -> None:
    failing = serve(lambda req, body: (500, {}, b"database down"))
    outcome = WebhookExecutor(failing.url, timeout_s=5).execute(event())
    assert not outcome.ok and "500" in outcome.detail and "database down" in outcome.detail
    assert "X-Gpuwatch-Signature" not in failing.requests[0]["headers"]  # no key: unsigned

    elsewhere = serve(lambda req, body: (200, {}, b"ok"))
    moving = serve(lambda req, body: (307, {"Location": elsewhere.url}, b""))
    outcome = WebhookExecutor(moving.url, timeout_s=5).execute(event())
    assert not outcome.ok and "307" in outcome.detail and elsewhere.requests == []  # not followed

    port = failing.httpd.server_address[1]
    failing.close()
    outcome = WebhookExecutor(f"http://127.0.0.1:{port}/", timeout_s=5).execute(event())
    assert not outcome.ok and "unreachable" in outcome.detail

    outcome = WebhookExecutor(elsewhere.url, timeout_s=5).execute(event(host="node1; rm -rf /"))
    assert not outcome.ok and outcome.detail.startswith("refused") and elsewhere.requests == []
    with pytest.raises(ConfigError, match="controller_webhook_url"):
        WebhookExecutor("file:///etc/passwd")


# ------------------------------------------------------------------------------------------ kubernetes


def pod(name: str, *, gpu: str | None = None, where: str = "limits", **extra: Any) -> dict[str, Any]:
    resources = {where: {"nvidia.com/gpu": gpu, "cpu": "4"}} if gpu else {"requests": {"cpu": "1"}}
    meta = {"name": name, "namespace": extra.pop("namespace", "train"), **extra.pop("meta", {})}
    return {
        "metadata": meta,
        "spec": {"nodeName": "node-0003", "containers": [{"name": "c", "resources": resources}]},
        "status": {"phase": extra.pop("phase", "Running")},
    }


class FakeKube:
    """The few API endpoints the executor uses, with pods of every kind on node-0003."""

    PAGES = [
        [
            pod("trainer-0", gpu="8"),
            pod("web", namespace="default"),
            pod("notebook", gpu="1", where="requests"),
        ],
        [
            pod("dcgm", gpu="1", meta={"ownerReferences": [{"kind": "DaemonSet", "name": "dcgm"}]}),
            pod("done", gpu="1", phase="Succeeded"),
            pod("static", gpu="1", meta={"annotations": {"kubernetes.io/config.mirror": "x"}}),
            pod("protected", gpu="2"),
        ],
    ]

    def __init__(self, pdb_blocks: bool = True) -> None:
        self.pdb_blocks = pdb_blocks

    def __call__(self, req: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(req.path)
        if req.command == "PATCH" and url.path == "/api/v1/nodes/node-0003":
            return 200, {}, b'{"kind": "Node"}'
        if req.command == "GET" and url.path == "/api/v1/pods":
            query = parse_qs(url.query)
            assert query["fieldSelector"] == ["spec.nodeName=node-0003"]
            page = int(query.get("continue", ["0"])[0])
            meta = {"continue": str(page + 1)} if page + 1 < len(self.PAGES) else {}
            return 200, {}, orjson.dumps({"kind": "PodList", "metadata": meta, "items": self.PAGES[page]})
        if req.command == "POST" and url.path.endswith("/eviction"):
            if self.pdb_blocks and "/pods/protected/" in url.path:
                return (
                    429,
                    {},
                    b'{"message": "Cannot evict pod as it would violate the pod\'s disruption budget."}',
                )
            return 201, {}, b'{"kind": "Status"}'
        return 404, {}, b'{"message": "not found"}'


def kube(server: Server, tmp_path: Path) -> KubernetesExecutor:
    token = tmp_path / "token"
    token.write_text("sa-token-123\n")
    return KubernetesExecutor(server.url, token_file=token, timeout_s=5)


def test_kubernetes_cordons_then_evicts_only_running_gpu_pods(
    serve: Callable[[Route], Server], tmp_path: Path
) -> None:
    server = serve(FakeKube(pdb_blocks=False))
    outcome = kube(server, tmp_path).execute(event("migrate"))
    assert outcome.ok, outcome.detail
    reqs = server.requests
    assert all(r["headers"]["Authorization"] == "Bearer sa-token-123" for r in reqs)
    patch = reqs[0]
    assert (patch["method"], patch["path"]) == ("PATCH", "/api/v1/nodes/node-0003")
    assert patch["headers"]["Content-Type"] == "application/merge-patch+json"
    body = orjson.loads(patch["body"])
    assert body["spec"] == {"unschedulable": True}
    assert body["metadata"]["annotations"]["gpuwatch.dev/remediation"].startswith("gpuwatch: migrate GPU 5")
    assert [r["method"] for r in reqs[1:3]] == ["GET", "GET"]  # two pages of pods
    evictions = [(r["path"], orjson.loads(r["body"])) for r in reqs[3:]]
    assert [p for p, _ in evictions] == [
        "/api/v1/namespaces/train/pods/trainer-0/eviction",
        "/api/v1/namespaces/train/pods/notebook/eviction",
        "/api/v1/namespaces/train/pods/protected/eviction",
    ]
    assert evictions[0][1] == {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "trainer-0", "namespace": "train"},
    }
    assert "evicted 3 GPU pods" in outcome.detail


def test_kubernetes_reports_pods_protected_by_a_disruption_budget_and_requests_reboots(
    serve: Callable[[Route], Server], tmp_path: Path
) -> None:
    server = serve(FakeKube(pdb_blocks=True))
    outcome = kube(server, tmp_path).execute(event("reboot"))
    assert not outcome.ok
    assert (
        "evicted 2 GPU pods" in outcome.detail
        and "1 blocked by a PodDisruptionBudget (train/protected)" in outcome.detail
    )
    annotations = orjson.loads(server.requests[0]["body"])["metadata"]["annotations"]
    assert annotations[REBOOT_ANNOTATION] == event("reboot").id


def test_kubernetes_refusals_and_unreachable_api(serve: Callable[[Route], Server], tmp_path: Path) -> None:
    server = serve(FakeKube())
    ex = kube(server, tmp_path)
    assert not ex.execute(event(host="node1; rm -rf /")).ok and server.requests == []
    assert not ex.execute(event("checkpoint")).ok and server.requests == []
    missing = KubernetesExecutor(server.url, token_file=tmp_path / "none", timeout_s=5).execute(event())
    assert not missing.ok and "token file" in missing.detail
    port = server.httpd.server_address[1]
    server.close()
    down = KubernetesExecutor(f"http://127.0.0.1:{port}", token_file=tmp_path / "token", timeout_s=5)
    outcome = down.execute(event())
    assert not outcome.ok and "unreachable" in outcome.detail


# ------------------------------------------------------------------------------------------ make_executor


def test_make_executor_builds_each_kind_and_routes_checkpoints(tmp_path: Path) -> None:
    key = "controller-key-0123456789"
    assert isinstance(make_executor(Settings()), DryRunExecutor)
    assert isinstance(make_executor(Settings(command_signing_key=key)), DryRunExecutor)  # dry run never acts
    slurm = make_executor(Settings(controller_executor="slurm", controller_scontrol="/x/scontrol"))
    assert isinstance(slurm, CheckpointRouter) and slurm.name == "slurm+dry-run"
    assert slurm.execute(event("checkpoint")).dry_run  # no key: checkpoints are only logged
    assert make_executor(Settings(controller_executor="kubernetes", command_signing_key=key)).name == (
        "kubernetes+agent-command"
    )
    script, log = recorder(tmp_path)
    command = make_executor(
        Settings(controller_executor="command", controller_command=f"{script} {{action}}")
    )
    assert command.name == "command" and command.execute(event("checkpoint")).ok  # gets every action
    assert calls(log)[0]["argv"] == ["checkpoint"]
    assert (
        make_executor(Settings(controller_executor="webhook", controller_webhook_url="http://h/")).name
        == "webhook"
    )
    with pytest.raises(ConfigError, match="controller_command"):
        make_executor(Settings(controller_executor="command"))
    with pytest.raises(ConfigError, match="controller_webhook_url"):
        make_executor(Settings(controller_executor="webhook"))
    with pytest.raises(ConfigError, match="command_signing_key"):
        make_executor(Settings(controller_executor="slurm", command_signing_key="short"))
