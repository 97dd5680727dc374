"""Train the failure LSTM: focal loss, noise and time-warp augmentation, Platt calibration on validation."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from gpuwatch import __version__
from gpuwatch.streams.model import FAILURE_CLASSES, FailureLSTM, ModelArtifact, weights_digest
from gpuwatch.streams.window import FEATURE_NAMES, WindowConfig
from gpuwatch.training.dataset import SequenceSet
from gpuwatch.training.evaluate import average_precision

# Fewest positive validation sequences Platt scaling is fitted on; with fewer the logits are left as trained.
MIN_PLATT_POSITIVES = 5


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 256
    lr: float = 3e-3
    hidden: int = 32
    mlp: int = 32
    focal_alpha: float = 0.75
    focal_gamma: float = 2.0
    mode_weight: float = 0.2  # weight of the mode head's cross-entropy (positives only)
    noise_std: float = 0.05  # Gaussian noise on normalised inputs
    time_warp: float = 0.3  # probability of a random time-warp per sequence
    val_fraction: float = 0.2
    # "visible": positives whose precursor has not started yet (and sudden failures) are left out of the
    # training loss, since nothing distinguishes them from negatives; calibration still uses every row.
    train_on: str = "visible"
    seed: int = 0
    device: str = "cpu"
    threads: int = 2


def focal_loss(
    logit: torch.Tensor, y: torch.Tensor, alpha: float, gamma: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary focal loss (Lin et al.): down-weights easy negatives in a heavily imbalanced target."""
    p = torch.sigmoid(logit)
    ce = nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    a_t = alpha * y + (1 - alpha) * (1 - y)
    loss = a_t * (1 - p_t) ** gamma * ce
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum()


