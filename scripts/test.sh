#!/usr/bin/env bash
# Set up .venv, then run the whole test suite against real servers started by fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# tests/test_federated.py needs the federated extra (Flower, ~240 MB with what it pulls): installed here, not in
# setup-venv.sh, so that a development venv stays quick to make. The pin is read from pyproject.toml.
if ! .venv/bin/python -c "import flwr" 2>/dev/null; then
  echo "[setup] installing the federated extra (Flower)" >&2
  .venv/bin/python -m pip install -q $(.venv/bin/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['federated']))") \
    || echo "[setup] could not install Flower; tests/test_federated.py will fail with instructions" >&2
fi
# The alert-rule and Prometheus tests need Debian's prometheus package (promtool + server).
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's prometheus package (promtool, prometheus)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "[setup] could not install prometheus; its tests will fail with instructions" >&2
fi
# The Kafka TLS tests make their certificates with openssl.
if ! command -v openssl >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing openssl (test certificates)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null) \
    || echo "[setup] could not install openssl; the TLS tests will fail with instructions" >&2
fi
# The Slurm executor's tests run a real one-node cluster: Debian's slurmctld, slurmd, munge and scontrol.
need_slurm=0
for program in munged slurmctld slurmd scontrol sinfo; do
  command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || need_slurm=1
done
if [ "$need_slurm" = 1 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's slurmctld, slurmd, munge and slurm-client (the Slurm executor's tests)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd munge slurm-client >/dev/null) \
    || echo "[setup] could not install Slurm; tests/test_slurm.py will fail with instructions" >&2
fi
# .venv/bin/pytest, not `python -m pytest`: the latter would import the source folder gpuwatch/ instead
# of the installed package (whose stage sub-packages are mapped from producers/, streams/, ...).
# Several test processes (pytest-xdist), one test file each at a time: most of the suite's time is waiting on
# real servers (a worker rejoining its group, an outage running its course), not CPU. Every fixture uses free
# ports, its own temp dir and unique topic names. GPUWATCH_TEST_PROCESSES=0 runs the tests in this process (a
# -n on the command line also wins).
processes=${GPUWATCH_TEST_PROCESSES:-3}
if ! [[ "$processes" =~ ^[0-9]+$ ]]; then
  echo "scripts/test.sh: GPUWATCH_TEST_PROCESSES=$processes is not a whole number; set it to 0 (one process) or more" >&2
  exit 2
fi
exec .venv/bin/pytest -q -n "$processes" --dist loadfile "$@"
