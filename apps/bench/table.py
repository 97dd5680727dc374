"""Shared output of the benchmarks: an aligned table on stdout and the same figures as JSON."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import orjson


def machine() -> dict[str, Any]:
    import os

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def emit(title: str, rows: list[tuple[str, Any, str]], figures: dict[str, Any], json_path: str | None) -> None:
    """Print `rows` (key, value, note) as a table; write `figures` (plus machine facts) to `json_path`."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    width = max(len(k) for k, _, _ in rows)
    vwidth = max(len(fmt(v)) for _, v, _ in rows)
    print(f"\n{title}")
    print("-" * (width + vwidth + 40))
    for key, value, note in rows:
        print(f"{key:<{width}}  {fmt(value):>{vwidth}}  {note}")
    print("-" * (width + vwidth + 40))
    if json_path:
        payload = {**figures, "machine": machine(), "measured_at": time.time()}
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        print(f"figures written to {json_path}")
