"""Classification metrics as the MIntRec benchmarks report them, computed by scikit-learn.

Accuracy, macro F1 / precision / recall, weighted F1 / precision, x100 and
rounded to 2 decimals, through the calls the benchmarks' own code makes
(TCL-MAP, MVCL-DAF, MIntRec: ``accuracy_score``, ``precision_recall_fscore_support``
with scikit-learn's defaults: the averages run over the classes that occur in
y_true or y_pred, a 0/0 precision or recall counts as 0). What scikit-learn
lacks lives here: the checks on the class ids, per-class figures keyed by
intent name, and the head / middle / tail breakdown by training frequency
(the paper's claim is about the rare classes).
"""
from __future__ import annotations

import os

import numpy as np
from sklearn import metrics as skm

GROUPS = ("head", "middle", "tail")
# The benchmark's figures: metric key, column title.
METRIC_COLUMNS = (("acc", "ACC"), ("f1", "macro F1"), ("precision", "macro P"),
                  ("recall", "macro R"), ("weighted_f1", "weighted F1"),
                  ("weighted_precision", "weighted P"))
GROUP_COLUMNS = (("classes", "intents"), ("support", "utterances"), ("acc", "ACC"),
                 ("f1", "macro F1"), ("precision", "macro P"), ("recall", "macro R"))


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


def _checked(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t = _as_labels("y_true", y_true, num_classes)
    p = _as_labels("y_pred", y_pred, num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if not t.size:
        raise ValueError("the metrics need at least one prediction")
    return t, p


def _percent(value) -> float:
    return round(float(value) * 100, 2)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] int64 counts; rows are true classes, columns predicted."""
    t = _as_labels("y_true", y_true, num_classes)
    p = _as_labels("y_pred", y_pred, num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return skm.confusion_matrix(t, p, labels=np.arange(num_classes)).astype(np.int64)


def classification_metrics(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """acc, f1, precision, recall (macro), weighted_f1, weighted_precision; x100, 2 decimals."""
    t, p = _checked(y_true, y_pred, num_classes)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(t, p, average="macro",
                                                                   zero_division=0)
    w_precision, _, w_f1, _ = skm.precision_recall_fscore_support(t, p, average="weighted",
                                                                  zero_division=0)
    out = {"acc": skm.accuracy_score(t, p), "f1": f1, "precision": precision, "recall": recall,
           "weighted_f1": w_f1, "weighted_precision": w_precision}
    return {k: _percent(v) for k, v in out.items()}


def per_class_metrics(y_true, y_pred, label_names) -> dict[str, dict]:
    """{intent: {precision, recall, f1 (x100), support}} for every class, in label order."""
    t, p = _checked(y_true, y_pred, len(label_names))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        t, p, labels=np.arange(len(label_names)), average=None, zero_division=0)
    return {name: {"precision": _percent(precision[i]), "recall": _percent(recall[i]),
                   "f1": _percent(f1[i]), "support": int(support[i])}
            for i, name in enumerate(label_names)}


def frequency_groups(train_counts) -> dict[str, list[int]]:
    """The classes in thirds by training frequency (utterances per class): head (the most
    frequent) / middle / tail. Ties keep the label order; with fewer than 3 classes a group is empty.
    """
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    return {name: part.tolist() for name, part in zip(GROUPS, np.array_split(order, len(GROUPS)))}


def group_metrics(y_true, y_pred, groups: dict[str, list[int]], num_classes: int) -> dict[str, dict]:
    """Per group: acc over its utterances, macro P / R / F1 over its classes, its support."""
    t, p = _checked(y_true, y_pred, num_classes)
    out = {}
    for name, classes in groups.items():
        if not classes:
            continue
        mine = np.isin(t, classes)
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            t, p, labels=classes, average="macro", zero_division=0)
        out[name] = {"acc": _percent(np.mean(t[mine] == p[mine])) if mine.any() else 0.0,
                     "f1": _percent(f1), "precision": _percent(precision),
                     "recall": _percent(recall), "support": int(mine.sum()),
                     "classes": len(classes)}
    return out


def breakdown(y_true, y_pred, label_names, train_counts) -> dict:
    """Per-intent figures, and the head / middle / tail groups by training frequency."""
    groups = frequency_groups(train_counts)
    return {"per_class": per_class_metrics(y_true, y_pred, label_names),
            "groups": group_metrics(y_true, y_pred, groups, len(label_names)),
            "group_intents": {name: [label_names[c] for c in classes]
                              for name, classes in groups.items()}}


def format_table(rows: dict[str, dict], columns=METRIC_COLUMNS) -> str:
    """A plain-text table: one row per name; a cell is a number or a string (e.g. "73.1 +- 0.4")."""
    heads = ["", *(title for _, title in columns)]
    cell = lambda v: v if isinstance(v, str) else str(v) if isinstance(v, int) else f"{v:.2f}"  # noqa: E731
    body = [[name, *(cell(row[key]) for key, _ in columns)] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [heads, *body]) for i in range(len(heads))]
    line = lambda row: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                 for i, (v, w) in enumerate(zip(row, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(heads), rule, *map(line, body)])


def seed_summary(results: dict[int, dict]) -> dict:
    """Mean and sample standard deviation over the seeds' metrics.json of every figure: test,
    dev, test_without_*, and per group and per intent (sections "test_groups/head", ...)."""
    def sections(metrics: dict) -> dict[str, dict]:
        out = {key: metrics[key] for key in metrics
               if key in ("test", "dev") or key.startswith("test_without_")}
        for key in ("test_groups", "test_per_class"):
            out.update({f"{key}/{name}": row for name, row in metrics[key].items()})
        return out

    per_seed = {seed: sections(metrics) for seed, metrics in results.items()}
    first = next(iter(per_seed.values()))
    summary = {}
    for section, row in first.items():
        summary[section] = {}
        for key in row:
            values = np.array([per_seed[seed][section][key] for seed in per_seed], dtype=np.float64)
            summary[section][key] = {"mean": round(float(values.mean()), 2),
                                     "std": round(float(values.std(ddof=1)), 2),
                                     "values": values.tolist()}
    return {"seeds": list(results), "std": "sample standard deviation (ddof=1)", "metrics": summary}


def seed_table(summary: dict) -> str:
    """The summary as a table of "mean +- std" cells: test, dev, the blanked-modality tests, groups."""
    metrics = summary["metrics"]
    cells = lambda section, columns: {key: f"{metrics[section][key]['mean']:.2f} +- "  # noqa: E731
                                           f"{metrics[section][key]['std']:.2f}" for key, _ in columns}
    main = [s for s in metrics if "/" not in s]
    groups = [s for s in metrics if s.startswith("test_groups/")]
    return (format_table({s.replace("_", " "): cells(s, METRIC_COLUMNS) for s in main})
            + "\n\ntest by training frequency (intents in thirds):\n"
            + format_table({s.split("/")[1]: cells(s, GROUP_COLUMNS[2:]) for s in groups},
                           GROUP_COLUMNS[2:]))


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
        skm.ConfusionMatrixDisplay(cm, display_labels=list(label_names)).plot(
            ax=ax, cmap="Blues", xticks_rotation=60, colorbar=False, values_format="d")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
