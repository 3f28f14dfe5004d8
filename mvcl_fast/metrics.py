"""Classification metrics as the MIntRec benchmarks report them.

Accuracy, macro F1 / precision / recall, weighted F1 / precision, x100 and
rounded to 2 decimals. Macro and weighted averages follow scikit-learn's
defaults, which the benchmarks' own code calls (``f1_score(y_true, y_pred,
average='macro')``): they run over the classes that occur in y_true or
y_pred, a 0/0 precision or recall counts as 0 (``zero_division=0``), and the
weighted average weights each class by its support in y_true. Computed in
numpy; scikit-learn is not needed at run time.
"""
from __future__ import annotations

import os

import numpy as np


def _as_labels(name: str, y, num_classes: int) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"{name} must hold integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} holds class ids outside [0, {num_classes}): "
                         f"min {y.min()}, max {y.max()}")
    return y


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] int64 counts; rows are true classes, columns predicted."""
    t = _as_labels("y_true", y_true, num_classes)
    p = _as_labels("y_pred", y_pred, num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes) \
        .reshape(num_classes, num_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_metrics(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """acc, f1, precision, recall (macro), weighted_f1, weighted_precision; x100, 2 decimals."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    total = cm.sum()
    if total == 0:
        raise ValueError("classification_metrics needs at least one prediction")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)   # true count per class
    predicted = cm.sum(axis=0).astype(np.float64)
    present = (support + predicted) > 0          # the classes sklearn's averages run over

    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, support + predicted)

    weights = support / support.sum()
    out = {
        "acc": tp.sum() / total,
        "f1": f1[present].mean(),
        "precision": precision[present].mean(),
        "recall": recall[present].mean(),
        "weighted_f1": (f1 * weights).sum(),
        "weighted_precision": (precision * weights).sum(),
    }
    return {k: round(float(v) * 100, 2) for k, v in out.items()}


def save_confusion_png(cm, label_names, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Write the confusion matrix as a PNG: rows true, columns predicted, counts in cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = cm.shape[0]
    if cm.shape != (n, n) or len(label_names) != n:
        raise ValueError(f"confusion matrix of shape {cm.shape} does not fit "
                         f"{len(label_names)} label names")
    size = max(5.0, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        ax.imshow(cm, cmap="Blues", interpolation="nearest")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(label_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticklabels(label_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title)
        threshold = cm.max() / 2 if cm.size and cm.max() > 0 else 0
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > threshold else "black")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
