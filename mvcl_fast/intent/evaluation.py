"""Evaluation: the one loop that runs a model over a split, and the trainer's final report.

:func:`model_outputs` is the loop the trainer (dev after every epoch, dev and
test at the end), ``mvcl_fast.predict`` and ``mvcl_fast.analyze`` all run: the
label-prompt tokens and frames of each batch through the model in eval mode,
under the run's autocast precision, without gradients, in file order.
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Iterator, Optional

import numpy as np
import torch

from mvcl_fast.intent.checkpoints import BEST_CHECKPOINT
from mvcl_fast.intent.data import MultimodalSplit, data_loader
from mvcl_fast.intent.loading import LoadedModel, autocast, autocast_dtype, load_model, model_inputs


@torch.no_grad()
def model_outputs(model: torch.nn.Module, tokens: dict, loader, modalities, device: torch.device,
                  amp_dtype: Optional[torch.dtype], *, blank: Optional[str] = None,
                  progress: Optional[str] = None) -> Iterator[tuple[torch.Tensor, object]]:
    """(the batch's row indices, the model's ModelOutput on device) for each batch of loader.

    tokens: the split's label-prompt tokens (LabelPrompter.encode); blank: a modality blanked
    out of the inputs; progress: a tqdm bar's title (None: no bar). The caller's code runs
    outside the autocast region, in full precision.
    """
    from tqdm import tqdm

    model.eval()
    for batch in tqdm(loader, desc=progress, unit="batch", leave=False, dynamic_ncols=True,
                      disable=progress is None):
        with autocast(device, amp_dtype):
            out = model(**model_inputs(tokens, batch, modalities, device, blank=blank))
        yield batch["index"], out


def loaded_model_outputs(loaded: LoadedModel, split: MultimodalSplit, device: torch.device,
                         batch_size: int, precision: str = "auto",
                         progress: Optional[str] = None) -> Iterator:
    """A trained model's outputs (ModelOutput, on device) over a split read by read_split or
    read_clips, in file order, one batch at a time; precision: --precision."""
    from mvcl_fast.intent.model import LabelPrompter

    cfg = loaded.config
    tokens = LabelPrompter(loaded.tokenizer, loaded.label_names, cfg.max_text_tokens).encode(split.texts)
    for _, out in model_outputs(loaded.model, tokens, data_loader(split, batch_size), cfg.modalities,
                                device, autocast_dtype(precision, device), progress=progress):
        yield out


def split_logits(model: torch.nn.Module, tokens: dict, loader, modalities, device: torch.device,
                 amp_dtype: Optional[torch.dtype], dist, blank: Optional[str] = None) -> torch.Tensor:
    """The model's logits [N, num_labels] (fp32, CPU) over the whole split of loader, in file
    order: under DDP each rank runs its shard and the logits are gathered from every rank."""
    index, logits = [], []
    for rows, out in model_outputs(model, tokens, loader, modalities, device, amp_dtype, blank=blank):
        logits.append(out.logits.float().cpu())
        index.append(rows)
    shards = dist.gather((torch.cat(index), torch.cat(logits)))
    # The unshuffled sampler deals the split (padded with its first items) to the ranks in
    # turn: interleaving the shards restores file order, and the padding comes last.
    n = len(loader.dataset)
    index, logits = (torch.stack([shard[k] for shard in shards], dim=1).flatten(0, 1)[:n]
                     for k in (0, 1))
    if not torch.equal(index, torch.arange(n)):
        raise RuntimeError("predictions came back out of order from the ranks")
    return logits


def final_report(trainer, started: float) -> dict:
    """The best dev epoch's model of a mvcl_fast.intent.trainer.Trainer, loaded as predict loads
    it, on dev and test (and test without each --eval-drop-modality; --open-intent: the
    open-intent protocol's figures too, mvcl_fast.intent.open_intent.report): metrics.json,
    confusion_matrix.png and the log's tables (rank 0 writes them)."""
    from mvcl_fast.intent import open_intent
    from mvcl_fast.intent.metrics import (GROUP_COLUMNS, breakdown, confusion_matrix, format_table,
                                          save_confusion_png)

    args, progress = trainer.args, trainer.progress
    trainer.model = load_model(trainer.output_dir / BEST_CHECKPOINT, trainer.device).model
    logits = {name: trainer.split_logits(name) for name in ("dev", "test")}
    dev, _, _ = trainer.evaluate("dev", logits=logits["dev"])
    test, y_true, y_pred = trainer.evaluate("test", logits=logits["test"])
    without = {m: trainer.evaluate("test", blank=m)[0] for m in args.eval_drop_modality}
    opened = open_intent.report(trainer, logits) if args.open_intent else {}
    cm = confusion_matrix(y_true, y_pred, trainer.cfg.num_labels)
    results = {
        "test": test, "dev": dev,
        **{f"test_without_{m}": metrics for m, metrics in without.items()},
        **{f"test_{k}": v for k, v in breakdown(y_true, y_pred, trainer.label_names,
                                                trainer.train_label_counts).items()},
        **opened,
        "best_epoch": progress.best_epoch, "epochs_run": progress.epoch,
        "steps": progress.global_step, "train_seconds": round(progress.elapsed, 1),
        "process_seconds": round(time.perf_counter() - started, 1),
        "history": progress.history, "epoch_seconds": progress.epoch_seconds,
        "confusion_matrix": np.asarray(cm).tolist(),
        "labels": trainer.label_names, "args": vars(args), "model_config": trainer.cfg.to_dict(),
        "environment": {"device": str(trainer.device), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "platform": platform.platform(), "compiled": trainer.compiled,
                        "precision": trainer.precision,
                        "backend": os.environ.get("MVCL_FAST_BACKEND", "auto"),
                        "world_size": trainer.dist.world_size},
    }
    if not trainer.dist.is_main:
        return results
    trainer.folder.replace("confusion_matrix.png",
                           lambda file: save_confusion_png(cm, trainer.label_names, file))
    trainer.folder.replace("metrics.json",
                           lambda file: file.write((json.dumps(results, indent=1) + "\n").encode()))
    rows = {"test": test, **{f"test without {m}": metrics for m, metrics in without.items()}}
    if opened:
        trainer.log("\nopen intent (in-scope and out-of-scope utterances; UNK by the DOC thresholds "
                    "fitted on the training split):\n"
                    + format_table({f"{name} ({opened[f'{name}_open']['utterances']} utterances)":
                                    opened[f"{name}_open"] for name in ("dev", "test")},
                                   open_intent.OPEN_COLUMNS))
    scope = " in-scope" if opened else ""
    trainer.log(f"\ntest ({len(trainer.splits['test'])}{scope} utterances, best dev epoch "
                f"{progress.best_epoch}, dev {args.select_metric} {progress.best_score:.2f}; "
                f"{progress.elapsed:.0f}s of training):\n"
                + format_table(rows)
                + "\n\ntest by training frequency (intents in thirds; macro over each group's):\n"
                + format_table(results["test_groups"], GROUP_COLUMNS)
                + f"\n\noutputs in {trainer.output_dir}")
    return results
