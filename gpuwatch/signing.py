"""Signed commands between the controller and node agents: HMAC-SHA256 with a shared key, nonces, expiry.

The controller signs with `sign_command(command, key)` (`sign` for any JSON object); an agent checks with `verify(command, keys, now=...,
seen_nonces=...)`, which raises `CommandRejected(reason)` for unsigned, forged, malformed, expired or
replayed commands. The MAC covers the canonical encoding of every field except ``sig`` (orjson, sorted
keys), so no field can be changed, added or removed. Keys rotate by listing several (newest first):
commands signed with any listed key verify, new ones are signed with the first (docs/remediation.md).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import orjson

from gpuwatch.config import COMMAND_MAX_TTL_S, ConfigError
from gpuwatch.schemas.records import Command

MIN_KEY_CHARS = 16
MAX_TTL_S = COMMAND_MAX_TTL_S
CLOCK_SKEW_S = 60.0  # tolerated difference between controller and node clocks
_SIG_RE = re.compile(r"[0-9a-f]{64}")


class CommandRejected(Exception):
    """A command failed verification; `reason` is one word (unsigned, forged, malformed, expired,
    not_yet_valid, replayed, nonce_store_full, nonce_store_error, wrong_host, unsupported_action), `detail`
    a line for the log (never a key)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_keys(value: str, setting: str = "command_signing_key") -> list[bytes]:
    """The keys of a comma-separated setting, first = the signing key; [] when empty.

    Raises ConfigError (without echoing the keys) when one is shorter than 16 characters.
    """
    keys = [part.strip() for part in value.split(",") if part.strip()]
    for i, key in enumerate(keys):
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(
                f"setting {setting!r}: key #{i + 1} has {len(key)} characters, at least {MIN_KEY_CHARS} are needed; "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
    return [key.encode() for key in keys]


def canonical(command: Mapping[str, Any]) -> bytes:
    """The bytes the MAC covers: every field but ``sig``, as JSON with sorted keys."""
    return orjson.dumps({k: v for k, v in command.items() if k != "sig"}, option=orjson.OPT_SORT_KEYS)


def _mac(key: bytes, command: Mapping[str, Any]) -> str:
    return hmac.new(key, canonical(command), hashlib.sha256).hexdigest()


def _as_key(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else key


def sign(
    command: Mapping[str, Any], key: bytes | str, *, now: float | None = None, ttl_s: float = 300.0
) -> dict[str, Any]:
    """A copy of `command` with a fresh ``nonce``, ``issued_at`` (`now`), ``expires_at`` (+`ttl_s`) and ``sig``."""
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S:g}] seconds, got {ttl_s}")
    issued = time.time() if now is None else float(now)
    out = {k: v for k, v in command.items() if k != "sig"}
    out.update(nonce=secrets.token_hex(16), issued_at=issued, expires_at=issued + ttl_s)
    out["sig"] = _mac(_as_key(key), out)
    return out


_SIGNATURE_FIELDS = ("nonce", "issued_at", "expires_at", "sig")


def sign_command(
    command: Command, key: bytes | str, *, now: float | None = None, ttl_s: float = 300.0
) -> Command:
    """`command` signed as `sign` signs: its nonce, issued_at, expires_at and sig replaced by fresh ones."""
    fields = {k: v for k, v in msgspec.to_builtins(command).items() if k not in _SIGNATURE_FIELDS}
    return msgspec.convert(sign(fields, key, now=now, ttl_s=ttl_s), Command)


class NonceStore(Protocol):
    """Remembers the nonces of accepted commands until they expire, so each command runs once."""

    def claim(self, nonce: str, expires_at: float, now: float) -> bool:
        """True if `nonce` was new (it is now remembered); False if it was seen before.

        Raises CommandRejected("nonce_store_full") rather than forget a nonce that has not expired.
        """
        ...


