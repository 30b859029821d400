"""Shared pieces of the baselines (paper 5.1.3, A.1): batching, inputs, frozen-feature cache.

Every baseline trains through :func:`training.finetune.loop.fit_and_select`, the loop ReFound
itself uses, so the comparison differs only in the model. A batch handed to that loop is just an
array of dataset indices; the method's ``forward`` turns it into tensors. That keeps the loop's
step-counting pass (it iterates the batches once before training) free of any image or text work.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from refound_core.errors import InputError
from training.finetune.methods import EvalContext, MethodResult, Split, labels_of
from training.finetune.tasks import TaskSpec

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: peak learning rates when the evaluation gives none: ReFound's fine-tuning / feature-based
#: settings (paper A.2.2 Table 5: 1e-4; A.2.3 Table 6: 5e-4) so a baseline gets ReFound's budget.
LR_FINETUNE = 1e-4
LR_SCRATCH = 5e-4
LR_FEATURES = 5e-4


# ------------------------------------------------------------------------------------ options
def option(ctx: EvalContext, key: str, default):
    """A per-method setting from ``ctx.options`` (flat keys such as ``text_max_tokens``)."""
    return (ctx.options or {}).get(key, default)


def peak_lr(ctx: EvalContext, default: float) -> float:
    return float(ctx.lr) if ctx.lr is not None else float(default)


# ------------------------------------------------------------------------------------ batching
class IndexBatches:
    """The ``batches`` callable of :func:`fit_and_select`: ``(indices, shuffle, epoch)`` ->
    ``[(dataset_indices, positions)]``.

    ``lengths`` (per dataset index, optional) groups regions of similar text length so padding
    stays small (``refound_core.data.featurize.length_bucketed_batches``). Shuffling is drawn from
    ``(seed, epoch)``, so an epoch's batches are the same on every run with that seed.
    """

    def __init__(self, batch_size: int, seed: int, lengths: Optional[np.ndarray] = None):
        if batch_size < 1:
            raise InputError(f"batch size must be positive, got {batch_size}")
        self.batch_size, self.seed, self.lengths = int(batch_size), int(seed), lengths

    def __call__(self, indices, shuffle: bool, epoch: int):
        indices = np.asarray(indices, dtype=np.int64)
        rng = np.random.default_rng([self.seed, max(epoch, 0) + 1]) if shuffle else None
        if self.lengths is not None:
            from refound_core.data.featurize import length_bucketed_batches

            groups = length_bucketed_batches(self.lengths[indices], self.batch_size, shuffle=shuffle, rng=rng)
        else:
            order = rng.permutation(len(indices)) if shuffle else np.arange(len(indices))
            groups = [order[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        return [(indices[np.asarray(pos, dtype=np.int64)], np.asarray(pos, dtype=np.int64)) for pos in groups]


def decay_groups(model, weight_decay: float = 0.01) -> list:
    """AdamW groups: no weight decay on biases, norm weights and embedding tables (BERT/timm usage)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "embed" in name.lower() or "pos_embed" in name or "cls_token" in name
         else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def train_supervised(ctx: EvalContext, task: TaskSpec, split: Split, seed: int, model,
                     forward: Callable, batches: Callable, lr: float) -> MethodResult:
    """Labels of the task, then the shared loop (AdamW, ``ctx.warmup_epochs`` warm-up + linear decay, best
    validation epoch, predictions in original units). Training regions without a label are left
    out (a NaN target would make the loop skip its whole batch)."""
    import torch

    from training.finetune.loop import fit_and_select

    y = labels_of(ctx.dataset, task)
    train = np.asarray(split.train, dtype=np.int64)
    train = train[np.isfinite(y[train])]
    if len(train) == 0:
        raise InputError(f"task {task.name!r}: no region of the training split has a {task.label!r} label")
    model.to(ctx.device)
    result, _, _ = fit_and_select(model, decay_groups(model), forward, batches, task, y, train,
                                  np.asarray(split.val, dtype=np.int64), np.asarray(split.test, dtype=np.int64),
                                  epochs=int(ctx.epochs), lr=lr, warmup_epochs=ctx.warmup_epochs, seed=seed,
                                  log=log.info)
    if str(ctx.device).startswith("cuda"):
        torch.cuda.empty_cache()  # the optimizer of this run is gone; give its memory back
    return result


def make_head(task: TaskSpec, hidden_size: int, fusion: str = "average", dropout: float = 0.1):
    """The 2-layer MLP task head ReFound uses (paper A.2.2; ``refound_core.model.heads.TaskHead``)."""
    from refound_core.model.heads import TaskHead

    return TaskHead(hidden_size, kind=task.kind, num_classes=task.num_classes if task.kind == "multiclass" else 1,
                    fusion=fusion, dropout=dropout)


def as_region_pair(h):
    """``[B, H]`` single-modality representation -> ``[B, 2, H]`` for :class:`TaskHead` (average
    fusion of two equal slots is the representation itself)."""
    return h.unsqueeze(1).expand(-1, 2, -1)


# ------------------------------------------------------------------------------------ POI text
def zordered_names(sample, rng: np.random.Generator) -> list:
    """POI names of a region along the Z-curve (paper 4.1.1; ``refound_core.data.zorder``)."""
    from refound_core.data.zorder import zorder_permutation

    names = list(sample.poi_names)
    if not names:
        return []
    xmin, _, _, ymax = (float(v) for v in sample.bounds)
    xy = np.asarray(sample.poi_xy, dtype=np.float64).reshape(-1, 2)
    local = np.column_stack([xy[:, 0] - xmin, ymax - xy[:, 1]])  # metres east / south of the NW corner
    return [names[i] for i in zorder_permutation(local, rng)]


