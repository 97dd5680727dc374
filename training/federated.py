"""Federated training with Flower: sites train the failure LSTM on their own data and send only weights.

A **site** (`gpuwatch federated join`) builds training sequences from its own recording or archive, exactly as
`gpuwatch train` does, and splits them by GPU into train and validation. It answers the coordinator in rounds:

1. round 1, the *moments* round: the per-feature mean and mean of squares of its training inputs (two vectors of
   77 numbers; the pooled normalisation is their average, weighted by how many time steps each site has), with its
   sequence count, positive share, horizon and window as scalars;
2. every later round: it loads the global weights, trains `local_epochs` epochs on its own training split (the loop
   of `gpuwatch train`, `training.train.train_epoch`) and returns the new weights and how many sequences it trained
   on; then it scores the new global weights on its own validation split and returns the loss and the average
   precision, as scalars.

Nothing else crosses: the payload of every answer is the model's parameter arrays (with the normalisation) or the
two moment vectors, plus scalar metrics. `tests/test_federated.py` checks it on the wire.

The **coordinator** (`gpuwatch federated serve`) runs Flower's FedAvg: the global weights are the average of the
sites' weights, weighted by their training sequences. It keeps the round whose weights have the best validation
average precision over the sites (weighted by their visible validation positives), as `gpuwatch train` keeps the
best epoch. It holds no site data. The artifact's calibration map and operating points are chosen on the
coordinator's own validation recordings (`--val-data`, pooled), by the code `gpuwatch train --val-data` runs;
Platt scaling, which `gpuwatch train` fits on its held-back split of the training data, is left out (no such split
is at the coordinator): the monotone calibration map alone calibrates the score.

`gpuwatch federated simulate --sites A,B,C` starts one `join` process per site and serves in its own process, on
loopback, over real gRPC. Transport: Flower's `start_server` / `start_client` (gRPC bidirectional streaming),
deprecated since Flower 1.13 in favour of the SuperLink / SuperNode deployment but present and working in the
pinned 1.42.0; insecure (plain gRPC), fit for loopback and a trusted network only.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
import numpy as np
import torch

from gpuwatch import __version__
from gpuwatch.streams.model import FAILURE_CLASSES, FailureLSTM, ModelArtifact, weights_digest
from gpuwatch.streams.window import FEATURE_NAMES, WindowConfig
from gpuwatch.training.dataset import SequenceSet
from gpuwatch.training.evaluate import average_precision
from gpuwatch.training.train import (
    Batches,
    TrainConfig,
    feature_moments,
    focal_loss,
    logits_of,
    split_by_gpu,
    std_from_moments,
    train_epoch,
)

if TYPE_CHECKING:
    from flwr.common import FitRes, Parameters, Scalar
    from flwr.server.client_proxy import ClientProxy

# Flower sends usage telemetry to its makers unless told not to; a federation exists so that nothing leaves a site.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

MOMENTS_ROUND = 1
_M = TypeVar("_M", bound=msgspec.Struct)
INSTALL_HINT = "install the federated extra: pip install 'gpuwatch[federated]'"


class FederatedError(RuntimeError):
    """A federation cannot run (Flower missing, a site failed, sites disagree); the message says what to do."""


# ------------------------------------------------------------------ what crosses the wire besides the arrays
# Flower carries a config dict to the sites and a metrics dict back, of scalars only; these are their contracts.


class RoundConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Coordinator to site, each round: the phase, and for a training round its number, learning rate and epochs."""

    phase: Literal["moments", "train"]
    round: int = 0
    lr: float = 0.0
    local_epochs: int = 0


class SiteSummary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Site to coordinator, moments round: sequence counts, weighted positive share, and how sequences were built."""

    train_sequences: int
    val_sequences: int
    prevalence: float
    horizon_s: float
    seq_len: int
    stride_s: float


class FitReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Site to coordinator, training round: the mean loss of its last local epoch."""

    loss: float


class EvalReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Site to coordinator, after a training round: the global weights on the site's validation split."""

    val_ap: float
    val_positives: int


def to_wire(message: msgspec.Struct) -> dict[str, Scalar]:
    """A message as the scalar dict Flower carries."""
    return msgspec.to_builtins(message)  # type: ignore[no-any-return]


