"""MIntRec2.0: the 30-way in-scope task and the open-intent protocol (--open-intent).

The formulas are checked against the benchmark's own code (thuiar/MIntRec2.0,
methods/single_turn/MAG_BERT/manager_ood.py and utils/metrics.py), copied here
as the reference; the runs are tiny (a random 2-layer BERT, a few steps) on the
synthetic set in the release layout.
"""
from __future__ import annotations

import csv
import json
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from sklearn.metrics import accuracy_score, auc, confusion_matrix, precision_recall_curve, roc_curve

from mvcl_fast.intent import open_intent
from mvcl_fast.intent import predict as predict_lib
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent import trainer as trainer_lib
from mvcl_fast.intent.data import DATASETS
from mvcl_fast.intent.errors import CheckpointError
from mvcl_fast.intent.loading import dataset_of, load_model
from mvcl_fast.intent.synthetic import TINY2, ensure_synthetic
from test_model import make_tiny_bert

LABELS = DATASETS["mintrec2"].labels


# ------------------------------------------------- the benchmark's code, as reference
def benchmark_doc(train_logits, train_labels, test_logits, num_labels, scale=1.0):
    """manager_ood.py: cal_mu_std (fit of the mirrored sigmoid scores) and classify_doc."""
    y_prob = torch.sigmoid(torch.as_tensor(train_logits)).numpy()
    mu_stds = []
    for i in range(num_labels):
        p = y_prob[train_labels == i, i]
        mu_stds.append(norm.fit([*p, *(2 - p)]))
    preds = []
    for p in torch.sigmoid(torch.as_tensor(test_logits)).numpy():
        c = np.argmax(p)
        preds.append(c if np.max(p) > max(0.5, 1 - scale * mu_stds[c][1]) else num_labels)
    return [max(0.5, 1 - scale * s) for _, s in mu_stds], np.array(preds)


def benchmark_oid(y_true, y_pred):
    """utils/metrics.py OID_Metrics: oid_acc, f1-known, f1-open, oid_f1 (unrounded)."""
    cm = confusion_matrix(y_true, y_pred)
    fs = []
    for i in range(cm.shape[0]):
        r = cm[i][i] / cm[i].sum() if cm[i].sum() else 0
        p = cm[i][i] / cm[:, i].sum() if cm[:, i].sum() else 0
        fs.append(2 * r * p / (r + p) if r + p else 0)
    return accuracy_score(y_true, y_pred), np.mean(fs[:-1]), fs[-1], np.mean(fs)


def benchmark_ood(conf, label):
    """utils/metrics.py OOD_Metrics: _auc and _fpr_recall (label 1: in scope)."""
    fpr, tpr, _ = roc_curve(label, conf)
    p_in, r_in, _ = precision_recall_curve(label, conf)
    p_out, r_out, _ = precision_recall_curve(1 - label, 1 - conf)
    order = np.argsort(conf)[::-1]
    y, positives, fp, tp = label[order], label.sum(), 0, 0
    for i in range(len(y)):
        fp, tp = fp + (y[i] == 0), tp + (y[i] == 1)
        if tp / positives >= 0.95:
            break
    return auc(fpr, tpr), auc(r_in, p_in), auc(r_out, p_out), fp / (len(y) - positives)


# ------------------------------------------------------------------- formulas
def test_outlier_exposure_is_the_benchmarks_term():
    logits = torch.randn(6, 30) * 3
    smax_oe = F.log_softmax(logits - torch.max(logits, dim=1, keepdim=True)[0], dim=1)
    torch.testing.assert_close(open_intent.outlier_exposure_loss(logits), -1 * smax_oe.mean())
    # its minimum: the uniform distribution, log C
    assert open_intent.outlier_exposure_loss(torch.zeros(2, 30)).item() == pytest.approx(np.log(30))


def test_doc_thresholds_and_predictions_match_the_benchmark():
    rng = np.random.default_rng(0)
    num_labels = 5
    train_labels = rng.integers(num_labels, size=200)
    train_logits = rng.normal(size=(200, num_labels)) + 4 * np.eye(num_labels)[train_labels]
    test_logits = rng.normal(size=(300, num_labels)) * 2
    thresholds = open_intent.doc_thresholds(train_logits, train_labels, num_labels)
    ref_thresholds, ref_pred = benchmark_doc(train_logits, train_labels, test_logits, num_labels)
    np.testing.assert_allclose(thresholds, ref_thresholds, rtol=1e-6)
    assert 0.5 < thresholds.min() < 1 and (thresholds >= 0.5).all()
    pred, score = open_intent.doc_predict(test_logits, thresholds)
    np.testing.assert_array_equal(pred, ref_pred)
    assert 0 < (pred == num_labels).mean() < 1
    np.testing.assert_allclose(score, torch.sigmoid(torch.tensor(test_logits)).max(1).values.numpy())
    # an intent without training rows keeps the floor
    assert open_intent.doc_thresholds(train_logits[train_labels != 2], train_labels[train_labels != 2],
                                      num_labels)[2] == 0.5


