"""Signed agent commands: what verify accepts and what it refuses, and why (no servers)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import orjson
import pytest

from gpuwatch.config import ConfigError, Settings
from gpuwatch.signing import (
    CommandRejected,
    FileNonceStore,
    MemoryNonceStore,
    canonical,
    parse_keys,
    sign,
    verify,
)

KEY = b"current-key-0123456789abcdef"
OLD = b"previous-key-0123456789abcdef"
NOW = 1_750_000_000.0
COMMAND = {
    "schema": "gpuwatch.command/1",
    "id": "6d7e8c9d8378abed",
    "host": "node-0003",
    "gpu_index": 5,
    "uuid": "GPU-1",
    "action": "checkpoint",
    "reason": "risk 0.91",
    "risk": 0.91,
}


def rejected(
    command: object, keys: list[bytes], *, now: float = NOW, store: MemoryNonceStore | None = None
) -> str:
    with pytest.raises(CommandRejected) as info:
        verify(command, keys, now=now, seen_nonces=store if store is not None else MemoryNonceStore())
    return info.value.reason


def test_a_signed_command_verifies_once_and_its_replay_is_refused() -> None:
    signed = sign(COMMAND, KEY, now=NOW, ttl_s=300)
    assert {k: signed[k] for k in COMMAND} == COMMAND
    assert signed["issued_at"] == NOW and signed["expires_at"] == NOW + 300 and len(signed["nonce"]) == 32
    # the MAC is HMAC-SHA256 over the sorted-key JSON of every field but sig
    body = orjson.dumps({k: v for k, v in signed.items() if k != "sig"}, option=orjson.OPT_SORT_KEYS)
    assert signed["sig"] == hmac.new(KEY, body, hashlib.sha256).hexdigest() and canonical(signed) == body

    store = MemoryNonceStore()
    wire = orjson.loads(orjson.dumps(signed))  # what the agent decodes
    verify(wire, [KEY], now=NOW + 1, seen_nonces=store)
    assert rejected(orjson.loads(orjson.dumps(signed)), [KEY], now=NOW + 2, store=store) == "replayed"
    assert sign(COMMAND, KEY, now=NOW)["nonce"] != signed["nonce"]


def test_unsigned_forged_tampered_and_malformed_commands_are_refused() -> None:
    signed = sign(COMMAND, KEY, now=NOW)
    assert rejected({k: v for k, v in signed.items() if k != "sig"}, [KEY]) == "unsigned"
    assert rejected({**signed, "sig": ""}, [KEY]) == "unsigned"
    assert rejected(sign(COMMAND, b"attacker-key-0123456789abcdef", now=NOW), [KEY]) == "forged"
    assert rejected({**signed, "gpu_index": 6}, [KEY]) == "forged"  # any changed field breaks the MAC
    assert rejected({**signed, "extra": 1}, [KEY]) == "forged"  # so does an added one
    assert rejected({**signed, "sig": signed["sig"].upper()}, [KEY]) == "forged"
    assert rejected({**signed, "sig": "00" * 32}, [KEY]) == "forged"
    assert rejected(signed, []) == "forged"  # an agent without keys accepts nothing
    assert rejected(["not", "an", "object"], [KEY]) == "malformed"
    no_nonce = {k: v for k, v in signed.items() if k not in ("nonce", "sig")}
    no_nonce["sig"] = hmac.new(KEY, canonical(no_nonce), hashlib.sha256).hexdigest()
    assert rejected(no_nonce, [KEY]) == "malformed"  # authentic but incomplete


def test_expiry_clock_skew_and_longest_validity() -> None:
    signed = sign(COMMAND, KEY, now=NOW, ttl_s=60)
    verify(signed, [KEY], now=NOW + 60, seen_nonces=MemoryNonceStore())  # still valid at expires_at
    assert rejected(signed, [KEY], now=NOW + 61) == "expired"
    assert rejected(signed, [KEY], now=NOW - 61) == "not_yet_valid"  # issued more than 60 s ahead of us
    verify(signed, [KEY], now=NOW - 59, seen_nonces=MemoryNonceStore())  # within the tolerated skew
    long = {**signed, "expires_at": NOW + 7200}
    long["sig"] = hmac.new(KEY, canonical(long), hashlib.sha256).hexdigest()
    assert rejected(long, [KEY]) == "malformed"
    with pytest.raises(ValueError, match="ttl_s"):
        sign(COMMAND, KEY, ttl_s=7200)


def test_key_rotation_accepts_current_and_previous_keys_and_signs_with_the_first() -> None:
    keys = parse_keys(f" {KEY.decode()} , {OLD.decode()} ")
    assert keys == [KEY, OLD]
    verify(sign(COMMAND, OLD, now=NOW), keys, now=NOW, seen_nonces=MemoryNonceStore())
    verify(sign(COMMAND, keys[0], now=NOW), [KEY], now=NOW, seen_nonces=MemoryNonceStore())
    assert rejected(sign(COMMAND, OLD, now=NOW), [KEY]) == "forged"  # once the old key is removed
    assert parse_keys("") == []


def test_short_keys_are_a_config_error_that_does_not_echo_the_key() -> None:
    with pytest.raises(ConfigError, match="key #2 has 5 characters") as info:
        parse_keys(f"{KEY.decode()},hunt2")
    assert "hunt2" not in str(info.value)
    masked = Settings(command_signing_key=KEY.decode(), controller_webhook_key="webhook-secret").redacted()
    assert masked["command_signing_key"] == "***" and masked["controller_webhook_key"] == "***"


def test_memory_store_is_bounded_and_forgets_only_expired_nonces() -> None:
    store = MemoryNonceStore(max_entries=2)
    assert store.claim("a" * 16, NOW + 10, NOW) and store.claim("b" * 16, NOW + 500, NOW)
    with pytest.raises(CommandRejected) as info:
        store.claim("c" * 16, NOW + 10, NOW)  # full, and nothing has expired: refuse rather than forget
    assert info.value.reason == "nonce_store_full"
    assert store.claim("c" * 16, NOW + 200, NOW + 100)  # "a" expired (plus the skew margin) and made room
    assert not store.claim("b" * 16, NOW + 500, NOW + 100)


def test_file_store_remembers_nonces_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "nonces.json"
    signed = sign(COMMAND, KEY, now=NOW)
    verify(signed, [KEY], now=NOW, seen_nonces=FileNonceStore(path))
    restarted = FileNonceStore(path)
    assert rejected(signed, [KEY], now=NOW + 1, store=restarted) == "replayed"
    later = FileNonceStore(path)
    later.claim("z" * 16, NOW + 10_000, NOW + 5000)  # rewriting drops nonces long expired
    assert signed["nonce"] not in orjson.loads(path.read_bytes())
    path.write_text("{not json")
    with pytest.raises(ValueError, match="delete it to start over"):
        FileNonceStore(path)


def test_a_nonce_that_cannot_be_written_to_disk_refuses_the_command(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    store = FileNonceStore(blocker / "nonces.json")
    signed = sign(COMMAND, KEY, now=NOW)
    assert rejected(signed, [KEY], store=store) == "nonce_store_error"
    assert len(store) == 0  # not remembered either, so fixing the disk lets a redelivery run it once


def test_a_typed_command_is_signed_as_its_wire_object_and_verifies_after_the_trip() -> None:
    from gpuwatch.schemas.codecs import decode_command, encode_command
    from gpuwatch.schemas.records import Command
    from gpuwatch.signing import sign_command

    unsigned = Command(
        id="abc",
        host="node-0003",
        gpu_index=5,
        uuid="GPU-1",
        action="checkpoint",
        reason="r",
        risk=0.91,
        nonce="",
        issued_at=0.0,
        expires_at=0.0,
        sig="",
    )
    signed = sign_command(unsigned, KEY, now=NOW, ttl_s=300)
    assert (signed.issued_at, signed.expires_at, len(signed.nonce), signed.id) == (NOW, NOW + 300, 32, "abc")
    raw = encode_command(signed)
    assert decode_command(raw) == signed
    verify(orjson.loads(raw), [KEY], now=NOW, seen_nonces=MemoryNonceStore())  # what an agent does with it
