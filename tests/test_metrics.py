"""The benchmark metrics against scikit-learn's, which the MIntRec code calls."""
import numpy as np
import pytest
import torch

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from mvcl_fast.metrics import classification_metrics, confusion_matrix, save_confusion_png  # noqa: E402


def sklearn_reference(y_true, y_pred):
    m = sklearn_metrics
    raw = {
        "acc": m.accuracy_score(y_true, y_pred),
        "f1": m.f1_score(y_true, y_pred, average="macro", zero_division=0),
        "precision": m.precision_score(y_true, y_pred, average="macro", zero_division=0),
        "recall": m.recall_score(y_true, y_pred, average="macro", zero_division=0),
        "weighted_f1": m.f1_score(y_true, y_pred, average="weighted", zero_division=0),
        "weighted_precision": m.precision_score(y_true, y_pred, average="weighted", zero_division=0),
    }
    return {k: round(float(v) * 100, 2) for k, v in raw.items()}


CASES = [
    # (num_classes, n, true classes drawn from, predicted classes drawn from)
    (20, 400, 20, 20),
    (20, 37, 20, 20),       # many classes absent from both
    (31, 250, 12, 31),      # predictions of classes that never occur
    (31, 250, 31, 5),       # true classes never predicted
    (2, 9, 2, 2),
    (7, 1, 7, 7),
]


@pytest.mark.parametrize("num_classes,n,true_from,pred_from", CASES)
@pytest.mark.parametrize("trial", range(3))
def test_metrics_equal_sklearn(num_classes, n, true_from, pred_from, trial):
    rng = np.random.default_rng([num_classes, n, true_from, pred_from, trial])
    y_true = rng.integers(0, true_from, n)
    # Mostly right, so the scores are not all near chance.
    y_pred = np.where(rng.random(n) < 0.6, np.minimum(y_true, pred_from - 1), rng.integers(0, pred_from, n))
    got = classification_metrics(y_true, y_pred, num_classes)
    assert got == sklearn_reference(y_true, y_pred)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, num_classes),
                                  sklearn_metrics.confusion_matrix(y_true, y_pred,
                                                                   labels=range(num_classes)))


def test_metrics_accept_tensors_and_lists():
    y_true = torch.tensor([0, 1, 2, 2, 1])
    y_pred = torch.tensor([0, 2, 2, 2, 1])
    a = classification_metrics(y_true, y_pred, 3)
    assert a == classification_metrics(y_true.tolist(), y_pred.tolist(), 3)
    assert set(a) == {"acc", "f1", "precision", "recall", "weighted_f1", "weighted_precision"}
    assert a["acc"] == 80.0


def test_perfect_predictions_score_100():
    y = np.arange(20).repeat(3)
    assert set(classification_metrics(y, y, 20).values()) == {100.0}


@pytest.mark.parametrize("y_true,y_pred,num_classes,match", [
    ([0, 1], [0, 3], 3, "y_pred.*outside"),
    ([0, -1], [0, 1], 3, "y_true.*outside"),
    ([0, 1, 2], [0, 1], 3, "differ in length"),
    ([], [], 3, "at least one"),
    ([[0, 1]], [[0, 1]], 3, "1-D"),
])
def test_bad_inputs_raise(y_true, y_pred, num_classes, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, y_pred, num_classes)


def test_save_confusion_png(tmp_path):
    names = ["Complain", "Praise", "Ask for help", "Inform"]
    cm = confusion_matrix([0, 1, 2, 3, 3, 2], [0, 1, 2, 3, 2, 2], 4)
    path = tmp_path / "cm.png"
    save_confusion_png(cm, names, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="label names"):
        save_confusion_png(cm, names[:3], tmp_path / "bad.png")
