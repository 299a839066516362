"""The task metrics of `fish-tune train` (numpy only) and the trivial baseline printed beside them.

Classification: accuracy, f1 (binary: the positive class, label id 1; more classes: macro), mcc. Regression:
pearson, spearman (and mse). ``score`` is the task's headline number: GLUE's own where the data is a known GLUE
task (CoLA mcc, MRPC / QQP (f1 + accuracy) / 2, STS-B (pearson + spearman) / 2, the others accuracy), else accuracy
for classification and (pearson + spearman) / 2 for regression. A constant prediction has no correlation: mcc,
pearson and spearman are 0 there, never NaN. The trivial baseline predicts the majority train class, or the train
mean: a run whose score is not above it has learned nothing a constant would not give.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

import numpy as np

# GLUE task -> headline metric (GLUE's definitions); keys are the names of the hub configs and of the data folders
GLUE_HEADLINE = {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1_accuracy", "qqp": "f1_accuracy",
                 "stsb": "pearson_spearman", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy",
                 "wnli": "accuracy"}
CLASSIFICATION = ("accuracy", "f1", "mcc")
REGRESSION = ("pearson", "spearman", "mse")


def glue_task(dataset_name: str | None, dataset_config_name: str | None, train_file: str | None) -> str | None:
    """The GLUE task the data is, if it says so: ``--dataset_name glue|nyu-mll/glue --dataset_config_name cola``,
    or a train file inside a folder named like a GLUE task (``.../CoLA/train.tsv``, ``.../STS-B/train.tsv``)."""
    if dataset_name and dataset_name.lower() in ("glue", "nyu-mll/glue") and dataset_config_name:
        key = dataset_config_name.lower().replace("-", "")
        return key if key in GLUE_HEADLINE else None
    if train_file:
        for part in reversed(PurePath(train_file).parent.parts):
            key = part.lower().replace("-", "")
            if key in GLUE_HEADLINE:
                return key
    return None


def headline(task: str, glue: str | None) -> str | None:
    """The name of the score's definition: accuracy, mcc, f1_accuracy or pearson_spearman (None: causal-lm)."""
    if task == "causal-lm":
        return None
    if glue is not None and (GLUE_HEADLINE[glue] == "pearson_spearman") == (task == "regression"):
        return GLUE_HEADLINE[glue]
    return "pearson_spearman" if task == "regression" else "accuracy"


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0
    out = np.empty(len(x), dtype=float)
    out[order] = mean_rank[group]
    return out


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    return _corr(np.asarray(preds, dtype=float).reshape(-1), np.asarray(labels, dtype=float).reshape(-1))


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    p, y = np.asarray(preds, dtype=float).reshape(-1), np.asarray(labels, dtype=float).reshape(-1)
    return _corr(_ranks(p), _ranks(y))


def mcc(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> float:
    """Matthews correlation, multi-class (Gorodkin's R_K, as scikit-learn); 0 when either side is constant."""
    c = _confusion(preds, labels, num_labels)
    t, p = c.sum(axis=1), c.sum(axis=0)  # true and predicted counts per class
    n, correct = c.sum(), np.trace(c)
    cov_yp = correct * n - float(t @ p)
    cov_yy, cov_pp = n * n - float(t @ t), n * n - float(p @ p)
    if cov_yy == 0 or cov_pp == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_yy * cov_pp))


def f1(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> float:
    """Binary: F1 of the positive class (id 1); more classes: the unweighted mean over classes (macro)."""
    c = _confusion(preds, labels, num_labels)
    tp = np.diag(c).astype(float)
    denom = c.sum(axis=0) + c.sum(axis=1)  # predicted + true per class; F1 = 2 tp / (pred + true)
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(per_class[1] if num_labels == 2 else per_class.mean())


def _confusion(preds, labels, num_labels: int) -> np.ndarray:
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    c = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(c, (y, p), 1)
    return c


def classification_metrics(preds, labels, num_labels: int, score: str) -> dict[str, float]:
    p, y = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    out = {"accuracy": float((p == y).mean()) if len(y) else 0.0, "f1": f1(p, y, num_labels),
           "mcc": mcc(p, y, num_labels)}
    out["score"] = (out["f1"] + out["accuracy"]) / 2 if score == "f1_accuracy" else out[score]
    return out


def regression_metrics(preds, labels) -> dict[str, float]:
    p, y = np.asarray(preds, dtype=float).reshape(-1), np.asarray(labels, dtype=float).reshape(-1)
    out = {"pearson": pearson(p, y), "spearman": spearman(p, y), "mse": float(((p - y) ** 2).mean())}
    out["score"] = (out["pearson"] + out["spearman"]) / 2
    return out


class TaskMetrics:
    """``compute_metrics`` for the Trainer: the task's metrics and, as ``trivial_<m>``, the same metrics of the
    constant predictor fitted on the train labels (label ids for classification, numbers for regression)."""

    def __init__(self, task: str, train_labels: Sequence, num_labels: int, glue: str | None = None):
        self.score = headline(task, glue)
        self.task, self.num_labels = task, num_labels
        self.glue = glue if glue is not None and self.score == GLUE_HEADLINE[glue] else None
        y = np.asarray(train_labels)
        if task == "regression":
            self.constant: float = float(np.asarray(y, dtype=float).mean())
        else:
            self.constant = int(np.bincount(np.asarray(y, dtype=np.int64), minlength=num_labels).argmax())

    def metrics(self, preds, labels) -> dict[str, float]:
        if self.task == "regression":
            return regression_metrics(preds, labels)
        return classification_metrics(preds, labels, self.num_labels, self.score)

    def __call__(self, pred) -> dict[str, float]:
        out = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = np.asarray(pred.label_ids).reshape(-1)
        preds = np.asarray(out, dtype=float).reshape(-1) if self.task == "regression" else np.argmax(out, axis=-1)
        trivial = np.full(len(labels), self.constant)
        return {**self.metrics(preds, labels), **{f"trivial_{k}": v for k, v in self.metrics(trivial, labels).items()}}

    def describe(self) -> str:
        """The metric named for the start-up line, e.g. ``mcc (GLUE cola)``."""
        names = {"f1_accuracy": "(f1 + accuracy) / 2", "pearson_spearman": "(pearson + spearman) / 2"}
        text = names.get(self.score, self.score)
        return f"{text} (GLUE {self.glue})" if self.glue else text