def from_wire(kind: type[_M], values: dict[str, Scalar], sender: str) -> _M:
    """A scalar dict back as its message; FederatedError names the sender and what was wrong."""
    try:
        return msgspec.convert(dict(values), kind)
    except msgspec.ValidationError as exc:
        raise FederatedError(f"{sender} sent a {kind.__name__} that does not fit its contract ({exc}); run the same "
                             "gpuwatch version at every site and the coordinator") from None  # fmt: skip


def _flwr() -> Any:
    try:
        import flwr
    except ImportError:
        raise FederatedError(f"Flower (flwr) is not installed; {INSTALL_HINT}") from None
    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines; not twice
    return flwr


def parameter_shapes(hidden: int, mlp: int, n_features: int = len(FEATURE_NAMES)) -> list[tuple[int, ...]]:
    """Shapes of the arrays a training round carries, in order: the normalisation (mean, std), then every tensor of
    the model's state dict. A round's payload holds these and nothing else."""
    model = FailureLSTM(n_features, hidden, mlp, len(FAILURE_CLASSES))
    return [(n_features,), (n_features,), *[tuple(v.shape) for v in model.state_dict().values()]]


def _state_names(hidden: int, mlp: int) -> list[str]:
    return list(FailureLSTM(len(FEATURE_NAMES), hidden, mlp, len(FAILURE_CLASSES)).state_dict())


@dataclass
class SiteTraining:
    """What a site trains with: the model's shape, local epochs and the `gpuwatch train` loop's settings."""

    hidden: int = 32
    mlp: int = 32
    batch_size: int = 256
    seed: int = 0
    data_seed: int = 0

    def config(self, lr: float) -> TrainConfig:
        return TrainConfig(hidden=self.hidden, mlp=self.mlp, batch_size=self.batch_size, lr=lr, seed=self.seed,
                           threads=1)  # fmt: skip


class SiteModel:
    """One site's side of the federation, without any networking: what it computes from global weights.

    `SiteClient` (a Flower NumPyClient) only forwards to it, so tests can check the very payloads a site sends."""

    def __init__(self, data: SequenceSet, training: SiteTraining, horizon_s: float, window: WindowConfig) -> None:
        self.data = data
        self.training = training
        self.horizon_s = horizon_s
        self.window = window
        base = training.config(lr=0.0)
        tr, va = split_by_gpu(data, base.val_fraction, training.data_seed)
        invisible = (data.y == 1) & ~data.precursor
        self.tr = tr[~invisible[tr]]  # as `gpuwatch train`: positives with nothing visible yet are left out
        self.va = va[~invisible[va]]
        self.model = FailureLSTM(data.x.shape[-1], training.hidden, training.mlp, len(FAILURE_CLASSES))
        self._batches: Batches | None = None
        self._norm: tuple[np.ndarray, np.ndarray] | None = None
        self._gen = torch.Generator().manual_seed(training.seed)
        torch.manual_seed(training.seed)

    def moments(self) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """Round 1: the normalisation's sufficient statistics over the site's training inputs, and scalars."""
        mean, mean_sq, steps = feature_moments(self.data, self.tr, self.training.data_seed)
        w = self.data.weight[self.tr]
        prevalence = float((w * self.data.y[self.tr]).sum() / max(w.sum(), 1e-12))
        summary = SiteSummary(train_sequences=len(self.tr), val_sequences=len(self.va), prevalence=prevalence,
                              horizon_s=float(self.horizon_s), seq_len=self.window.seq_len,
                              stride_s=float(self.window.stride_s))  # fmt: skip
        return [mean, mean_sq], steps, to_wire(summary)

    def _load(self, parameters: list[np.ndarray]) -> Batches:
        mean, std = parameters[0], parameters[1]
        if self._norm is None or not (np.array_equal(mean, self._norm[0]) and np.array_equal(std, self._norm[1])):
            self._norm = (mean.copy(), std.copy())
            self._batches = Batches.of(self.data, mean, std)
        names = list(self.model.state_dict())
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in zip(names, parameters[2:])})
        assert self._batches is not None
        return self._batches

    def weights(self) -> list[np.ndarray]:
        assert self._norm is not None
        return [*self._norm, *[v.detach().cpu().numpy().copy() for v in self.model.state_dict().values()]]

    def fit(self, parameters: list[np.ndarray], lr: float, epochs: int, label: str) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """A training round: `epochs` epochs from the global weights on the site's training split."""
        torch.set_num_threads(1)
        batches = self._load(parameters)
        config = self.training.config(lr)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)
        rows = torch.from_numpy(self.tr)
        loss = 0.0
        for e in range(epochs):
            loss = train_epoch(self.model, opt, None, batches, rows, config, self._gen, f"{label} epoch {e + 1}/{epochs}")
        sys.stderr.write("\n")
        return self.weights(), len(self.tr), to_wire(FitReport(loss=float(loss)))

    def evaluate(self, parameters: list[np.ndarray]) -> tuple[float, int, dict[str, Scalar]]:
        """The global weights on the site's validation split: weighted focal loss and average precision."""
        batches = self._load(parameters)
        config = self.training.config(0.0)
        logits = logits_of(self.model, batches.xn, self.va, torch.device("cpu"))
        y = self.data.y[self.va]
        if not len(self.va):
            return 0.0, 0, to_wire(EvalReport(val_ap=0.0, val_positives=0))
        loss = float(focal_loss(torch.from_numpy(logits), torch.from_numpy(y.astype(np.float64)), config.focal_alpha,
                                config.focal_gamma, torch.from_numpy(self.data.weight[self.va])))  # fmt: skip
        ap = average_precision(y, logits) if y.any() else 0.0
        return loss, len(self.va), to_wire(EvalReport(val_ap=float(ap), val_positives=int(y.sum())))


