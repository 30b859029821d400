"""A task head fitted on a frozen backbone's region embeddings (paper 4.3, feature-based
prediction), saved with the backbone as a normal checkpoint.

Used by the QGIS plugin's ``train_task_head`` algorithm (labels drawn as polygons); it needs only
``refound_core`` and torch, so any driver with RegionSamples and per-cell targets can call it.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

from refound_core.errors import InputError


def fit_frozen_head(checkpoint: str, meta: dict, samples: list, targets: dict, task: str, kind: str, out: str,
                    device: str = "auto", epochs: int = 200, seed: int = 0, progress: Optional[Callable] = None,
                    is_canceled: Optional[Callable] = None, trained_by: str = "refound_qgis train_task_head",
                    training_data: str = "labelled polygons in QGIS") -> tuple:
    """Frozen-backbone embeddings -> small TaskHead trained full-batch -> checkpoint at ``out``
    (paper 4.3, feature-based prediction: the backbone stays fixed, only the head learns).

    ``targets`` is ``{cell_id: value}``; ``progress(percent)`` gets 30..95; ``is_canceled``
    stops with :class:`~refound_core.inference.predictor.AnalysisCanceled`. Returns
    ``(training metric, cells used)``: accuracy at 0.5 (binary) or R² (regression).
    """
    import numpy as np
    import torch

    from refound_core.inference.predictor import AnalysisCanceled, Predictor
    from refound_core.model.checkpoint import save_checkpoint
    from refound_core.model.heads import TaskHead, fold_token_standardization

    torch.manual_seed(int(seed))
    pred = Predictor(checkpoint, device=device)
    progress = progress or (lambda pct: None)
    is_canceled = is_canceled or (lambda: False)
    emb = list(pred.embed_samples(samples, is_canceled=is_canceled,
                                  progress=lambda done, _t: progress(30.0 + 40.0 * done / max(1, len(samples)))))
    rows = [(r.h_P, r.h_S, targets[r.cell_id]) for r in emb if r.sufficient]
    if len(rows) < 2:
        raise InputError(f"Only {len(rows)} labelled cells have POIs or imagery; a head needs at least 2.")
    h = pred.config.hidden_size
    z = np.stack([np.stack([np.nan_to_num(p, nan=0.0), np.nan_to_num(s, nan=0.0)]) for p, s, _ in rows]).astype(np.float32)
    presence = np.array([[np.isfinite(p).all(), np.isfinite(s).all()] for p, s, _ in rows])
    y = np.array([t for _, _, t in rows], dtype=np.float32)
    target_meta = None
    if kind == "binary":
        y = (y > 0).astype(np.float32)
        if len(set(y.tolist())) < 2:
            raise InputError("After dropping cells without data only one class is left; add labels elsewhere.")
        y_train = y
    else:
        mean, std = float(y.mean()), float(y.std()) or 1.0
        y_train = (y - mean) / std
        target_meta = {"mean": mean, "std": std}
    dev = pred.device
    head = TaskHead(h, kind=kind, fusion="average", dropout=0.1).to(dev)
    zt, pt = torch.from_numpy(z).to(dev), torch.from_numpy(presence).to(dev)
    yt = torch.from_numpy(y_train).to(dev)
    # Few labels and embeddings of a frozen backbone that differ little between nearby regions:
    # standardise the fused embedding for training, then fold the scaling into the first layer
    # (W' = W / sigma, b' = b - W' mu), so the saved head is a plain TaskHead on raw embeddings.
    # sigma has a floor of 5 % of the embedding's RMS: dimensions that barely vary would otherwise
    # get huge weights, which bf16 inference (the Predictor's default on capable hardware) cannot
    # reproduce.
    with torch.no_grad():
        fused = head.fuse(zt, pt)
        floor = 0.05 * fused.pow(2).mean().sqrt().clamp_min(1e-6)
        mu, sigma = fused.mean(0), torch.sqrt(fused.var(0, unbiased=False) + floor ** 2)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    if kind == "binary":
        pos = float(y.sum())
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - pos) / max(pos, 1.0), device=dev))
    else:
        loss_fn = torch.nn.MSELoss()
    head.train()
    for epoch in range(int(epochs)):
        if is_canceled():
            raise AnalysisCanceled("canceled; no checkpoint was written")
        opt.zero_grad()
        loss = loss_fn(head.mlp((head.fuse(zt, pt) - mu) / sigma).squeeze(-1), yt)
        loss.backward()
        opt.step()
        progress(70.0 + 25.0 * (epoch + 1) / epochs)
    head.eval()
    with torch.no_grad():
        fold_token_standardization(head, mu, sigma)  # average fusion: the fused mean is an affine image
        out_t = head.predict(zt, pt).squeeze(-1).cpu().numpy()
    if kind == "binary":
        metric = float(((out_t >= 0.5) == (y >= 0.5)).mean())
    else:
        fit = out_t * target_meta["std"] + target_meta["mean"]
        ss_res, ss_tot = float(((fit - y) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
        metric = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    src_task = dict(meta.get("task") or {})
    task_meta = {"name": task, "kind": kind, "trained_by": f"{trained_by} (frozen backbone)",
                 "labelled_cells": len(rows)}
    if target_meta:  # the Predictor undoes it (refound_core.inference.predictor._inverse_target)
        task_meta["target_scaler"] = target_meta
        task_meta["log_target"] = False
    if src_task.get("featurizer"):
        task_meta["featurizer"] = src_task["featurizer"]
    files = {}
    for role, rel in (meta.get("files") or {}).items():
        p = os.path.join(checkpoint, rel)
        if os.path.exists(p):
            files[role] = p
    if os.path.isdir(out) and not os.listdir(out):
        shutil.rmtree(out)  # Processing may pre-create the destination folder
    save_checkpoint(out, pred.model.cpu(), head.cpu(), task=task_meta, tokenizer_dir=files.get("tokenizer"),
                    category_vocab=files.get("category_vocab"),
                    extra_files={k: v for k, v in files.items() if k not in ("tokenizer", "category_vocab", "codebook")},
                    provenance={"backbone": checkpoint, "training_data": training_data,
                                "epochs": int(epochs), "train_metric": metric},
                    overwrite=os.path.isdir(out))
    return metric, len(rows)
