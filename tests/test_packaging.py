"""A non-editable install exposes the stages under the gpuwatch namespace and nothing generic."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("gpuwatch-*.whl")
    return path


def test_wheel_namespaces_stage_packages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"gpuwatch"}, f"generic top-level packages installed: {top - {'gpuwatch'}}"
    for module in ("producers/simulator.py", "streams/window.py", "sinks/redis_writer.py", "schemas/codecs.py",
                   "controller/worker.py", "training/train.py", "schemas/samples.json", "models/default.pt"):
        assert f"gpuwatch/{module}" in names, f"{module} missing from the wheel"


def test_non_editable_install_imports_every_stage(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    code = (
        "import gpuwatch.producers, gpuwatch.streams.window, gpuwatch.sinks.redis_writer, gpuwatch.schemas.codecs, "
        "gpuwatch.controller.worker, gpuwatch.training.train\n"
        "from gpuwatch.streams.model import load_artifact; load_artifact()\n"
        "from gpuwatch.schemas.codecs import load_schema; load_schema('samples')\n"
        "import gpuwatch.streams as s; print(s.__file__)"
    )
    # -P and a neutral cwd: only the installed copy can be found, never the source tree.
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target / "gpuwatch" / "streams"))
