"""The open-intent protocol of MIntRec2.0 (``python -m mvcl_fast.train --open-intent``).

As thuiar/MIntRec2.0 runs it (single turn; ``data/single_turn/base.py``
``prepare_data``, ``methods/single_turn/MAG_BERT/manager_ood.py``,
``utils/metrics.py``, ``configs/single_turn/mag_bert_ood.py``):

- Data: the release's ``out-of-scope/MIntRec2.0-OOD/{train,dev,test}.tsv``
  (every row labelled UNK, its own ``video_data/`` and ``audio_data/``
  pickles) beside ``in-scope/``. Out-of-scope (OOS) rows are class 30, the
  benchmark's ``ood_label_id = len(intent_labels)``; the model keeps its 30
  logits.
- Training: the in-scope losses see only in-scope rows; each step also runs a
  batch of OOS training rows (a loader of its own, cycled: ``zip(train,
  cycle(ood_train))``) through the model and adds the outlier-exposure term
  ``-log_softmax(logits).mean()`` (their predicted distribution pushed towards
  uniform), weighted --ood-weight (the benchmark adds it with weight 1). The
  epoch is still picked on the in-scope dev split (the benchmark's
  ``eval_score = acc`` of ``eval_dataloader``).
- DOC after training, with the best model: per intent c, the sigmoid scores
  ``sigmoid(logit_c)`` of the training rows of c, mirrored about 1 (``p`` and
  ``2 - p``) and fitted by a Gaussian (``scipy.stats.norm.fit``: mean 1, the
  maximum-likelihood sigma_c); threshold ``t_c = max(0.5, 1 - scale * sigma_c)``,
  scale 1. A clip goes to its argmax intent c if ``sigmoid(logit_c) > t_c``,
  else to UNK. The thresholds are stored in best.pt (field ``open_intent``);
  ``mvcl_fast.predict`` labels clips with them.
- Figures on dev and test (in-scope rows + OOS rows): the benchmark's
  ``OID_Metrics`` -- 31-way accuracy (``oid_acc``), F1-known (the mean F1 of the
  known intents), F1-open (the F1 of UNK), F1 (``oid_f1``: the mean over all
  31 classes) -- and its ``OOD_Metrics`` -- AUROC, AUPR-In, AUPR-Out, FPR95 --
  of the open-intent score, DOC's confidence ``max_c sigmoid(logit_c)``, with
  in-scope as the positive class (the benchmark defines these but the MAG-BERT
  manager does not call them; the score is this package's choice). The
  in-scope 30-way figures stay those of the in-scope rows alone, by argmax (the
  benchmark's ``test_ind``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mvcl_fast.intent.data import OOS_LABEL, MultimodalDataset, collate
from mvcl_fast.intent.errors import CheckpointError
from mvcl_fast.intent.metrics import _percent

# The benchmark's outlier-exposure weight (loss = id_loss + ood_loss) and DOC scale
# (configs/single_turn/mag_bert_ood.py: 'scale': [1]).
OE_WEIGHT = 1.0
DOC_SCALE = 1.0
DOC_FLOOR = 0.5
# best.pt's field with the DOC thresholds of a --open-intent run.
CHECKPOINT_FIELD = "open_intent"
# The out-of-scope splits' names among the trainer's splits.
OOS_PREFIX = "oos_"
# The figures: metric key, column title.
OPEN_COLUMNS = (("acc", "ACC (31-way)"), ("f1_known", "F1-known"), ("f1_open", "F1-open"),
                ("f1_known_open", "mean(F1-known, F1-open)"), ("f1", "F1 (31-way)"), ("auroc", "AUROC"), ("aupr_in", "AUPR-In"),
                ("aupr_out", "AUPR-Out"), ("fpr95", "FPR95"))


# ------------------------------------------------------------------ training
def outlier_exposure_loss(logits: torch.Tensor) -> torch.Tensor:
    """The benchmark's outlier-exposure term of OOS rows' logits [B, C]: the cross-entropy of
    their softmax against the uniform distribution, averaged (``-log_softmax(...).mean()`` over
    rows and classes; its row-max shift does not change log_softmax)."""
    return -F.log_softmax(logits.float(), dim=-1).mean()


class StepBatches(torch.utils.data.Sampler):
    """Batches of ``size`` row ids of an n-row split for the global steps start, start + 1, ...
    (endless): step g's batch on rank r of w is items [(g w + r) size, (g w + r + 1) size) of
    the stream perm_0 perm_1 ..., perm_p a permutation of the rows drawn from (seed, p). A
    function of the step, so a resumed run draws what an uninterrupted one would; every batch
    has ``size`` rows (static shapes), however few the rows."""

    def __init__(self, n: int, size: int, seed: int, start: int, world_size: int = 1, rank: int = 0):
        self.n, self.size, self.seed, self.start = n, size, seed, start
        self.world_size, self.rank = world_size, rank
        self._perms: dict[int, np.ndarray] = {}

    def _row(self, item: int) -> int:
        p, i = divmod(item, self.n)
        if p not in self._perms:
            self._perms = {p: np.random.default_rng([self.seed, p]).permutation(self.n)}
        return int(self._perms[p][i])

    def __iter__(self):
        step = self.start
        while True:
            first = (step * self.world_size + self.rank) * self.size
            yield [self._row(item) for item in range(first, first + self.size)]
            step += 1


class OutlierExposure:
    """--open-intent's OOS rows: a batch of --batch-size OOS training rows per step, which the
    training step (mvcl_fast.intent.step.TrainingStep, ood_weight) runs through the model for
    its outlier-exposure term, the loss part 'oe'. The in-scope losses never see these rows."""

    def __init__(self, trainer):
        self.split = trainer.splits[OOS_PREFIX + "train"]
        self.trainer = trainer
        self._batches, self._next_step = None, None

    def _batch(self, step: int) -> dict:
        if step != self._next_step:   # the first step of this process (a fresh or resumed run)
            t = self.trainer
            sampler = StepBatches(len(self.split), t.args.batch_size, t.args.seed, step,
                                  t.dist.world_size, t.dist.rank)
            # A generator of its own: a DataLoader's iterator otherwise draws its workers' base
            # seed from the global RNG, which a resumed run would then be one draw ahead on.
            self._batches = iter(torch.utils.data.DataLoader(
                MultimodalDataset(self.split.split), batch_sampler=sampler, collate_fn=collate,
                num_workers=t.args.num_workers, pin_memory=t.device.type == "cuda",
                generator=torch.Generator().manual_seed(t.args.seed)))
        self._next_step = step + 1
        return next(self._batches)

    def inputs(self, step: int) -> dict:
        """The model's inputs of global step ``step``'s OOS rows on the device, each key prefixed
        OOS_PREFIX (the training step's own inputs beside them); no host sync."""
        from mvcl_fast.intent.loading import model_inputs

        t = self.trainer
        inputs = model_inputs(self.split.tokens, self._batch(step), t.cfg.modalities, t.device)
        return {OOS_PREFIX + name: value for name, value in inputs.items()}


# ----------------------------------------------------------------------- DOC
def doc_thresholds(logits, labels, num_labels: int, scale: float = DOC_SCALE) -> np.ndarray:
    """DOC's threshold per intent [num_labels] from the training rows' logits [N, C] and labels:
    t_c = max(0.5, 1 - scale * sigma_c), sigma_c the maximum-likelihood standard deviation of
    the rows of c's sigmoid(logit_c) mirrored about 1 (what norm.fit of p and 2 - p gives: mean
    1, sigma = sqrt(mean((1 - p)^2))). An intent without training rows keeps the floor 0.5."""
    probs = torch.sigmoid(torch.as_tensor(logits).double()).numpy()
    labels = np.asarray(labels)
    thresholds = np.full(num_labels, DOC_FLOOR)
    for c in range(num_labels):
        p = probs[labels == c, c]
        if p.size:
            sigma = np.sqrt(np.mean((1.0 - p) ** 2))
            thresholds[c] = max(DOC_FLOOR, 1.0 - scale * sigma)
    return thresholds


def doc_predict(logits, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(the classes, DOC's confidence max_c sigmoid(logit_c)) of logits [N, C]: the argmax
    intent where its sigmoid score exceeds its threshold, else C (UNK)."""
    probs = torch.sigmoid(torch.as_tensor(logits).double()).numpy()
    best = probs.argmax(axis=1)
    score = probs[np.arange(len(best)), best]
    thresholds = np.asarray(thresholds)
    return np.where(score > thresholds[best], best, probs.shape[1]), score


# ------------------------------------------------------------------- metrics
def open_intent_metrics(y_true, y_pred, score, num_labels: int) -> dict[str, float]:
    """The benchmark's figures (x100, 2 decimals) of labels in [0, num_labels], num_labels = UNK:
    acc (31-way), f1_known, f1_open, f1 (as OID_Metrics: per-class F1 over the classes in y_true
    or y_pred, F1-known their mean without UNK, f1 the mean with it), f1_known_open (the mean of
    F1-known and F1-open, which weighs the open class as much as all known ones), and, of score (high = in
    scope; in-scope rows the positives, as OOD_Metrics), auroc, aupr_in, aupr_out (of 1 - score)
    and fpr95 (the share of OOS rows at or above the score that keeps 95% of in-scope rows)."""
    from sklearn import metrics as skm

    y_true, y_pred, score = np.asarray(y_true), np.asarray(y_pred), np.asarray(score, np.float64)
    oos = num_labels
    known = sorted((set(y_true.tolist()) | set(y_pred.tolist())) - {oos})
    f1 = skm.f1_score(y_true, y_pred, labels=[*known, oos], average=None, zero_division=0)
    in_scope = (y_true != oos).astype(np.int64)
    fpr, tpr, _ = skm.roc_curve(in_scope, score, drop_intermediate=False)
    precision_in, recall_in, _ = skm.precision_recall_curve(in_scope, score)
    precision_out, recall_out, _ = skm.precision_recall_curve(1 - in_scope, 1 - score)
    out = {"acc": skm.accuracy_score(y_true, y_pred),
           "f1_known": np.mean(f1[:-1]) if known else 0.0, "f1_open": f1[-1], "f1": np.mean(f1),
           "f1_known_open": ((np.mean(f1[:-1]) if known else 0.0) + f1[-1]) / 2,
           "auroc": skm.auc(fpr, tpr), "aupr_in": skm.auc(recall_in, precision_in),
           "aupr_out": skm.auc(recall_out, precision_out),
           "fpr95": fpr[np.argmax(tpr >= 0.95)]}
    return {k: _percent(v) for k, v in out.items()}


def evaluate_open(logits_in, labels_in, logits_oos, thresholds) -> tuple[dict, np.ndarray]:
    """(the figures, DOC's predictions) of a split's in-scope rows followed by its OOS rows."""
    logits = torch.cat([torch.as_tensor(logits_in), torch.as_tensor(logits_oos)])
    num_labels = logits.shape[1]
    y_true = np.concatenate([np.asarray(labels_in), np.full(len(logits_oos), num_labels)])
    y_pred, score = doc_predict(logits, thresholds)
    return open_intent_metrics(y_true, y_pred, score, num_labels), y_pred


# ------------------------------------------------------------- checkpoints
def saved_thresholds(state: dict, path, label_names) -> Optional[list[float]]:
    """The DOC thresholds a checkpoint holds (None: not a --open-intent model, or one whose run
    did not finish), checked: one number in [0.5, 1] per intent."""
    saved = state.get(CHECKPOINT_FIELD)
    if saved is None:
        return None
    thresholds = saved.get("thresholds") if isinstance(saved, dict) else None
    if (not isinstance(thresholds, list) or len(thresholds) != len(label_names)
            or not all(isinstance(t, float) and DOC_FLOOR <= t <= 1 for t in thresholds)):
        raise CheckpointError(f"{path}: field {CHECKPOINT_FIELD!r} does not hold one DOC threshold "
                              f"in [{DOC_FLOOR}, 1] per intent ({len(label_names)})",
                              "pass the best.pt of a mvcl_fast.train --open-intent run, unchanged")
    return thresholds


def save_thresholds(trainer, thresholds: np.ndarray) -> None:
    """Add the DOC thresholds to the run's best.pt (rank 0 writes, every rank waits)."""
    from mvcl_fast.intent.checkpoints import BEST_CHECKPOINT, load_checkpoint

    if trainer.dist.is_main:
        state = load_checkpoint(trainer.output_dir / BEST_CHECKPOINT)
        state[CHECKPOINT_FIELD] = {"thresholds": [float(t) for t in thresholds], "scale": DOC_SCALE,
                                   "oos_label": OOS_LABEL}
        trainer.folder.replace(BEST_CHECKPOINT, lambda file: torch.save(state, file))
    trainer.dist.barrier()


# -------------------------------------------------------------- the report
def report(trainer, logits: dict[str, torch.Tensor]) -> dict:
    """After training, trainer.model the best dev epoch's: DOC thresholds fitted on the in-scope
    training split (into best.pt), then dev and test in the open-intent protocol. logits: the
    in-scope dev and test logits, already computed for the in-scope figures. Returns
    metrics.json's entries: dev_open, test_open, doc_thresholds."""
    splits = trainer.splits
    thresholds = doc_thresholds(trainer.split_logits("train"), splits["train"].split.labels.numpy(),
                                trainer.cfg.num_labels)
    save_thresholds(trainer, thresholds)
    results = {}
    for name in ("dev", "test"):
        results[f"{name}_open"], _ = evaluate_open(logits[name], splits[name].split.labels.numpy(),
                                                   trainer.split_logits(OOS_PREFIX + name), thresholds)
        results[f"{name}_open"]["utterances"] = len(splits[name]) + len(splits[OOS_PREFIX + name])
    results["doc_thresholds"] = {name: round(float(t), 4)
                                 for name, t in zip(trainer.label_names, thresholds)}
    return results
