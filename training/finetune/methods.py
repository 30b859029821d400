"""The evaluation's methods: ReFound variants and baselines behind one small interface.

A method trains on the train split, selects its best epoch on validation (primary metric of the
task), and returns predictions (original units / probabilities) for validation and test.
``training/finetune/evaluate.py`` runs every method N times and tabulates the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

from training.finetune.tasks import TaskSpec


@dataclass
class EvalContext:
    """Everything a method may need, shared by all methods of one evaluation.

    Attributes:
        dataset: a ``refound_core.data.dataset.RegionDataset`` (the downstream city).
        checkpoint: pre-trained ReFound checkpoint folder (None for methods that need none).
        device: ``"cpu"``/``"cuda"``.
        epochs, batch_size, lr: training budget (methods may scale lr to their own defaults).
        warmup_epochs: linear lr warm-up before the linear decay (paper A.2.2/A.2.3: 3).
        cache_dir: where methods cache frozen features (embeddings, teacher outputs).
        workers: DataLoader workers.
        options: free-form per-method options (e.g. ``{"fusion": "attention"}``).
    """

    dataset: object
    checkpoint: Optional[str]
    device: str = "cpu"
    epochs: int = 10
    batch_size: int = 12
    lr: Optional[float] = None
    warmup_epochs: int = 3
    cache_dir: Optional[str] = None
    workers: int = 0
    options: dict = field(default_factory=dict)


@dataclass
class Split:
    """Index arrays of the train / validation / test regions (paper 5.1.2: random thirds)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_dict(self, cell_ids) -> dict:
        return {k: [cell_ids[i] for i in getattr(self, k)] for k in ("train", "val", "test")}


@dataclass
class MethodResult:
    """Predictions in original units (regression) or probabilities (binary), aligned with the
    split's ``val`` / ``test`` index arrays, plus the epoch that was selected on validation."""

    val_pred: np.ndarray
    test_pred: np.ndarray
    best_epoch: int
    history: list = field(default_factory=list)


class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`run`."""

    name: str = ""
    #: which of the paper's methods this one is or stands in for, and why (shown in tables/docs)
    stands_in_for: str = ""
    #: "fine-tuning" or "feature-based" (the paper's two usage modes, 4.3)
    mode: str = "fine-tuning"

    def __init__(self, ctx: EvalContext):
        self.ctx = ctx

    def run(self, task: TaskSpec, split: Split, seed: int) -> MethodResult:  # pragma: no cover - interface
        raise NotImplementedError


REGISTRY: Dict[str, Callable[[EvalContext], Method]] = {}


def register(cls):
    """Class decorator adding a method to :data:`REGISTRY` under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def labels_of(dataset, task: TaskSpec) -> np.ndarray:
    """float64 [N] label column of the task (NaN = unknown)."""
    from refound_core.errors import InputError

    if task.label not in dataset.labels:
        raise InputError(f"the region dataset {dataset.folder} has no label column {task.label!r} "
                         f"(it has {sorted(dataset.labels)}); rebuild it with that label source")
    return np.asarray(dataset.labels[task.label], dtype=np.float64)