def test_open_intent_metrics_match_the_benchmark():
    rng = np.random.default_rng(1)
    num_labels = 6
    y_true = np.concatenate([rng.integers(num_labels, size=150), np.full(80, num_labels)])
    y_pred = np.where(rng.random(230) < 0.6, y_true, rng.integers(num_labels + 1, size=230))
    score = np.clip(0.6 * (y_true != num_labels) + rng.normal(0.2, 0.25, 230), 0, 1)
    got = open_intent.open_intent_metrics(y_true, y_pred, score, num_labels)
    acc, f1_known, f1_open, f1 = benchmark_oid(y_true, y_pred)
    auroc, aupr_in, aupr_out, fpr95 = benchmark_ood(score, (y_true != num_labels).astype(int))
    expected = {"acc": acc, "f1_known": f1_known, "f1_open": f1_open, "f1": f1,
                "f1_known_open": (f1_known + f1_open) / 2, "auroc": auroc,
                "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr95": fpr95}
    assert got == {k: round(float(v) * 100, 2) for k, v in expected.items()}
    assert 50 < got["auroc"] < 100 and 0 < got["fpr95"] < 100


def test_step_batches_are_a_function_of_the_step():
    whole = open_intent.StepBatches(n=7, size=3, seed=4, start=0)
    first = [b for _, b in zip(range(6), whole)]
    assert all(len(b) == 3 for b in first)                        # static shape, n not a multiple
    assert sorted(sum(first[:2], []) + first[2][:1]) == list(range(7))   # a permutation per pass
    resumed = open_intent.StepBatches(n=7, size=3, seed=4, start=4)
    assert [b for _, b in zip(range(2), resumed)] == first[4:]
    ranks = [next(iter(open_intent.StepBatches(7, 3, 4, start=1, world_size=2, rank=r))) for r in (0, 1)]
    assert ranks == first[2:4]


def test_an_old_31_label_mintrec2_checkpoint_is_refused(tmp_path):
    assert dataset_of(list(LABELS), tmp_path) == "mintrec2" and len(LABELS) == 30
    with pytest.raises(CheckpointError, match="a logit for UNK besides its 30 intents") as info:
        dataset_of([*LABELS, "UNK"], tmp_path / "best.pt")
    assert "--open-intent" in info.value.hint


# ----------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    data_dir = ensure_synthetic(tmp_path_factory.mktemp("data"), "mintrec2", **TINY2)
    return str(data_dir), make_tiny_bert(tmp_path_factory.mktemp("bert"))


def run_argv(release, out_dir, *extra):
    data_dir, bert = release
    return ["--dataset", "mintrec2", "--data-dir", data_dir, "--text-model", bert,
            "--output-dir", str(out_dir), "--batch-size", "16", "--epochs", "1", "--max-steps", "2",
            "--video-width", "16", "--video-layers", "1", "--audio-width", "16",
            "--fusion-heads", "4", "--compile", "off", *extra]


