"""One supervised training loop for every downstream method (ReFound and baselines alike), so the
comparison differs only in the model: AdamW (beta 0.9/0.999, weight decay 0.01), linear warm-up
over the first 3 epochs then linear decay (paper A.2.2/A.2.3), selection of the best epoch on
validation by the task's primary metric, predictions of that epoch for validation and test.

With ``state_path`` the loop is resumable: after every epoch it writes (atomically) the model,
optimizer, schedule, RNG and best-epoch bookkeeping, and a later call with the same arguments
starts after the last finished epoch. The best epoch's weights go to ``best-<epoch>.pt`` beside it,
written only when the best epoch changes (not every epoch: for refound_base that is ~0.4 GB a
write). Batches are seeded by (seed, epoch), so a resumed run sees the same data order as an
uninterrupted one.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from training.finetune.methods import MethodResult
from training.finetune.metrics import is_better, task_metrics
from training.finetune.tasks import TaskSpec


@dataclass
class TargetScaler:
    """Regression targets are trained standardised in model space (log1p when the task says so),
    so one learning rate fits population counts and review sums alike; predictions are mapped
    back to original units before any metric is computed."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, task: TaskSpec, y_train: np.ndarray) -> "TargetScaler":
        if task.kind != "regression":
            return cls()
        z = task.to_model_space(y_train)
        return cls(float(np.mean(z)), float(np.std(z) or 1.0))

    def encode(self, task: TaskSpec, y: np.ndarray) -> np.ndarray:
        if task.kind != "regression":
            return np.asarray(y, dtype=np.float64)
        return (task.to_model_space(y) - self.mean) / self.std

    def decode(self, task: TaskSpec, out: np.ndarray) -> np.ndarray:
        """Head outputs -> original units (regression) or probabilities (binary / multiclass)."""
        out = np.asarray(out, dtype=np.float64)
        if task.kind == "binary":
            return 1.0 / (1.0 + np.exp(-out.reshape(-1)))
        if task.kind == "multiclass":
            e = np.exp(out - out.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return task.to_original(out.reshape(-1) * self.std + self.mean)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


def loss_fn(task: TaskSpec) -> Callable:
    if task.kind == "binary":
        bce = nn.BCEWithLogitsLoss()
        return lambda out, y: bce(out.reshape(-1), y.float())
    if task.kind == "multiclass":
        ce = nn.CrossEntropyLoss()
        return lambda out, y: ce(out, y.long())
    mse = nn.MSELoss()
    return lambda out, y: mse(out.reshape(-1), y.float())


def warmup_linear(optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up to the peak lr, then linear decay to 0 (paper A.2.1-A.2.3)."""
    def factor(step):
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit_and_select(
    model: nn.Module,
    param_groups,
    forward: Callable[[object], torch.Tensor],
    batches: Callable[[np.ndarray, bool, int], Iterable[tuple]],
    task: TaskSpec,
    y: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    epochs: int,
    lr: float,
    warmup_epochs: int = 3,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
    state_path=None,
) -> tuple:
    """Train, select on validation, predict.

    Args:
        model: the trainable module (its ``train()``/``eval()`` are toggled here).
        param_groups: what AdamW optimises (lists of dicts may carry ``lr_scale``).
        forward: ``batch -> head outputs [B, k]``.
        batches: ``(indices, shuffle, epoch) -> iterable of (batch, positions)`` where
            ``positions`` index into ``indices`` (batches may reorder regions, e.g. by length).
        y: labels of all regions (original units), indexed by dataset index.
        state_path: file of the resumable state (written after every epoch; read when present).
    Returns:
        ``(MethodResult, best_state_dict, scaler)``.
    """
    torch.manual_seed(seed)
    scaler = TargetScaler.fit(task, y[train_idx])
    y_model = torch.tensor(scaler.encode(task, y), dtype=torch.float32)
    criterion = loss_fn(task)
    for g in param_groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0) if "lr_scale" in g else lr
        g.setdefault("weight_decay", weight_decay)
    # remember each group's peak lr: LambdaLR scales from initial_lr
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    steps_per_epoch = max(1, sum(1 for _ in batches(train_idx, False, -1)))
    sched = warmup_linear(optimizer, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    best, best_state, best_epoch, history = None, None, -1, []
    best_preds = None
    start = 0
    if state_path is not None and Path(state_path).is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)  # tensors and plain values only
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["torch_rng"])
        best, best_epoch = st["best"], st["best_epoch"]
        if best_epoch >= 0:
            best_state = torch.load(_best_path(state_path, best_epoch), map_location="cpu", weights_only=True)
        best_preds = None if st["best_preds"] is None else st["best_preds"].numpy()
        history, start = st["history"], st["epoch"] + 1
        if log:
            log(f"resuming after epoch {start}/{epochs} (state {state_path})")
    for epoch in range(start, epochs):
        model.train()
        total, count = 0.0, 0
        for batch, pos in batches(train_idx, True, epoch):
            target = y_model[torch.as_tensor(train_idx[pos])]
            out = forward(batch)
            loss = criterion(out, target.to(out.device))
            if not torch.isfinite(loss):
                continue  # a non-finite batch is skipped, not propagated into the weights
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            sched.step()
            total += float(loss.detach()) * len(pos)
            count += len(pos)
        val_pred = predict(model, forward, batches, val_idx, task, scaler)
        val_metrics = task_metrics(task.kind, y[val_idx], val_pred, y_val=y[val_idx], val_pred=val_pred)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), **{f"val_{k}": v for k, v in val_metrics.items()}})
        if log:
            log(f"epoch {epoch + 1}/{epochs} loss {total / max(count, 1):.4f} " +
                " ".join(f"val {k} {v:.4f}" for k, v in val_metrics.items()))
        if is_better(task.kind, val_metrics, best):
            best, best_epoch = val_metrics, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            best_preds = val_pred
            if state_path is not None:
                _save_state(_best_path(state_path, epoch), best_state)
        if state_path is not None:
            _save_state(state_path, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "best": None if best is None else {k: float(v) for k, v in best.items()},
                "best_epoch": best_epoch,
                "best_preds": None if best_preds is None else torch.from_numpy(np.ascontiguousarray(best_preds)),
                "history": [{k: float(v) if isinstance(v, (float, np.floating)) else int(v) for k, v in h.items()}
                            for h in history]})
            for old in Path(state_path).parent.glob("best-*.pt"):  # the state now points at the newest
                if old != _best_path(state_path, best_epoch):
                    old.unlink(missing_ok=True)
    model.load_state_dict(best_state)
    test_pred = predict(model, forward, batches, test_idx, task, scaler)
    return MethodResult(val_pred=best_preds, test_pred=test_pred, best_epoch=best_epoch, history=history), best_state, scaler


def _best_path(state_path, epoch: int):
    """The best epoch's weights beside the state file (None before any epoch was best)."""
    return Path(state_path).with_name(f"best-{int(epoch)}.pt") if epoch >= 0 else None


def _save_state(path, state: dict) -> None:
    """torch.save to a temp file in the same folder, then rename: a kill mid-write keeps the last state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def predict(model, forward, batches, idx: np.ndarray, task: TaskSpec, scaler: TargetScaler) -> np.ndarray:
    """Predictions for ``idx`` in original units / probabilities, in the order of ``idx``."""
    model.eval()
    k = task.num_outputs
    out = np.zeros((len(idx), k), dtype=np.float64)
    for batch, pos in batches(idx, False, -1):
        out[np.asarray(pos)] = forward(batch).float().reshape(len(pos), k).cpu().numpy()
    return scaler.decode(task, out if k > 1 else out[:, 0])


def layer_decay_groups(backbone, head: nn.Module, weight_decay: float, layer_decay: float) -> list:
    """AdamW groups with layer-wise lr decay (paper A.2.2: ratio 0.75, following BEiT): the head
    gets the full lr, the top encoder layer ``layer_decay`` times it, each layer below
    ``layer_decay`` times the one above, and the embeddings (layer id 0) the smallest,
    ``layer_decay ** (num_layers + 1)``. As in BEiT's ``LayerDecayValueAssigner``, the head counts
    as the layer above the top one. No weight decay on biases, norms and embedding tables.

    Written here rather than with ``timm.optim.param_groups_layer_decay`` because the backbone and
    the head are separate modules with their own layer numbering.
    """
    num_layers = backbone.config.num_layers + 1
    skip = set(getattr(backbone, "no_weight_decay", lambda: set())())
    groups = {}
    for name, p in backbone.named_parameters():
        if not p.requires_grad:
            continue
        layer = backbone.layer_id(name)
        no_wd = p.ndim <= 1 or name in skip or "embed" in name
        key = (layer, no_wd)
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                    "lr_scale": layer_decay ** (num_layers - layer)})
        g["params"].append(p)
    head_decay = [p for n, p in head.named_parameters() if p.ndim > 1]
    head_no = [p for n, p in head.named_parameters() if p.ndim <= 1]
    out = list(groups.values())
    out.append({"params": head_decay, "weight_decay": weight_decay, "lr_scale": 1.0})
    if head_no:
        out.append({"params": head_no, "weight_decay": 0.0, "lr_scale": 1.0})
    return out


def steps_hint(n_train: int, batch_size: int, epochs: int) -> int:
    return epochs * math.ceil(n_train / batch_size)
