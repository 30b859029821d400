"""Downstream tasks: a task is a head kind + a label source (paper 5.1.2).

The three built-in tasks are the paper's. A user adds another by naming a label column of the
region dataset and a kind: ``TaskSpec.custom("green_share", "regression")``; a column made by
``refound add-label`` carries its kind (and class names), so its name alone is enough
(:func:`task_for_dataset`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

from refound_core.errors import InputError

KINDS = ("binary", "regression", "multiclass")


@dataclass(frozen=True)
class TaskSpec:
    """What to predict and how it is scored.

    Attributes:
        name: task name used on the command line and in checkpoints.
        label: label column in the region dataset.
        kind: ``binary`` (AUC, F1), ``regression`` (RMSE, MAE, R^2) or ``multiclass`` (accuracy, macro-F1).
        log_target: regression trained on log1p(y) and reported in original units (5.1.2 targets
            are heavy-tailed counts).
        num_classes: for multiclass.
        description: one line for tables and layer legends.
    """

    name: str
    label: str
    kind: str
    log_target: bool = False
    num_classes: int = 1
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"task kind {self.kind!r} is not one of {KINDS}")

    @classmethod
    def custom(cls, label: str, kind: str, log_target: bool = False, num_classes: int = 1) -> "TaskSpec":
        return cls(name=label, label=label, kind=kind, log_target=log_target, num_classes=num_classes,
                   description=f"user task on label column {label!r} ({kind})")

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.kind == "multiclass" else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        return cls(**d)

    # -- target transforms: the head learns in "model space", metrics use original units ------
    def to_model_space(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        return np.log1p(np.clip(y, 0, None)) if self.log_target else y

    def to_original(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        return np.maximum(np.expm1(y), 0.0) if self.log_target else y


BUILTIN = {
    "urban_village": TaskSpec("urban_village", "urban_village", "binary",
                              description="urban village detection (binary, > 20% overlap)"),
    "population": TaskSpec("population", "population", "regression", log_target=True,
                           description="population per cell (persons)"),
    "commercial": TaskSpec("commercial", "commercial", "regression", log_target=True,
                           description="commercial activeness (sum of POI review counts)"),
}
ALIASES = {"uvd": "urban_village", "pop": "population", "cap": "commercial",
           "commercial_activeness": "commercial", "urban_villages": "urban_village"}


def get_task(name: str, kind: Optional[str] = None, label: Optional[str] = None,
             log_target: Optional[bool] = None) -> TaskSpec:
    """A built-in task by name (or alias), or a custom one when ``kind`` is given."""
    key = ALIASES.get(name, name)
    if kind is None and key in BUILTIN:
        spec = BUILTIN[key]
        if log_target is not None:
            spec = TaskSpec(**{**spec.to_dict(), "log_target": log_target})
        return spec
    if kind is None:
        raise InputError(f"unknown task {name!r}: use one of {sorted(BUILTIN)} or give --task-kind "
                         "(binary/regression/multiclass) to train on a label column of that name")
    return TaskSpec.custom(label or name, kind, log_target=bool(log_target))


def task_for_dataset(name: str, dataset, kind: Optional[str] = None, label: Optional[str] = None,
                     log_target: Optional[bool] = None, num_classes: Optional[int] = None) -> TaskSpec:
    """:func:`get_task`, completed from the dataset: the kind and classes that ``refound add-label``
    stored with a label, and for a multiclass task without them, the classes seen in the column."""
    info = dataset.label_info.get(label or name, {})
    if kind is None and ALIASES.get(name, name) not in BUILTIN:
        kind = info.get("kind")
    spec = get_task(name, kind=kind, label=label, log_target=log_target)
    if spec.kind != "multiclass":
        return spec
    n = num_classes or (len(info["classes"]) if info.get("classes") else None)
    if n is None:
        y = np.asarray(dataset.labels.get(spec.label, []), dtype=np.float64)
        y = y[np.isfinite(y)]
        n = int(y.max()) + 1 if y.size else 0
    if n < 2:
        raise InputError(f"multiclass task {spec.name!r} needs at least 2 classes; give --num-classes")
    return replace(spec, num_classes=n)