def make_client(site: SiteModel, name: str) -> Any:
    """A Flower NumPyClient for `site`: the round's phase and learning rate come in the coordinator's config."""
    flwr = _flwr()

    class SiteClient(flwr.client.NumPyClient):  # type: ignore[misc,name-defined]
        def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
            raise FederatedError("the coordinator sends the initial weights; a site never offers its own")

        def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict]:
            cfg = from_wire(RoundConfig, config, "the coordinator")
            if cfg.phase == "moments":
                return site.moments()
            return site.fit(parameters, cfg.lr, cfg.local_epochs, f"{name} round {cfg.round}")

        def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, dict]:
            return site.evaluate(parameters)

    return SiteClient().to_client()


@dataclass
class RoundPlan:
    """The coordinator's schedule: training rounds (after the moments round), local epochs per round, and the
    learning rate, cosine-decayed over the rounds (as `gpuwatch train`'s one-cycle schedule decays over epochs)."""

    rounds: int = 6
    local_epochs: int = 1
    lr: float = 3e-3
    sites: int = 3

    def lr_at(self, training_round: int) -> float:
        """Learning rate of training round 1..rounds."""
        return float(self.lr * (0.55 + 0.45 * np.cos(np.pi * (training_round - 1) / max(self.rounds, 1))))


@dataclass
class FederationResult:
    """What the coordinator ends with: the best round's arrays (normalisation + weights) and the history."""

    arrays: list[np.ndarray]
    best_round: int
    best_val_ap: float
    prevalence: float
    horizon_s: float
    window: WindowConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    site_sequences: list[int] = field(default_factory=list)


