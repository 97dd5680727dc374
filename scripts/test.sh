#!/usr/bin/env bash
# Set up .venv, then run the whole test suite against real servers started by fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# .venv/bin/pytest, not `python -m pytest`: the latter would import the source folder gpuwatch/ instead
# of the installed package (whose stage sub-packages are mapped from producers/, streams/, ...).
exec .venv/bin/pytest -q "$@"
