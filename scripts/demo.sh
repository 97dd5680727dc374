#!/usr/bin/env bash
# Set up .venv, then run the demo: embedded broker + Redis, simulated fleet, stream worker, sinks, controller.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec .venv/bin/gpuwatch demo "$@"