def make_strategy(plan: RoundPlan, training: SiteTraining, log: Callable[[str], None]) -> tuple[Any, Callable[[], FederationResult]]:
    """A FedAvg strategy with the moments round in front and best-round selection; and a function that returns the
    result once the server is done."""
    flwr = _flwr()
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    torch.manual_seed(training.seed)
    init = FailureLSTM(len(FEATURE_NAMES), training.hidden, training.mlp, len(FAILURE_CLASSES))
    init_weights = [v.detach().numpy().copy() for v in init.state_dict().values()]
    n_feat = len(FEATURE_NAMES)
    placeholder = [np.zeros(n_feat, np.float32), np.ones(n_feat, np.float32), *init_weights]
    state: dict[str, Any] = {"norm": None, "latest": None, "best": None, "best_ap": -1.0, "best_round": 0,
                             "history": [], "prevalence": 0.0, "horizon_s": None, "window": None, "sequences": []}  # fmt: skip

    def weighted(values: list[tuple[int, float]]) -> float:
        total = sum(n for n, _ in values)
        return float(sum(n * v for n, v in values) / max(total, 1))

    class Coordinator(flwr.server.strategy.FedAvg):  # type: ignore[misc,name-defined]
        def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
            pairs = super().configure_fit(server_round, parameters, client_manager)
            if server_round == MOMENTS_ROUND:
                cfg = RoundConfig(phase="moments")
            else:
                r = server_round - MOMENTS_ROUND
                cfg = RoundConfig(phase="train", round=r, lr=plan.lr_at(r), local_epochs=plan.local_epochs)
            for _, ins in pairs:
                ins.config = to_wire(cfg)
            return pairs

        def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
            if server_round == MOMENTS_ROUND:
                return []  # no weights trained yet
            return super().configure_evaluate(server_round, parameters, client_manager)

        def aggregate_fit(
            self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
        ) -> tuple[Parameters | None, dict[str, Scalar]]:  # fmt: skip
            if failures:
                raise FederatedError(f"round {server_round}: {len(failures)} site(s) failed ({failures[0]!r}); "
                                     "see the site's own log")  # fmt: skip
            aggregated, _ = super().aggregate_fit(server_round, results, failures)
            arrays = parameters_to_ndarrays(aggregated)
            if server_round == MOMENTS_ROUND:
                summaries = [from_wire(SiteSummary, r.metrics, f"site {p.cid}") for p, r in results]
                _check_sites_agree(summaries)
                mean, std = std_from_moments(arrays[0].astype(np.float64), arrays[1].astype(np.float64))
                state["norm"] = [mean.astype(np.float32), std.astype(np.float32)]
                state["sequences"] = [m.train_sequences for m in summaries]
                state["prevalence"] = weighted([(m.train_sequences, m.prevalence) for m in summaries])
                state["horizon_s"] = summaries[0].horizon_s
                state["window"] = WindowConfig(seq_len=summaries[0].seq_len, stride_s=summaries[0].stride_s)
                log(f"moments round: {len(results)} sites, {sum(state['sequences']):,} training sequences in all "
                    f"({', '.join(f'{n:,}' for n in state['sequences'])})")  # fmt: skip
                arrays = [*state["norm"], *init_weights]
            else:
                # The normalisation is fixed after round 1; the average of identical arrays could drift by a rounding.
                arrays = [*state["norm"], *arrays[2:]]
                losses = [(r.num_examples, from_wire(FitReport, r.metrics, f"site {p.cid}").loss) for p, r in results]
                state["history"].append({"round": server_round - MOMENTS_ROUND, "train_loss": weighted(losses)})
            state["latest"] = arrays
            return ndarrays_to_parameters(arrays), {}

        def aggregate_evaluate(
            self, server_round: int, results: list[tuple[ClientProxy, Any]], failures: list
        ) -> tuple[float | None, dict[str, Scalar]]:  # fmt: skip
            if failures:
                raise FederatedError(f"round {server_round}: {len(failures)} site(s) failed to evaluate")
            loss, _ = super().aggregate_evaluate(server_round, results, failures)
            reports = [from_wire(EvalReport, r.metrics, f"site {p.cid}") for p, r in results]
            ap = weighted([(m.val_positives, m.val_ap) for m in reports])
            entry = state["history"][-1]
            entry.update({"val_loss": loss, "val_ap": ap, "val_ap_by_site": [m.val_ap for m in reports]})
            log(f"round {entry['round']}/{plan.rounds}: train loss {entry['train_loss']:.4f}, validation loss "
                f"{loss:.4f}, validation AP {ap:.3f} (sites: {', '.join(f'{a:.3f}' for a in entry['val_ap_by_site'])})")  # fmt: skip
            if ap > state["best_ap"]:
                state["best"], state["best_ap"], state["best_round"] = state["latest"], ap, entry["round"]
            return loss, {"val_ap": ap}

    strategy = Coordinator(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=plan.sites, min_evaluate_clients=plan.sites,
        min_available_clients=plan.sites, accept_failures=False,
        initial_parameters=ndarrays_to_parameters(placeholder),
    )  # fmt: skip

    def result() -> FederationResult:
        if state["best"] is None:
            raise FederatedError("the federation ended before a training round completed; see the sites' logs")
        return FederationResult(
            arrays=state["best"], best_round=state["best_round"], best_val_ap=state["best_ap"],
            prevalence=state["prevalence"], horizon_s=state["horizon_s"], window=state["window"],
            history=state["history"], site_sequences=state["sequences"],
        )  # fmt: skip

    return strategy, result


