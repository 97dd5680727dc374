"""Kubernetes: cordon the GPU's node, then evict its pods that request GPUs (stdlib urllib, bearer token).

API calls, in order (the service account needs patch on nodes, list on pods, create on pods/eviction):

* ``PATCH /api/v1/nodes/{host}`` (merge patch): ``spec.unschedulable = true`` and the annotation
  ``gpuwatch.dev/remediation`` (action, id, reason); for reboot also ``gpuwatch.dev/reboot-requested = <id>``
  (repair, for a GPU that has failed, is a migrate whose annotation says so);
* ``GET /api/v1/pods?fieldSelector=spec.nodeName={host}`` (paged);
* ``POST /api/v1/namespaces/{ns}/pods/{name}/eviction`` for each running pod with a container that
  requests or limits the GPU resource (DaemonSet and mirror pods are left, as ``kubectl drain`` does).
  The eviction API honours PodDisruptionBudgets: a pod they protect (429) makes the outcome a failure.

Kubernetes has no reboot call: for reboot the node is cordoned and drained as above and annotated, and a
node reboot agent watching that annotation has to act on it (see docs/remediation.md).
"""

from __future__ import annotations

import logging
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson

from gpuwatch.config import ConfigError, Settings
from gpuwatch.schemas.records import Remediation

from . import Outcome, UnsafeTarget, short_reason, target_values

log = logging.getLogger(__name__)

ANNOTATION = "gpuwatch.dev/remediation"
REBOOT_ANNOTATION = "gpuwatch.dev/reboot-requested"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the bearer token must only go to the configured API server


class KubeError(RuntimeError):
    """An API call failed; `status` is the HTTP status (0 when the server could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KubernetesExecutor:
    """Cordons and drains nodes through the API server at `api_url`.

    The bearer token is read from `token_file` on every call (projected tokens rotate); `ca_file` is the
    server's CA bundle (system CAs when it does not exist). Pods requesting `gpu_resource` are evicted.
    """

    name = "kubernetes"

    def __init__(
        self,
        api_url: str,
        *,
        token_file: str | Path,
        ca_file: str | Path = "",
        gpu_resource: str = "nvidia.com/gpu",
        timeout_s: float = 120.0,
    ) -> None:
        parts = urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"setting 'controller_k8s_api': {api_url!r} is not an http(s) URL")
        self.api_url = api_url.rstrip("/")
        self.token_file = Path(token_file)
        self.gpu_resource = gpu_resource
        self.timeout_s = timeout_s
        handlers: list[Any] = [_NoRedirect]
        if parts.scheme == "https":
            cafile = str(ca_file) if ca_file and Path(ca_file).exists() else None
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)))
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_settings(cls, settings: Settings) -> KubernetesExecutor:
        """From the `controller_k8s_*` settings and `controller_timeout_s`."""
        return cls(
            settings.controller_k8s_api,
            token_file=settings.controller_k8s_token_file,
            ca_file=settings.controller_k8s_ca_file,
            gpu_resource=settings.controller_k8s_gpu_resource,
            timeout_s=settings.controller_timeout_s,
        )

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise KubeError(
                0, f"cannot read the token file {self.token_file} ({exc}); set 'controller_k8s_token_file'"
            ) from None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.api_url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read(500).decode(errors="replace")
            try:
                text = orjson.loads(text).get("message", text)
            except (orjson.JSONDecodeError, AttributeError):
                pass
            raise KubeError(exc.code, f"{method} {path}: {exc.code} {text}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise KubeError(
                0, f"{method} {path}: API server unreachable: {getattr(exc, 'reason', exc)}"
            ) from None
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise KubeError(0, f"{method} {path}: the answer is not JSON: {raw[:200]!r}") from None

    def cordon(self, host: str, annotations: dict[str, str]) -> None:
        """Marks the node unschedulable and annotates it."""
        patch = {"spec": {"unschedulable": True}, "metadata": {"annotations": annotations}}
        self._call("PATCH", f"/api/v1/nodes/{quote(host, safe='')}", patch, "application/merge-patch+json")

    def gpu_pods(self, host: str) -> list[tuple[str, str]]:
        """(namespace, name) of the node's running pods that request the GPU resource."""
        out: list[tuple[str, str]] = []
        cont = ""
        while True:
            query = {"fieldSelector": f"spec.nodeName={host}", "limit": "500"}
            if cont:
                query["continue"] = cont
            page = self._call("GET", "/api/v1/pods?" + urlencode(query)) or {}
            out += [_pod_id(p) for p in page.get("items", []) if self._evictable_gpu_pod(p)]
            cont = (page.get("metadata") or {}).get("continue") or ""
            if not cont:
                return out

    def _evictable_gpu_pod(self, pod: dict[str, Any]) -> bool:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return False
        if "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
            return False
        if any(ref.get("kind") == "DaemonSet" for ref in meta.get("ownerReferences") or []):
            return False
        for container in spec.get("containers") or []:
            res = container.get("resources") or {}
            for kind in ("limits", "requests"):
                if str((res.get(kind) or {}).get(self.gpu_resource, "0")) not in ("0", ""):
                    return True
        return False

    def evict(self, namespace: str, name: str) -> None:
        """Asks the eviction API to remove one pod (honouring PodDisruptionBudgets)."""
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        self._call(
            "POST",
            f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}/eviction",
            body,
        )

    def execute(self, event: Remediation) -> Outcome:
        try:
            host = target_values(event)["host"]
        except UnsafeTarget as exc:
            log.warning("remediation %s refused: %s", event.id, exc)
            return Outcome(ok=False, detail=f"refused: {exc}")
        action = event.action
        if action not in ("migrate", "reboot", "repair"):
            return Outcome(
                ok=False,
                detail=f"the kubernetes executor does not {action}; checkpoints go to the node agent",
            )
        annotations = {ANNOTATION: short_reason(event, 250)}
        if action == "reboot":
            annotations[REBOOT_ANNOTATION] = event.id
        try:
            self.cordon(host, annotations)
            pods = self.gpu_pods(host)
        except KubeError as exc:
            log.warning("remediation %s on %s failed: %s", event.id, host, exc)
            return Outcome(ok=False, detail=str(exc))
        evicted, blocked, failed = [], [], []
        for ns, name in pods:
            try:
                self.evict(ns, name)
                evicted.append(f"{ns}/{name}")
            except KubeError as exc:
                if exc.status == 404:
                    evicted.append(f"{ns}/{name} (already gone)")
                elif exc.status == 429:
                    blocked.append(f"{ns}/{name}")
                else:
                    failed.append(f"{ns}/{name}: {exc}")
        parts = [
            f"cordoned {host}",
            f"evicted {len(evicted)} GPU pods" + (f" ({', '.join(evicted)})" if evicted else ""),
        ]
        if blocked:
            parts.append(f"{len(blocked)} blocked by a PodDisruptionBudget ({', '.join(blocked)})")
        if failed:
            parts.append(f"{len(failed)} evictions failed ({'; '.join(failed)})")
        if action == "reboot":
            parts.append(f"reboot requested by annotation {REBOOT_ANNOTATION}")
        detail = "; ".join(parts)
        ok = not blocked and not failed
        (log.info if ok else log.warning)("remediation %s: %s", event.id, detail)
        return Outcome(ok=ok, detail=detail)


def _pod_id(pod: dict[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return str(meta.get("namespace", "default")), str(meta.get("name", ""))
