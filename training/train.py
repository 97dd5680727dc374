"""Train the failure LSTM: focal loss, noise and time-warp augmentation, temperature calibration."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gpuwatch import __version__
from gpuwatch.streams.model import FAILURE_CLASSES, FailureLSTM, ModelArtifact
from gpuwatch.streams.window import FEATURE_NAMES, WindowConfig
from gpuwatch.training.dataset import SequenceSet


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 256
    lr: float = 2e-3
    hidden: int = 64
    mlp: int = 32
    focal_alpha: float = 0.75
    focal_gamma: float = 2.0
    noise_std: float = 0.05
    time_warp: float = 0.3  # probability of a random time-warp per sequence
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"


def focal_loss(logit: torch.Tensor, y: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Binary focal loss (Lin et al.): down-weights easy negatives in a heavily imbalanced target."""
    p = torch.sigmoid(logit)
    ce = nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    a_t = alpha * y + (1 - alpha) * (1 - y)
    return (a_t * (1 - p_t) ** gamma * ce).mean()


def time_warp(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Resample some sequences along time with a random monotone warp (stretch or squeeze the past)."""
    b, t, _ = x.shape
    pick = torch.rand(b, generator=gen) < prob
    if not pick.any():
        return x
    n = int(pick.sum())
    scale = torch.empty(n, 1).uniform_(0.6, 1.6, generator=gen)
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


def fit_temperature(logits: np.ndarray, y: np.ndarray, weight: np.ndarray) -> float:
    """Temperature minimising weighted log loss on validation data (so 0.85 means 85%)."""
    best_t, best_loss = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.02), np.log(8.0), 300)):
        p = np.clip(1 / (1 + np.exp(-logits / t)), 1e-7, 1 - 1e-7)
        loss = -np.sum(weight * (y * np.log(p) + (1 - y) * np.log(1 - p))) / weight.sum()
        if loss < best_loss:
            best_t, best_loss = float(t), loss
    return best_t


def best_f1_threshold(p: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Threshold with the best weighted F1 on validation data, and that F1."""
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


def train(
    data: SequenceSet,
    config: TrainConfig,
    *,
    window: WindowConfig,
    horizon_s: float,
    data_fingerprint: str = "",
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> ModelArtifact:
    """Train on `data` (split by GPU into train/validation), calibrate, and return an artifact."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)
    tr, va = split_by_gpu(data, config.val_fraction, config.seed)
    x_all = data.x.astype(np.float32)
    flat = x_all[tr].reshape(-1, x_all.shape[-1])
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std = np.where(std < 1e-3, 1.0, std)
    xn = torch.from_numpy((x_all - mean) / std)
    y = torch.from_numpy(data.y.astype(np.float32))
    mode_target = torch.from_numpy(np.maximum(data.mode - 1, 0))  # index into FAILURE_CLASSES
    log(f"train: {len(tr)} sequences ({int(data.y[tr].sum())} positive), validation: {len(va)} "
        f"({int(data.y[va].sum())} positive), {x_all.shape[1]} steps x {x_all.shape[2]} features")

    model = FailureLSTM(x_all.shape[-1], config.hidden, config.mlp, len(FAILURE_CLASSES)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(tr) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps_per_epoch)
    tr_t = torch.from_numpy(tr)
    for epoch in range(config.epochs):
        model.train()
        perm = tr_t[torch.randperm(len(tr_t), generator=gen)]
        t0 = time.time()
        total = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            xb = time_warp(xn[idx], config.time_warp, gen)
            xb = xb + config.noise_std * torch.randn(xb.shape, generator=gen)
            yb = y[idx]
            risk_logit, mode_logit = model(xb.to(device))
            loss = focal_loss(risk_logit, yb.to(device), config.focal_alpha, config.focal_gamma)
            pos = yb > 0.5
            if pos.any():
                loss = loss + 0.2 * nn.functional.cross_entropy(mode_logit[pos.to(device)], mode_target[idx][pos].to(device))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item()
            if step % 20 == 0 or step == steps_per_epoch - 1:
                _progress(f"epoch {epoch + 1}/{config.epochs}", step + 1, steps_per_epoch,
                          f"loss {total / (step + 1):.4f} {time.time() - t0:.0f}s")
        sys.stderr.write("\n")

    model.eval()
    with torch.inference_mode():
        val_logits = torch.cat([model(xn[va[i : i + 4096]].to(device))[0].cpu() for i in range(0, len(va), 4096)]).numpy()
    yv, wv = data.y[va], data.weight[va]
    temperature = fit_temperature(val_logits, yv, wv)
    pv = 1 / (1 + np.exp(-val_logits / temperature))
    threshold, val_f1 = best_f1_threshold(pv, yv, wv)
    log(f"calibration temperature {temperature:.3f}; operating threshold {threshold:.2f} (validation F1 {val_f1:.3f})")
    return ModelArtifact(
        version=f"lstm-{__version__}-{data_fingerprint[:8] or 'adhoc'}",
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        features=FEATURE_NAMES,
        window=window,
        norm_mean=mean.astype(np.float32),
        norm_std=std.astype(np.float32),
        hidden=config.hidden,
        mlp=config.mlp,
        temperature=temperature,
        threshold=threshold,
        horizon_s=horizon_s,
        metrics={"validation_f1": val_f1, "train_sequences": int(len(tr)), "val_sequences": int(len(va))},
        data_fingerprint=data_fingerprint,
        created_at=time.time(),
    )
