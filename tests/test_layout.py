"""The folder list is the architecture: no stage imports another stage, shared code imports no stage.

Read from the source with `ast` (every import, including ones inside functions), so a lazy import
cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# folder -> the gpuwatch sub-packages its modules may import besides the shared code and their own.
STAGES = {
    "producers": {"schemas", "simulator"},  # the simulator is the agent's --simulate sampler backend
    "streams": {"schemas"},
    "sinks": {"schemas"},
    "controller": {"schemas"},
    "archive": {"schemas"},
}
SHARED_ALLOWED = {"schemas", "kafka", "models"}
LOWER = {
    "schemas": set(),
    "simulator": {"schemas"},
    # Offline replays of the stages (the same feature and decision code, by design), never the apps.
    "training": {"schemas", "simulator", "producers", "streams", "sinks", "controller", "archive"},
}
PACKAGES = set(STAGES) | set(LOWER) | {"apps", "kafka", "models"}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, name) for line, name in out if name == "gpuwatch" or name.startswith("gpuwatch.")]


def _package(module: str) -> str:
    """`gpuwatch.streams.window` -> streams; `gpuwatch.config` -> '' (shared)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else ""


def _violations(folder: str, allowed: set[str]) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in _imports(path):
            pkg = _package(module)
            if pkg and pkg != folder and pkg not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def test_no_stage_imports_another_stage() -> None:
    bad = [v for folder, allowed in STAGES.items() for v in _violations(folder, allowed | SHARED_ALLOWED)]
    assert not bad, "a stage imports another stage (move the shared part to gpuwatch/ or schemas/):\n" + "\n".join(bad)


def test_shared_code_imports_no_stage_or_app() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "gpuwatch").rglob("*.py"))
        if path.name != "__init__.py" or path.parent.name != "gpuwatch"  # the lazy public RiskClient re-export
        for line, module in _imports(path)
        if _package(module) not in {"", *SHARED_ALLOWED}
    ]
    assert not bad, "shared code imports a stage or an app:\n" + "\n".join(bad)


def test_schemas_simulator_and_training_stay_below_the_apps() -> None:
    bad = [v for folder, allowed in LOWER.items() for v in _violations(folder, allowed | SHARED_ALLOWED)]
    assert not bad, "\n".join(bad)


def test_simulator_is_not_in_the_agent_folder() -> None:
    agent_modules = {p.stem for p in (ROOT / "producers").glob("*.py")}
    assert not agent_modules & {"simulator", "fake_nvml", "faults", "feed", "hardware", "lookalikes"}
