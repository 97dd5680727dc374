"""A non-editable install exposes the stages under the gpuwatch namespace and nothing generic."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy: a stale build/ folder in the checkout would hide a missing package.
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("gpuwatch-*.whl")
    return path


def test_wheel_namespaces_stage_packages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"gpuwatch"}, f"generic top-level packages installed: {top - {'gpuwatch'}}"
    for module in ("simulator/fleet.py", "streams/window.py", "sinks/redis_writer.py", "schemas/codecs.py",
                   "controller/worker.py", "training/train.py", "schemas/samples.json", "models/default.pt"):
        assert f"gpuwatch/{module}" in names, f"{module} missing from the wheel"


def test_wheel_ships_every_source_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    stages = {"producers": "producers", "streams": "streams", "sinks": "sinks", "controller": "controller",
              "training": "training", "schemas": "schemas", "archive": "archive", "simulator": "simulator",
              "apps": "apps", "gpuwatch": ""}
    missing = []
    for folder, sub in stages.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            if "__pycache__" in rel:
                continue
            installed = f"gpuwatch/{sub + '/' if sub else ''}{rel}"
            if installed not in names:
                missing.append(installed)
    assert not missing, f"modules left out of the wheel (add their packages to pyproject.toml): {missing}"


def test_non_editable_install_imports_every_stage(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    code = (
        "import gpuwatch.producers, gpuwatch.streams.window, gpuwatch.sinks.redis_writer, gpuwatch.schemas.codecs, "
        "gpuwatch.controller.worker, gpuwatch.training.train, gpuwatch.archive.service, gpuwatch.simulator.fleet, "
        "gpuwatch.apps.cli\n"
        "from gpuwatch.streams.model import load_artifact; load_artifact()\n"
        "from gpuwatch.schemas.codecs import load_schema; load_schema('samples')\n"
        "import gpuwatch.streams as s; print(s.__file__)"
    )
    # -S skips .pth files (so an editable install's finder cannot serve the source tree), -P and a
    # neutral cwd keep the checkout off sys.path: only the installed copy can be imported.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    out = subprocess.run(
        [sys.executable, "-S", "-P", "-c", code], cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(target), *deps]), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target / "gpuwatch" / "streams"))
