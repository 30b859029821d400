"""Evaluation metrics (paper 5.1.4): AUC and F1 for urban village detection; RMSE, MAE and R^2
for the regressions (in original units). scikit-learn implements them; we only pick and name."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

HIGHER_IS_BETTER = {"AUC": True, "F1": True, "RMSE": False, "MAE": False, "R2": True,
                    "accuracy": True, "macro_F1": True}
PRIMARY = {"binary": "AUC", "regression": "RMSE", "multiclass": "macro_F1"}


def binary_metrics(y_true, prob, threshold: float = 0.5) -> dict:
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    auc = float(skm.roc_auc_score(y_true, prob)) if len(np.unique(y_true)) == 2 else float("nan")
    f1 = float(skm.f1_score(y_true, (prob >= threshold).astype(int), zero_division=0))
    return {"AUC": auc, "F1": f1}


def regression_metrics(y_true, y_pred) -> dict:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    return {"RMSE": float(np.sqrt(skm.mean_squared_error(y_true, y_pred))),
            "MAE": float(skm.mean_absolute_error(y_true, y_pred)),
            "R2": float(skm.r2_score(y_true, y_pred))}


def multiclass_metrics(y_true, prob) -> dict:
    y_true = np.asarray(y_true).astype(int)
    pred = np.asarray(prob).argmax(axis=1)
    return {"accuracy": float(skm.accuracy_score(y_true, pred)),
            "macro_F1": float(skm.f1_score(y_true, pred, average="macro", zero_division=0))}


def task_metrics(kind: str, y_true, y_pred) -> dict:
    """Metrics of one task kind; ``y_pred`` are probabilities (binary/multiclass) or values."""
    if kind == "binary":
        return binary_metrics(y_true, y_pred)
    if kind == "regression":
        return regression_metrics(y_true, y_pred)
    return multiclass_metrics(y_true, y_pred)


def is_better(kind: str, new: dict, best: dict | None) -> bool:
    """Model selection on validation by the task's primary metric."""
    if best is None:
        return True
    key = PRIMARY[kind]
    a, b = new[key], best[key]
    if np.isnan(a):
        return False
    if np.isnan(b):
        return True
    return a > b if HIGHER_IS_BETTER[key] else a < b