def _check_sites_agree(summaries: list[SiteSummary]) -> None:
    """Every site must build sequences the same way (horizon, window), or their weights mean different things."""
    for key in ("horizon_s", "seq_len", "stride_s"):
        values = {getattr(m, key) for m in summaries}
        if len(values) > 1:
            raise FederatedError(f"the sites disagree on {key} ({sorted(values)}); give every site the same --horizon "
                                 "and this package's window")  # fmt: skip


def serve(address: str, plan: RoundPlan, training: SiteTraining, log: Callable[[str], None]) -> FederationResult:
    """Run the coordinator on `address` (HOST:PORT) until `plan.rounds` training rounds are done."""
    flwr = _flwr()
    strategy, result = make_strategy(plan, training, log)
    # Flower installs its own SIGINT/SIGTERM handlers (they exit the process); give the caller's back afterwards.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        flwr.server.start_server(server_address=address, strategy=strategy,
                                 config=flwr.server.ServerConfig(num_rounds=plan.rounds + MOMENTS_ROUND))  # fmt: skip
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return result()


def join(server: str, site: SiteModel, name: str) -> None:
    """Serve one site's rounds until the coordinator ends the federation (gives up after 120 s unreachable)."""
    flwr = _flwr()
    flwr.client.start_client(server_address=server, client=make_client(site, name), insecure=True,
                             max_wait_time=120.0)  # fmt: skip


def federated_artifact(result: FederationResult, training: SiteTraining, plan: RoundPlan) -> ModelArtifact:
    """The best round's weights as a model artifact (threshold and calibration still to be chosen)."""
    names = _state_names(training.hidden, training.mlp)
    state = {k: torch.from_numpy(np.array(v)) for k, v in zip(names, result.arrays[2:])}
    return ModelArtifact(
        version=f"lstm-{__version__}-federated-{weights_digest(state)}",
        state_dict=state,
        features=FEATURE_NAMES,
        window=result.window,
        norm_mean=np.asarray(result.arrays[0], dtype=np.float32),
        norm_std=np.asarray(result.arrays[1], dtype=np.float32),
        hidden=training.hidden,
        mlp=training.mlp,
        temperature=1.0,
        calibration_prevalence=result.prevalence,
        horizon_s=result.horizon_s,
        metrics={
            "federated": {"sites": len(result.site_sequences), "site_train_sequences": result.site_sequences,
                          "rounds": plan.rounds, "local_epochs": plan.local_epochs, "best_round": result.best_round,
                          "best_val_ap": result.best_val_ap, "history": result.history, "strategy": "FedAvg",
                          "plan": asdict(plan), "training": asdict(training)},
            "validation_sequence_ap": result.best_val_ap,
            "calibration_from": "no Platt scaling (no held-back split at the coordinator); see calibration map",
        },  # fmt: skip
        data_fingerprint="",
        created_at=time.time(),
    )


# ------------------------------------------------------------------ the commands


def _training(args: argparse.Namespace) -> SiteTraining:
    data_seed = args.seed if args.data_seed is None else args.data_seed
    return SiteTraining(hidden=args.hidden, mlp=args.mlp, batch_size=args.batch_size, seed=args.seed, data_seed=data_seed)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def join_command(args: argparse.Namespace) -> int:
    """`gpuwatch federated join --server HOST:PORT --data DIR`: one site."""
    from gpuwatch.training.cli import load_sequences
    from gpuwatch.training.dataset import RecordingError

    _flwr()
    _check_recordings(args.data, "--data")
    window = WindowConfig()
    try:
        data, _, _ = load_sequences(args.data, args, window)
    except RecordingError as exc:
        raise FederatedError(f"--data: {exc}") from None
    name = args.name or site_name(args.data[0])
    _log(f"site {name}: {len(data.y):,} sequences ({int(data.y.sum()):,} positive); joining {args.server}")
    join(args.server, SiteModel(data, _training(args), args.horizon, window), name)
    _log(f"site {name}: the federation is over; nothing but weights and scalar metrics left this site")
    return 0


