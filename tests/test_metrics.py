"""The benchmark metrics against scikit-learn's, which the MIntRec code calls."""
import numpy as np
import pytest
import torch

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from mvcl_fast.intent.metrics import classification_metrics, confusion_matrix, save_confusion_png  # noqa: E402


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


def test_per_class_metrics_are_sklearns_classification_report():
    from mvcl_fast.intent.metrics import per_class_metrics

    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.5, y_true, rng.integers(0, 6, 200))
    names = ["Complain", "Praise", "Apologise", "Thank", "Criticize", "Care"]   # Care: never true
    got = per_class_metrics(y_true, y_pred, names)
    report = sklearn_metrics.classification_report(y_true, y_pred, labels=range(6), output_dict=True,
                                                   zero_division=0)
    assert list(got) == names
    for i, name in enumerate(names):
        want = report[str(i)]
        assert got[name] == {"precision": round(want["precision"] * 100, 2),
                             "recall": round(want["recall"] * 100, 2),
                             "f1": round(want["f1-score"] * 100, 2), "support": int(want["support"])}
    assert got["Care"]["support"] == 0


def test_frequency_groups_split_the_classes_in_thirds_by_training_count():
    from mvcl_fast.intent.metrics import frequency_groups

    counts = [5, 50, 1, 20, 20, 3, 9]
    assert frequency_groups(counts) == {"head": [1, 3, 4], "middle": [6, 0], "tail": [5, 2]}
    assert frequency_groups([4, 4]) == {"head": [0], "middle": [1], "tail": []}


def test_group_metrics_are_macro_over_the_groups_classes():
    from mvcl_fast.intent.metrics import group_metrics

    y_true = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    y_pred = np.array([0, 0, 1, 1, 1, 3, 3, 0])
    got = group_metrics(y_true, y_pred, {"head": [0, 1], "tail": [2, 3], "empty": []}, 4)
    assert set(got) == {"head", "tail"}
    want = sklearn_metrics.f1_score(y_true, y_pred, labels=[2, 3], average="macro", zero_division=0)
    assert got["tail"]["f1"] == round(want * 100, 2)
    assert got["tail"]["acc"] == round(100 / 3, 2) and got["tail"]["support"] == 3
    assert got["head"]["acc"] == 80.0 and got["head"]["classes"] == 2


def test_seed_summary_is_mean_and_sample_std():
    from mvcl_fast.intent.metrics import seed_summary, seed_table

    def run(acc):
        row = {"acc": acc, "f1": acc - 1, "precision": acc, "recall": acc, "weighted_f1": acc,
               "weighted_precision": acc}
        group = {"acc": acc, "f1": acc, "precision": acc, "recall": acc, "support": 3, "classes": 1}
        return {"test": row, "dev": row, "test_without_video": row,
                "test_groups": {"head": group}, "test_per_class": {"Praise": {"f1": acc, "support": 3}}}

    summary = seed_summary({0: run(70.0), 1: run(72.0), 2: run(77.0)})
    assert summary["seeds"] == [0, 1, 2]
    acc = summary["metrics"]["test"]["acc"]
    assert acc == {"mean": 73.0, "std": round(float(np.std([70, 72, 77], ddof=1)), 2),
                   "values": [70.0, 72.0, 77.0]}
    assert summary["metrics"]["test_per_class/Praise"]["f1"]["mean"] == 73.0
    table = seed_table(summary)
    assert "test without video" in table and "73.00 +- 3.61" in table and "head" in table