@pytest.fixture(scope="module")
def open_run(release, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("open")
    assert train_lib.main(run_argv(release, out_dir, "--open-intent", "--ood-weight", "0.5")) == 0
    return out_dir


def test_open_intent_run_reports_the_benchmarks_figures(open_run, capsys):
    metrics = json.loads((open_run / "metrics.json").read_text())
    assert metrics["args"]["open_intent"] and metrics["args"]["ood_weight"] == 0.5
    assert all("train_oe" in epoch for epoch in metrics["history"])
    for split, n in (("dev", 20 + 10), ("test", 20 + 10)):
        figures = metrics[f"{split}_open"]
        assert figures["utterances"] == n
        assert set(figures) == {key for key, _ in open_intent.OPEN_COLUMNS} | {"utterances"}
        assert all(0 <= figures[key] <= 100 for key, _ in open_intent.OPEN_COLUMNS)
    assert list(metrics["doc_thresholds"]) == list(LABELS)
    # the model and the in-scope figures stay 30-way (tests/test_train.py: without --open-intent)
    assert load_model(open_run).model.classifier.out_features == 30
    assert metrics["labels"] == list(LABELS) and list(metrics["test_per_class"]) == list(LABELS)
    assert sum(g["classes"] for g in metrics["test_groups"].values()) == 30
    assert np.shape(metrics["confusion_matrix"]) == (30, 30)
    best = torch.load(open_run / "best.pt", map_location="cpu", weights_only=True)
    thresholds = best["open_intent"]["thresholds"]
    assert len(thresholds) == 30 and all(0.5 <= t <= 1 for t in thresholds)
    log = (open_run / "train.log").read_text()
    assert "open intent (in-scope and out-of-scope utterances" in log and "F1-open" in log


def test_open_intent_run_resumes_exactly(open_run, release, tmp_path, monkeypatch):
    """The out-of-scope batches are a function of the step: a run cut after step 1 and resumed
    ends with the uninterrupted run's weights, history, thresholds and figures."""
    real_step = trainer_lib.Trainer.train_step

    def step_then_ctrl_c(self, batch):
        stats = real_step(self, batch)
        signal.raise_signal(signal.SIGINT)
        return stats

    cut_dir = tmp_path / "cut"
    monkeypatch.setattr(trainer_lib.Trainer, "train_step", step_then_ctrl_c)
    assert train_lib.main(run_argv(release, cut_dir, "--open-intent", "--ood-weight", "0.5")) == 130
    monkeypatch.setattr(trainer_lib.Trainer, "train_step", real_step)
    assert train_lib.main(["--resume", str(cut_dir)]) == 0
    full, resumed = (torch.load(d / "best.pt", map_location="cpu", weights_only=True)
                     for d in (open_run, cut_dir))
    assert all(torch.equal(value, resumed["model"][name]) for name, value in full["model"].items())
    assert full["open_intent"] == resumed["open_intent"]
    full, resumed = (json.loads((d / "metrics.json").read_text()) for d in (open_run, cut_dir))
    assert (full["history"], full["test_open"]) == (resumed["history"], resumed["test_open"])


def test_predict_labels_unk_with_the_runs_thresholds(open_run, release, tmp_path, capsys):
    data_dir, _ = release
    out_dir = tmp_path / "predict"
    assert predict_lib.main([str(open_run), "--data-dir", data_dir, "--output-dir", str(out_dir)]) == 0
    assert "AUROC" in capsys.readouterr().out
    with open(out_dir / "predictions.tsv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    assert len(rows) == 30 and [r["true"] for r in rows[20:]] == ["UNK"] * 10
    got = json.loads((out_dir / "prediction_metrics.json").read_text())
    reported = json.loads((open_run / "metrics.json").read_text())
    assert got["metrics"] == reported["test"]      # in-scope rows by argmax, as the run's
    assert got["open"] == {k: v for k, v in reported["test_open"].items() if k != "utterances"}
    acc = 100 * sum(r["predicted"] == r["true"] for r in rows) / len(rows)
    assert round(acc, 2) == got["open"]["acc"]
    # new clips (--input, labels not read): the same thresholds, the same labels
    clips = f"{data_dir}/out-of-scope/MIntRec2.0-OOD/test.tsv"
    assert predict_lib.main([str(open_run), "--input", clips, "--output-dir", str(tmp_path / "new")]) == 0
    with open(tmp_path / "new" / "predictions.tsv", newline="", encoding="utf-8") as file:
        new = list(csv.DictReader(file, delimiter="\t"))
    assert [r["predicted"] for r in new] == [r["predicted"] for r in rows[20:]]
    assert {r["true"] for r in new} == {""}


@pytest.mark.parametrize("extra,message", [
    (["--dataset", "mintrec", "--open-intent"], "--open-intent: the open-intent protocol is MIntRec2.0's"),
    (["--ood-weight", "2"], "--ood-weight weighs the outlier-exposure term of --open-intent"),
    (["--open-intent", "--ood-weight", "-1"], "--ood-weight"),
])
def test_option_rules(extra, message, capsys):
    with pytest.raises(SystemExit) as info:
        train_lib.main(["--dataset", "mintrec2", *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_open_intent_without_the_out_of_scope_folder_is_a_clear_error(release, tmp_path, capsys):
    data_dir, _ = release
    in_scope_only = tmp_path / "MIntRec2.0"
    in_scope_only.mkdir()
    (in_scope_only / "in-scope").symlink_to(f"{data_dir}/in-scope")
    assert train_lib.main(run_argv(release, tmp_path / "run", "--open-intent")[:2]
                          + ["--data-dir", str(in_scope_only)]
                          + run_argv(release, tmp_path / "run", "--open-intent")[4:]) == 1
    err = capsys.readouterr().err
    assert "no out-of-scope folder" in err and "MIntRec2.0-OOD" in err and "Traceback" not in err