def time_warp(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Resample some sequences along time with a random monotone warp (stretch or squeeze the past)."""
    b, t, _ = x.shape
    pick = torch.rand(b, generator=gen) < prob
    if not pick.any():
        return x
    n = int(pick.sum())
    scale = torch.empty(n, 1).uniform_(0.5, 2.0, generator=gen)
    pos = (t - 1) - (torch.arange(t - 1, -1, -1, dtype=torch.float32)[None, :] * scale)
    pos = pos.clamp(0, t - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=t - 1)
    w = (pos - lo.float()).unsqueeze(-1)
    sub = x[pick]
    idx = torch.arange(n)[:, None]
    x = x.clone()
    x[pick] = sub[idx, lo] * (1 - w) + sub[idx, hi] * w
    return x


def split_by_gpu(data: SequenceSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of train and validation, split by GPU so no GPU's history leaks across."""
    uuids = np.array(sorted(set(data.uuid)))
    rng = np.random.default_rng(seed)
    val_uuids = set(rng.choice(uuids, size=max(1, int(len(uuids) * fraction)), replace=False).tolist())
    is_val = np.array([u in val_uuids for u in data.uuid])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def fit_platt(logits: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising weighted log loss of sigmoid(a * logit + b) on validation data (so 0.85 means 85%)."""
    x = torch.from_numpy(logits.astype(np.float64))
    t = torch.from_numpy(y.astype(np.float64))
    w = torch.from_numpy(weight.astype(np.float64))
    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            nn.functional.binary_cross_entropy_with_logits(a * x + b, t, reduction="none") * w
        ).sum() / w.sum()
        loss.backward()
        return loss

    opt.step(closure)
    a_val = float(a.detach())
    if not np.isfinite(a_val) or a_val <= 1e-3:
        return 1.0, 0.0  # degenerate validation set: leave the logits alone
    return a_val, float(b.detach())


def fit_temperature(logits: np.ndarray, y: np.ndarray, weight: np.ndarray) -> float:
    """Temperature (1 / Platt slope, no shift) minimising weighted log loss on validation data."""
    best_t, best_loss = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.02), np.log(8.0), 300)):
        p = np.clip(1 / (1 + np.exp(-logits / t)), 1e-7, 1 - 1e-7)
        loss = -np.sum(weight * (y * np.log(p) + (1 - y) * np.log(1 - p))) / weight.sum()
        if loss < best_loss:
            best_t, best_loss = float(t), loss
    return best_t


def best_f1_threshold(p: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Threshold with the best weighted F1 on validation sequences, and that F1."""
    best = (0.5, 0.0)
    for thr in np.linspace(0.05, 0.99, 95):
        pred = p >= thr
        tp = np.sum(weight * (pred & (y == 1)))
        fp = np.sum(weight * (pred & (y == 0)))
        fn = np.sum(weight * (~pred & (y == 1)))
        f1 = 2 * tp / max(2 * tp + fp + fn, 1e-9)
        if f1 > best[1]:
            best = (float(thr), float(f1))
    return best


def _progress(prefix: str, done: int, total: int, extra: str = "") -> None:
    width = 30
    fill = int(width * done / max(total, 1))
    sys.stderr.write(f"\r{prefix} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {extra}")
    sys.stderr.flush()


@torch.inference_mode()
def logits_of(model: FailureLSTM, xn: torch.Tensor, rows: np.ndarray, device: torch.device) -> np.ndarray:
    model.eval()
    out = [model(xn[rows[i : i + 4096]].to(device))[0].cpu() for i in range(0, len(rows), 4096)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def feature_moments(data: SequenceSet, rows: np.ndarray, seed: int, limit: int = 50_000) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-feature mean and mean of squares (float64) over the time steps of a random `limit` of `rows`, and how many
    steps they average: the normalisation's sufficient statistics (a federation averages them over its sites)."""
    sub = rows[np.random.default_rng(seed).permutation(len(rows))[:limit]]
    flat = data.x[sub].astype(np.float64).reshape(-1, data.x.shape[-1])
    return flat.mean(axis=0), (flat**2).mean(axis=0), len(flat)


def std_from_moments(mean: np.ndarray, mean_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) for normalising inputs; a feature that barely varies keeps its scale (std 1)."""
    std = np.sqrt(np.maximum(mean_sq - mean**2, 0.0))
    return mean, np.where(std < 1e-3, 1.0, std)


@dataclass
class Batches:
    """A SequenceSet as training tensors: normalised inputs, targets, weights and mode targets."""

    xn: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    mode_target: torch.Tensor

    @classmethod
    def of(cls, data: SequenceSet, mean: np.ndarray, std: np.ndarray) -> Batches:
        # In place: one float32 copy of the inputs at a time (2 million sequences are about 9 GB each).
        xn_np = data.x.astype(np.float32)
        xn_np -= mean.astype(np.float32)
        xn_np /= std.astype(np.float32)
        xn = torch.from_numpy(xn_np)
        return cls(
            xn=xn, y=torch.from_numpy(data.y.astype(np.float32)), w=torch.from_numpy(data.weight.astype(np.float32)),
            mode_target=torch.from_numpy(np.maximum(data.mode - 1, 0)),  # index into FAILURE_CLASSES
        )  # fmt: skip


def train_epoch(
    model: FailureLSTM, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler | None,
    batches: Batches, rows: torch.Tensor, config: TrainConfig, gen: torch.Generator, label: str,
) -> float:  # fmt: skip
    """One pass over `rows` in random order (focal loss, mode head on positives, augmentation); the mean loss.
    `gpuwatch train` runs it per epoch, a federated site per local epoch."""
    device = next(model.parameters()).device
    model.train()
    steps = max(1, len(rows) // config.batch_size)
    perm = rows[torch.randperm(len(rows), generator=gen)]
    t0 = time.time()
    total = 0.0
    for step in range(steps):
        idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
        xb = time_warp(batches.xn[idx], config.time_warp, gen)
        xb = xb + config.noise_std * torch.randn(xb.shape, generator=gen)
        yb = batches.y[idx].to(device)
        risk_logit, mode_logit = model(xb.to(device))
        loss = focal_loss(risk_logit, yb, config.focal_alpha, config.focal_gamma, batches.w[idx].to(device))
        pos = batches.y[idx] > 0.5
        if pos.any():
            target = batches.mode_target[idx][pos].to(device)
            loss = loss + config.mode_weight * nn.functional.cross_entropy(mode_logit[pos.to(device)], target)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.item()
        if step % 50 == 0 or step == steps - 1:
            _progress(label, step + 1, steps, f"loss {total / (step + 1):.4f} {time.time() - t0:.0f}s")
    return total / steps


def train(
    data: SequenceSet,
    config: TrainConfig,
    *,
    window: WindowConfig,
    horizon_s: float,
    data_fingerprint: str = "",
    split: tuple[np.ndarray, np.ndarray] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    init: ModelArtifact | None = None,
) -> ModelArtifact:
    """Train on `data` (split by GPU into train/validation), calibrate, and return an artifact.

    The epoch with the best validation average precision (positives with a visible precursor against
    negatives) is kept. Calibration is Platt scaling folded
    into the artifact (temperature = 1 / slope, the shift added to the risk head's bias), so `Scorer`
    needs nothing new. The threshold is the best sequence-level F1 on validation; `gpuwatch train
    --val-data` replaces it with the best event-level F1 on a validation fleet.

    `init`: fine-tune this artifact's weights (its normalisation and sizes are kept, `config.hidden` and
    `config.mlp` must match it) instead of starting from random ones.
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    gen = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)
    tr, va = split if split is not None else split_by_gpu(data, config.val_fraction, config.seed)
    invisible = (data.y == 1) & ~data.precursor
    if config.train_on == "visible":
        tr = tr[~invisible[tr]]
    va_sel = va[~invisible[va]]  # model selection: can the model see what is visible?
    n_feat = data.x.shape[-1]
    if init is not None:  # the parent's normalisation: its weights were learnt on inputs scaled so
        mean, std = init.norm_mean.astype(np.float64), init.norm_std.astype(np.float64)
    else:  # from a subsample of training rows (float64 sums; the full set can be large)
        mean, mean_sq, _ = feature_moments(data, tr, config.seed)
        mean, std = std_from_moments(mean, mean_sq)
    batches = Batches.of(data, mean, std)
    log(f"train: {len(tr):,} sequences ({int(data.y[tr].sum()):,} positive), validation: {len(va):,} "
        f"({int(data.y[va].sum()):,} positive), {data.x.shape[1]} steps x {n_feat} features")  # fmt: skip

    model = FailureLSTM(n_feat, config.hidden, config.mlp, len(FAILURE_CLASSES)).to(device)
    if init is not None:
        model.load_state_dict(init.state_dict)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(tr) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps_per_epoch)
    tr_t = torch.from_numpy(tr)
    best: tuple[float, dict[str, torch.Tensor], int] = (-1.0, {}, 0)
    history = []
    if init is not None:  # the parent as it is is epoch 0: a fine-tune that does no better on validation keeps it
        ap0 = average_precision(data.y[va_sel], logits_of(model, batches.xn, va_sel, device)) if len(va_sel) else float("nan")
        history.append({"epoch": 0, "loss": float("nan"), "val_ap": ap0})
        log(f"parent: validation AP {ap0:.3f}")
        best = (ap0 if np.isfinite(ap0) else 0.0, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, 0)
    for epoch in range(config.epochs):
        loss = train_epoch(model, opt, sched, batches, tr_t, config, gen, f"epoch {epoch + 1}/{config.epochs}")
        val_logits = logits_of(model, batches.xn, va_sel, device)
        ap = average_precision(data.y[va_sel], val_logits) if len(va_sel) else float("nan")
        history.append({"epoch": epoch + 1, "loss": loss, "val_ap": ap})
        sys.stderr.write(f"  validation AP {ap:.3f}\n")
        score = ap if np.isfinite(ap) else 0.0  # no validation positives: every epoch ties, the latest wins
        if score > best[0] or not np.isfinite(ap):
            best = (score, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, epoch + 1)

    model.load_state_dict(best[1])
    val_logits = logits_of(model, batches.xn, va, device)
    yv, wv = data.y[va], data.weight[va]
    # Too few validation positives to calibrate on: leave the logits as trained (and say so in the metrics).
    a, b = fit_platt(val_logits, yv, wv) if yv.sum() >= MIN_PLATT_POSITIVES else (1.0, 0.0)
    state = {k: v.clone() for k, v in best[1].items()}
    state["risk_head.bias"] = state["risk_head.bias"] + b / a  # sigmoid(a*z + b) = sigmoid((z + b/a) / (1/a))
    temperature = 1.0 / a
    pv = 1 / (1 + np.exp(-(a * val_logits + b)))
    threshold, val_f1 = best_f1_threshold(pv, yv, wv)
    log(f"best epoch {best[2]} (validation AP {best[0]:.3f}); Platt a={a:.3f} b={b:.3f}; "
        f"sequence-level threshold {threshold:.2f} (F1 {val_f1:.3f})")  # fmt: skip
    return ModelArtifact(
        # The data it was trained on, then the weights: seeds or settings on the same data differ in name.
        version=f"lstm-{__version__}-{data_fingerprint[:8] or 'adhoc'}-{weights_digest(state)}",
        state_dict=state,
        features=FEATURE_NAMES,
        window=window,
        norm_mean=mean.astype(np.float32),
        norm_std=std.astype(np.float32),
        hidden=config.hidden,
        mlp=config.mlp,
        temperature=temperature,
        threshold=threshold,
        # The base rate the calibrated score is a probability at: the weighted share of positives among the
        # training fleets' sequences (negatives were subsampled, their weights undo it; the calibration split is
        # a random share of their GPUs, so it has the same base rate).
        calibration_prevalence=float((data.weight * data.y).sum() / max(data.weight.sum(), 1e-12)),
        horizon_s=horizon_s,
        metrics={
            "validation_sequence_ap": best[0],
            "validation_sequence_f1": val_f1,
            "best_epoch": best[2],
            "train_sequences": int(len(tr)),
            "val_sequences": int(len(va)),
            "history": history,
            "train_config": asdict(config),
        },  # fmt: skip
        data_fingerprint=data_fingerprint,
        created_at=time.time(),
    )
