"""Evaluation metrics (paper 5.1.4): AUC and F1 for urban village detection; RMSE, MAE and R^2
for the regressions (in original units). scikit-learn implements them; we only pick and name.

F1 needs a decision threshold. A fixed 0.5 is an artefact of how calibrated a head happens to be
(a well-ranking head whose probabilities all sit below 0.5 scores F1 = 0), so the threshold is
chosen on the validation split (the one maximising validation F1, :func:`choose_threshold`) and
applied unchanged to test. AUPRC (average precision) is reported beside AUC: with few positives it
tells rankers apart that AUC rates alike."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

HIGHER_IS_BETTER = {"AUC": True, "AUPRC": True, "F1": True, "threshold": True, "RMSE": False, "MAE": False, "R2": True,
                    "accuracy": True, "macro_F1": True}
PRIMARY = {"binary": "AUC", "regression": "RMSE", "multiclass": "macro_F1"}


def choose_threshold(y_val, prob_val) -> float:
    """The probability threshold that maximises F1 on validation data (ties: the lowest such
    threshold). Candidates are the validation scores themselves, so the result is one of them;
    with no positive in ``y_val`` F1 is undefined and 0.5 is returned."""
    y = np.asarray(y_val).astype(int)
    prob = np.asarray(prob_val, dtype=np.float64)
    if y.sum() == 0 or len(y) == 0:
        return 0.5
    precision, recall, thresholds = skm.precision_recall_curve(y, prob)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    # the last (precision, recall) pair has no threshold (recall 0); argmax takes the first maximum
    return float(thresholds[int(np.argmax(f1[:-1]))])


def binary_metrics(y_true, prob, threshold: float) -> dict:
    """AUC, AUPRC and F1 at ``threshold``, which the caller must choose on validation data
    (:func:`choose_threshold`); it is returned as ``threshold`` so every table can state it."""
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    both = len(np.unique(y_true)) == 2
    auc = float(skm.roc_auc_score(y_true, prob)) if both else float("nan")
    auprc = float(skm.average_precision_score(y_true, prob)) if y_true.sum() > 0 else float("nan")
    f1 = float(skm.f1_score(y_true, (prob >= threshold).astype(int), zero_division=0))
    return {"AUC": auc, "AUPRC": auprc, "F1": f1, "threshold": float(threshold)}


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


def task_metrics(kind: str, y_true, y_pred, *, y_val=None, val_pred=None) -> dict:
    """Metrics of one task kind; ``y_pred`` are probabilities (binary/multiclass) or values.

    Binary tasks need the validation labels and predictions (``y_val``, ``val_pred``): F1's
    threshold is chosen on them. Scoring validation itself passes them as ``y_true``/``y_pred``.
    """
    if kind == "binary":
        if y_val is None or val_pred is None:
            raise ValueError("binary metrics need y_val and val_pred: F1's threshold is chosen on validation data")
        return binary_metrics(y_true, y_pred, choose_threshold(y_val, val_pred))
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
