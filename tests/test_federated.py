"""Federated rounds (training/federated.py): sites send weights and scalars, never a sample.

Needs the federated extra (Flower); scripts/test.sh installs it. The integration test runs the coordinator and two
sites as separate processes over real gRPC on loopback, with a recording TCP relay between each site and the
coordinator, and searches everything the sites sent.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.apps.cli import main
from gpuwatch.simulator.fleet import simulate_to_dir
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.window import FEATURE_NAMES, WindowConfig
from gpuwatch.training.cli import load_sequences
from gpuwatch.training.dataset import SequenceSet
from gpuwatch.training.train import feature_moments, split_by_gpu

try:
    import flwr  # noqa: F401

    HAVE_FLWR = True
except ImportError:
    HAVE_FLWR = False


def _require_flwr() -> None:
    if not HAVE_FLWR:
        pytest.fail("Flower is not installed: run scripts/test.sh (it installs the federated extra) or "
                    "pip install 'gpuwatch[federated]'")  # fmt: skip


def _site(out: Path, seed: int, hardware: str, mode: str) -> None:
    # Two hosts of four GPUs for three hours at 30 s, two forced failures with long precursors, plus random ones.
    simulate_to_dir(2, 4, days=3 / 24, out=out, seed=seed, interval_s=30.0, config_overrides={
        "rate_scale": 3000.0, "repair_time_scale": 0.005, "hardware": hardware,
        "forced_failures": [(0, 1, mode, 7200.0, 3600.0), (1, 2, "interconnect", 9000.0, 3600.0)],
    })  # fmt: skip


# The flags the sites get (`gpuwatch federated join`), as load_sequences reads them.
SITE_FLAGS = ["--sample-every", "60", "--seed", "0"]
SITE_ARGS = argparse.Namespace(sample_every=60.0, horizon=3600.0, negative_keep=0.1, seed=0, data_seed=None)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, SequenceSet]]:
    """Two sites on different boards and fault modes, each with the sequences it trains on."""
    root = tmp_path_factory.mktemp("federated")
    out = []
    for name, seed, hardware, mode in (("site-a", 1, "h100-fan", "memory"), ("site-b", 2, "a100-sxm", "power")):
        _site(root / name, seed, hardware, mode)
        out.append((root / name, load_sequences([str(root / name)], SITE_ARGS, WindowConfig())[0]))
    return out


class Relay:
    """A TCP relay on loopback that keeps every byte the sites send to the coordinator."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.upstream: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()  # the coordinator is not up yet: the site retries
                continue
            sent = bytearray()
            self.upstream.append(sent)
            threading.Thread(target=self._pump, args=(client, server, sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        try:
            while chunk := src.recv(65536):
                if keep is not None:
                    keep += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
# The coordinator of one training round for two sites; prints what it ended with as JSON.
COORDINATOR = """import sys, orjson
from gpuwatch.training.federated import RoundPlan, SiteTraining, serve
r = serve(sys.argv[1], RoundPlan(rounds=1, sites=2), SiteTraining(), lambda line: None)
print(orjson.dumps({"best_round": r.best_round, "shapes": [a.shape for a in r.arrays],
                    "site_sequences": r.site_sequences}).decode())
"""


def _gpuwatch(*argv: str) -> subprocess.Popen:
    # -P: the repository's source folders must not shadow the installed package.
    return subprocess.Popen([sys.executable, "-P", "-m", "gpuwatch.apps.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=ENV)  # fmt: skip


def test_only_weights_and_scalar_metrics_leave_a_site(sites: list[tuple[Path, SequenceSet]]) -> None:
    """A coordinator and two sites, each its own process, over gRPC on loopback; the sites reach it through a relay
    that keeps every byte they send."""
    _require_flwr()
    from gpuwatch.training.federated import parameter_shapes

    port = _free_port()
    relay = Relay(port)
    coordinator = subprocess.Popen([sys.executable, "-P", "-c", COORDINATOR, f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=ENV)  # fmt: skip
    joined = [_gpuwatch("federated", "join", "--server", f"127.0.0.1:{relay.port}", "--data", str(path), *SITE_FLAGS)
              for path, _ in sites]  # fmt: skip
    try:
        out, err = coordinator.communicate(timeout=600)
        logs = [p.communicate(timeout=60)[0].decode(errors="replace") for p in joined]
    finally:
        for p in [coordinator, *joined]:
            p.kill()
        relay.close()
    assert [p.returncode for p in [coordinator, *joined]] == [0, 0, 0], err.decode()[-3000:] + "\n----\n".join(logs)
    result = orjson.loads(out.splitlines()[-1])
    assert result["best_round"] == 1 and [tuple(s) for s in result["shapes"]] == parameter_shapes(32, 32)
    assert sorted(result["site_sequences"]) == sorted(_Split(d).tr_count for _, d in sites)

    wire = b"".join(bytes(b) for b in relay.upstream)
    param_bytes = sum(4 * int(np.prod(s)) for s in parameter_shapes(32, 32))
    for path, data in sites:
        split = _Split(data)
        # What a site is meant to send is on the wire byte for byte: its moment vector (so the search works) ...
        mean, _, _ = feature_moments(data, split.tr, 0)
        assert mean.tobytes() in wire
        # ... and none of its samples: no sequence row (as stored, float16, or as float32) and no GPU uuid.
        rows = data.x[np.random.default_rng(0).choice(len(data.x), size=min(200, len(data.x)), replace=False), -1]
        for row in rows:
            busy = row[np.flatnonzero(row)[:8]] if np.count_nonzero(row) >= 8 else row[:8]
            assert busy.astype(np.float16).tobytes() not in wire
            assert busy.astype(np.float32).tobytes() not in wire
        for uuid in set(data.uuid):
            assert uuid.encode() not in wire, f"{uuid} of {path.name} crossed the wire"
        assert data.x.nbytes > 10 * param_bytes  # a site's samples would not fit in the budget below
    # Everything the sites sent: one round of weights each, the moments, scalars and gRPC's own framing.
    budget = 2 * (param_bytes + 2 * len(FEATURE_NAMES) * 8 + 32_000)
    assert len(wire) < budget, f"{len(wire):,} bytes left the sites, more than weights and scalars take"


class _Split:
    """A site's training rows as `SiteModel` picks them (GPU split with data seed 0, visible positives)."""

    def __init__(self, data: SequenceSet) -> None:
        tr, _ = split_by_gpu(data, 0.2, 0)
        self.tr = tr[~((data.y[tr] == 1) & ~data.precursor[tr])]
        self.tr_count = len(self.tr)


def test_a_round_returns_the_models_arrays_and_scalars_and_makes_an_artifact(
    sites: list[tuple[Path, SequenceSet]], tmp_path: Path
) -> None:
    _require_flwr()
    from flwr.common import parameters_to_ndarrays

    from gpuwatch.training.federated import (
        FederationResult,
        RoundPlan,
        SiteModel,
        SiteTraining,
        federated_artifact,
        make_strategy,
        parameter_shapes,
    )

    site = SiteModel(sites[1][1], SiteTraining(), 3600.0, WindowConfig())
    moments, steps, metrics = site.moments()
    assert [m.shape for m in moments] == [(len(FEATURE_NAMES),)] * 2 and steps > 0
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    strategy, _ = make_strategy(RoundPlan(sites=1), SiteTraining(), lambda line: None)
    init = parameters_to_ndarrays(strategy.initial_parameters)
    arrays, n, metrics = site.fit(init, lr=3e-3, epochs=1, label="test")
    assert [a.shape for a in arrays] == parameter_shapes(32, 32) and n == len(site.tr)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    loss, n_val, metrics = site.evaluate(arrays)
    assert np.isfinite(loss) and n_val == len(site.va) and set(metrics) == {"val_ap", "val_positives"}
    # The coordinator's arrays become an artifact that loads and scores like any other.
    result = FederationResult(arrays, 1, 0.5, 0.02, 3600.0, WindowConfig(), site_sequences=[n])
    path = tmp_path / "fed.pt"
    federated_artifact(result, SiteTraining(), RoundPlan(rounds=1)).save(path)
    risk, _ = Scorer(load_artifact(path), device="cpu").score(sites[1][1].x[:5].astype(np.float32))
    assert risk.shape == (5,) and np.all((risk >= 0) & (risk <= 1))


def test_a_site_with_bad_data_ends_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _require_flwr()
    (tmp_path / "empty").mkdir()
    assert main(["federated", "join", "--server", "127.0.0.1:1", "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpuwatch federated join: --data: ")
    assert "gpuwatch simulate" in err[0]  # the fix


def test_a_message_outside_its_contract_is_refused_naming_the_sender() -> None:
    _require_flwr()
    from gpuwatch.training.federated import EvalReport, FederatedError, from_wire, to_wire

    assert from_wire(EvalReport, to_wire(EvalReport(val_ap=0.5, val_positives=3)), "site 1").val_ap == 0.5
    with pytest.raises(FederatedError, match="site 7 sent a EvalReport that does not fit"):
        from_wire(EvalReport, {"val_ap": 0.5, "val_positives": 3, "rows": b"\x00" * 64}, "site 7")