class _NoCategories:
    """The featurizer's category vocabulary for text-only models, which ignore categories."""

    PAD_ID = 0

    def encode(self, labels):
        return np.zeros(len(labels), dtype=np.int64)


def poi_token_ids(dataset, indices: Sequence[int], tokenizer, max_tokens: int, seed: int) -> dict:
    """``{dataset index: int64 token ids}`` of ``[CLS] name_1 [SEP] name_2 [SEP] ...``.

    The POI sequence is built by the project's featurizer (Z-order, paper 4.1.1; POIs randomly
    excluded until ``max_tokens`` fit, A.2.1), so a text baseline reads exactly the names ReFound
    reads. A region without POIs is ``[CLS] [SEP]``, the BERT encoding of an empty text.
    """
    from refound_core.data.featurize import Featurizer

    feat = Featurizer(tokenizer, _NoCategories(), max_poi_tokens=int(max_tokens))
    rng = np.random.default_rng(seed)
    out = {}
    for i in indices:
        ids = feat.encode(dataset[int(i)], rng).token_ids
        if ids.shape[0] == 1:
            ids = np.array([feat.cls_id, feat.sep_id], dtype=np.int64)
        out[int(i)] = ids
    return out


def pad_token_batch(seqs: Sequence[np.ndarray], pad_id: int = 0, device="cpu"):
    """Right-padded ``input_ids`` and ``attention_mask`` (int64 ``[B, L]``)."""
    import torch

    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def load_text_tokenizer(dataset):
    """The dataset's POI tokenizer (bert-base-uncased wordpieces + the data's CJK characters, as
    ReFound uses), or the plain bert-base-uncased one when the dataset has none."""
    from refound_core.data.tokenizer import PoiTokenizer

    if getattr(dataset, "tokenizer_path", None) is not None and Path(dataset.tokenizer_path).is_dir():
        return dataset.load_tokenizer()
    return PoiTokenizer.default()


def region_presence(dataset, indices) -> tuple:
    """(has_pois, has_image) bool arrays for ``indices``."""
    idx = np.asarray(indices, dtype=np.int64)
    return np.asarray(dataset.poi_count)[idx] > 0, np.asarray(dataset.image_coverage)[idx] > 0


# ------------------------------------------------------------------------------------ images
def region_images(dataset, indices) -> tuple:
    """(list of uint8 ``[H, W, 3]`` images or None, has_image bool array)."""
    idx = [int(i) for i in indices]
    cover = np.asarray(dataset.image_coverage)[idx] > 0
    stack = getattr(dataset, "images", None)
    if stack is not None:
        imgs = [np.array(stack[i]) if c else None for i, c in zip(idx, cover)]
    else:
        imgs = [dataset[i].image if c else None for i, c in zip(idx, cover)]
    return imgs, cover


def image_batch(dataset, indices, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu"):
    """Normalised ``float32 [B, 3, size, size]`` (bilinear, antialiased resize, no crop) and the
    bool ``has_image [B]``. A region without an image gets an all-zero input (the normalised mean
    colour); the flag lets the model ignore it."""
    import torch

    from refound_core.teachers.visual import images_to_tensor

    imgs, has = region_images(dataset, indices)
    x = torch.zeros(len(imgs), 3, size, size)
    present = [k for k, im in enumerate(imgs) if im is not None]
    if present:
        x[present] = images_to_tensor([imgs[k] for k in present], size, mean, std)
    return x.to(device), torch.from_numpy(has).to(device)


# ------------------------------------------------------------------------------------ frozen features
def dataset_identity(dataset) -> dict:
    """What a frozen feature of the dataset depends on: its folder, size and content fingerprint
    (cell ids and ``meta.json``, as the teacher cache uses)."""
    from refound_core.teachers.base import stable_hash

    folder = getattr(dataset, "folder", None)
    ids = list(getattr(dataset, "cell_ids", []) or [])
    return {"folder": os.path.abspath(os.fspath(folder)) if folder is not None else None, "n": len(dataset),
            "fingerprint": stable_hash({"cell_ids": ids, "meta": getattr(dataset, "meta", None)}, 32)}


_MEMORY: dict = {}


def clear_memory_cache() -> None:
    """Forget features held in this process (the disk cache stays)."""
    _MEMORY.clear()


class FeatureCache:
    """Frozen features computed once per (models, dataset) and reused by every run and seed.

    Held in memory for the process and, when ``cache_dir`` is set, stored as
    ``cache_dir/baseline_features/<hash>.npz`` (+ ``.json`` with the key), written atomically.
    The key names the models by their identity strings (weights signature, preprocessing), so a
    changed model or dataset never reads a stale file.
    """

    SUBDIR = "baseline_features"

    def __init__(self, cache_dir: Optional[str]):
        self.root = Path(cache_dir) / self.SUBDIR if cache_dir else None

    @staticmethod
    def digest(key: dict) -> str:
        text = json.dumps(key, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]

    def path_for(self, key: dict) -> Optional[Path]:
        return self.root / f"{self.digest(key)}.npz" if self.root is not None else None

    def get_or_compute(self, key: dict, compute: Callable[[], dict]) -> dict:
        """``{name: array}`` for ``key``: from memory, else disk, else ``compute()`` (then stored)."""
        digest = self.digest(key)
        if digest in _MEMORY:
            return _MEMORY[digest]
        path = self.path_for(key)
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            log.info("baseline feature cache hit: %s", path)
        else:
            arrays = {k: np.asarray(v) for k, v in compute().items()}
            if path is not None:
                self._write(path, key, arrays)
        _MEMORY[digest] = arrays
        return arrays

    @staticmethod
    def _write(path: Path, key: dict, arrays: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(key, fh, indent=1, ensure_ascii=False, default=str)
        os.replace(tmp, path.with_suffix(".json"))