class MemoryNonceStore:
    """Nonces in memory: a restart forgets them (a command could then be replayed until it expires)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        # kept past expires_at by the clock skew, so a clock step back cannot revive a nonce
        self._expiry = {n: t for n, t in self._expiry.items() if t + CLOCK_SKEW_S >= now}

    def claim(self, nonce: str, expires_at: float, now: float) -> bool:
        with self._lock:
            if nonce in self._expiry:
                return False
            if len(self._expiry) >= self.max_entries:
                self._prune(now)
                if len(self._expiry) >= self.max_entries:
                    raise CommandRejected(
                        "nonce_store_full", f"{self.max_entries} unexpired nonces remembered"
                    )
            self._expiry[nonce] = expires_at
            return True

    def __len__(self) -> int:
        return len(self._expiry)


class FileNonceStore(MemoryNonceStore):
    """Nonces in a small JSON file (rewritten atomically on each claim), so a restarted agent still
    refuses replays. Bounded: expired nonces are dropped, and at most `max_entries` are kept."""

    def __init__(self, path: str | Path, max_entries: int = 10_000) -> None:
        super().__init__(max_entries)
        self.path = Path(path)
        if self.path.exists():
            try:
                data = orjson.loads(self.path.read_bytes() or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self._expiry = {str(n): float(t) for n, t in data.items()}
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"nonce file {self.path} is unreadable ({exc}); delete it to start over "
                    f"(commands issued in the last {MAX_TTL_S:g} s could then be replayed once)"
                ) from exc

    def claim(self, nonce: str, expires_at: float, now: float) -> bool:
        if not super().claim(nonce, expires_at, now):
            return False
        with self._lock:
            self._prune(now)
            tmp: str | None = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
                with os.fdopen(fd, "wb") as f:
                    f.write(orjson.dumps(self._expiry))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except OSError as exc:
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
                del self._expiry[nonce]  # not durably remembered: refuse it now rather than risk a second run
                raise CommandRejected("nonce_store_error", f"cannot write {self.path}: {exc}") from None
        return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def verify(
    command: Any,
    keys: Sequence[bytes | str],
    *,
    now: float,
    seen_nonces: NonceStore,
    skew_s: float = CLOCK_SKEW_S,
    max_ttl_s: float = MAX_TTL_S,
) -> None:
    """Returns if `command` is authentic, current and new; raises CommandRejected(reason) otherwise.

    Checks, in order: a ``sig`` is present (unsigned), it matches one of `keys` in constant time
    (forged), nonce / issued_at / expires_at are well formed (malformed), ``issued_at <= now + skew_s``
    (not_yet_valid), ``now <= expires_at`` (expired), the validity is at most `max_ttl_s` (malformed),
    and the nonce was never accepted before (replayed; it is remembered in `seen_nonces` on success).
    """
    if not isinstance(command, dict):
        raise CommandRejected("malformed", "a command is a JSON object")
    sig = command.get("sig")
    if sig in (None, ""):
        raise CommandRejected("unsigned", "no sig field")
    if not keys:
        raise CommandRejected("forged", "this agent has no signing key configured")
    if not isinstance(sig, str) or not _SIG_RE.fullmatch(sig):
        raise CommandRejected("forged", "sig is not 64 lower-case hex digits")
    try:
        macs = [_mac(_as_key(key), command) for key in keys]
    except TypeError as exc:
        raise CommandRejected("malformed", f"cannot encode the command: {exc}") from None
    # every key is compared (no early exit), each in constant time
    if not sum(hmac.compare_digest(mac, sig) for mac in macs):
        raise CommandRejected("forged", "signature matches none of the configured keys")
    nonce, issued, expires = command.get("nonce"), command.get("issued_at"), command.get("expires_at")
    if (
        not isinstance(nonce, str)
        or not 16 <= len(nonce) <= 128
        or not _number(issued)
        or not _number(expires)
    ):
        raise CommandRejected("malformed", "needs a nonce (16-128 characters), issued_at and expires_at")
    assert issued is not None and expires is not None  # _number() rejected anything else
    if issued > now + skew_s:
        raise CommandRejected("not_yet_valid", f"issued {issued - now:.0f} s in the future; check NTP")
    if now > expires:
        raise CommandRejected("expired", f"expired {now - expires:.0f} s ago")
    if expires - issued > max_ttl_s:
        raise CommandRejected(
            "malformed", f"valid for {expires - issued:.0f} s, at most {max_ttl_s:g} allowed"
        )
    if not seen_nonces.claim(nonce, float(expires), now):
        raise CommandRejected("replayed", f"nonce {nonce} was accepted before")
