# One image for every gpuwatch component (stream, sink, controller, agent); the command picks the role:
#   docker run gpuwatch:dev stream      docker run gpuwatch:dev sink      ...
# Used by compose/docker-compose.yml. Configuration comes only from GPUWATCH_* variables (docs/configuration.md).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first, pinned: an open-ended requirement pulls a multi-GB CUDA build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpuwatch gpuwatch
COPY producers producers
COPY streams streams
COPY sinks sinks
COPY controller controller
COPY training training
COPY schemas schemas
# nvml: the real sampler for node agents (the simulated agent does not need a GPU).
RUN pip install ".[nvml]" && rm -rf /src

# Unprivileged; the agent's DaemonSet grants what NVML and checkpoint signals need.
RUN useradd --system --uid 10001 --home-dir /var/lib/gpuwatch --create-home gpuwatch
USER gpuwatch
WORKDIR /var/lib/gpuwatch

ENTRYPOINT ["gpuwatch"]
CMD ["--help"]
