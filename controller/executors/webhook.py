"""POSTs each remediation event as JSON to an HTTP(S) endpoint (stdlib urllib; no redirects followed).

Headers: ``X-Gpuwatch-Id`` (the event id: de-duplicate on it), ``X-Gpuwatch-Timestamp`` (unix seconds)
and, with a key, ``X-Gpuwatch-Signature: sha256=<hex>``, the HMAC-SHA256 of ``<timestamp>.<body>``.
A receiver recomputes it with `webhook_signature` (or any HMAC library) and rejects old timestamps.
Any 2xx answer is success.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import msgspec
import orjson

from gpuwatch.config import ConfigError
from gpuwatch.schemas.records import Remediation

from . import Outcome, UnsafeTarget, target_values

log = logging.getLogger(__name__)


def webhook_signature(key: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Gpuwatch-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``."""
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirected POST would lose its body or reach an unexpected host


class WebhookExecutor:
    """POSTs events to `url` with an optional HMAC `key`; each request may take `timeout_s`."""

    name = "webhook"

    def __init__(self, url: str, *, key: bytes | None = None, timeout_s: float = 120.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"setting 'controller_webhook_url': {url!r} is not an http(s) URL")
        if not key:
            log.warning(
                "webhook %s://%s: no controller_webhook_key, requests are unsigned",
                parts.scheme,
                parts.netloc,
            )
        self.url = url
        self._key = key
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirect)

    def request(self, event: Remediation, now: float | None = None) -> urllib.request.Request:
        """The POST for `event` (body: the `gpuwatch.remediation/1` record as JSON with sorted keys)."""
        body = orjson.dumps(msgspec.to_builtins(event), option=orjson.OPT_SORT_KEYS)
        stamp = str(int(time.time() if now is None else now))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "gpuwatch-controller",
            "X-Gpuwatch-Id": event.id,
            "X-Gpuwatch-Timestamp": stamp,
        }
        if self._key:
            headers["X-Gpuwatch-Signature"] = webhook_signature(self._key, stamp, body)
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def execute(self, event: Remediation) -> Outcome:
        try:
            target_values(event)
        except UnsafeTarget as exc:
            log.warning("remediation %s refused: %s", event.id, exc)
            return Outcome(ok=False, detail=f"refused: {exc}")
        where = urlsplit(self.url).netloc
        try:
            with self._opener.open(self.request(event), timeout=self.timeout_s) as resp:
                status, text = resp.status, resp.read(300).decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read(300).decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            return Outcome(ok=False, detail=f"webhook {where} unreachable: {getattr(exc, 'reason', exc)}")
        ok = 200 <= status < 300
        detail = f"webhook {where} answered {status}" + (f": {text.strip()}" if text.strip() else "")
        (log.info if ok else log.warning)("remediation %s: %s", event.id, detail)
        return Outcome(ok=ok, detail=detail)