def serve_command(args: argparse.Namespace, settings: Any = None) -> int:
    """`gpuwatch federated serve`: the coordinator; writes the federated artifact to --out."""
    t0 = time.time()
    _check_val_data(args)
    plan, training = RoundPlan(args.rounds, args.local_epochs, args.lr, args.sites), _training(args)
    result = serve(args.address, plan, training, _log)
    return _save(result, plan, training, args, t0, settings)


def _check_recordings(locations: list[str], flag: str) -> None:
    """Each location opens as a recording with labels, now rather than after the other sites have started."""
    from gpuwatch.training.dataset import RecordingError
    from gpuwatch.training.recording import open_recording

    for d in locations:
        try:
            open_recording(d).failures()
        except RecordingError as exc:
            raise FederatedError(f"{flag}: {exc}") from None


def _check_val_data(args: argparse.Namespace) -> None:
    if not args.val_data:
        raise FederatedError("give --val-data (the coordinator's own validation recording) at least once: the "
                             "calibration map and operating points are chosen there")  # fmt: skip
    _check_recordings(args.val_data, "--val-data")


def _save(result: FederationResult, plan: RoundPlan, training: SiteTraining, args: argparse.Namespace, t0: float,
          settings: Any) -> int:  # fmt: skip
    from gpuwatch.training.cli import choose_and_save

    artifact = federated_artifact(result, training, plan)
    artifact.metrics["train_seconds"] = round(time.time() - t0, 1)
    _log(f"best round {result.best_round} (validation AP over the sites {result.best_val_ap:.3f})")
    return choose_and_save(artifact, None, args, t0, settings)


def site_name(location: str) -> str:
    """A site's name in logs: its folder's name, or the parent's for one called train or archive (site-a/archive)."""
    path = Path(location.rstrip("/"))
    return path.parent.name if path.name in ("train", "archive") and path.parent.name else path.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def simulate_command(args: argparse.Namespace, settings: Any = None) -> int:
    """`gpuwatch federated simulate --sites A,B,C`: the coordinator here, one `join` process per site, on loopback."""
    t0 = time.time()
    _flwr()
    sites = [s for s in args.sites.split(",") if s]
    if len(sites) < 2:
        raise FederatedError(f"--sites {args.sites!r}: give at least two site recordings, comma-separated")
    _check_recordings(sites, "--sites")
    _check_val_data(args)
    address = f"127.0.0.1:{args.port or free_port()}"
    common = ["--server", address, "--seed", str(args.seed), "--hidden", str(args.hidden), "--mlp", str(args.mlp),
              "--batch-size", str(args.batch_size), "--sample-every", str(args.sample_every), "--negative-keep",
              str(args.negative_keep), "--horizon", str(args.horizon)]  # fmt: skip
    if args.data_seed is not None:
        common += ["--data-seed", str(args.data_seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    procs = [
        subprocess.Popen([sys.executable, "-P", "-m", "gpuwatch.apps.cli", "federated", "join", "--data", s, "--name",
                          site_name(s), *common], env=env)  # fmt: skip
        for s in sites
    ]
    stop = threading.Event()

    def watch() -> None:
        # A site that dies leaves the coordinator waiting for it for ever: end the run with an honest code.
        while not stop.wait(1.0):
            for s, p in zip(sites, procs):
                if p.poll() not in (None, 0):
                    _log(f"gpuwatch federated simulate: site {s} exited with code {p.returncode} (its error is above)")
                    for q in procs:
                        if q.poll() is None:
                            q.terminate()
                    os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    plan, training = RoundPlan(args.rounds, args.local_epochs, args.lr, len(sites)), _training(args)
    try:
        result = serve(address, plan, training, _log)
    finally:
        stop.set()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.terminate()
    if any(p.returncode != 0 for p in procs):
        raise FederatedError(f"a site exited with an error ({[p.returncode for p in procs]}); see its log above")
    return _save(result, plan, training, args, t0, settings)
