"""Checkpoints: what last.pt and best.pt hold, the random generators' state, saving and loading.

``last.pt`` is the whole training state: the model, the loss's state (the
--prototypes ema bank), the optimiser, the scheduler, the GradScaler, the
run's :class:`Progress`, and every rank's loss sums of the unfinished epoch and
random generators, so that --resume continues the run bit for bit.
``best.pt`` is the model of the best dev epoch (without the anchor encoder,
which inference never runs) with what ``load_model`` needs: the run's
options, the model configuration, the intent names and their training
frequencies. Both hold only tensors and plain values and are read with
``torch.load(weights_only=True)``: a crafted file's payload never runs.
Rank 0 writes them through the run folder (a temporary file renamed over the
name); saving is collective under DDP.
"""
from __future__ import annotations

import math
import pickle
import random
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from mvcl_fast.intent import runs
from mvcl_fast.intent.errors import CheckpointError, first_line

# The layout this module writes; a file of another format is refused.
CHECKPOINT_FORMAT = 3
BEST_CHECKPOINT = "best.pt"


@dataclass
class Progress:
    """Where a run stands; saved in last.pt (one key each) and restored by --resume."""

    epoch: int = 0                  # completed epochs
    step_in_epoch: int = 0          # optimiser steps done in the current (unfinished) epoch
    global_step: int = 0
    best_score: float = -math.inf   # the best dev selection metric so far
    best_epoch: int = 0
    bad_epochs: int = 0             # epochs since the best one (early stopping)
    history: list[dict] = field(default_factory=list)   # per epoch: what the run computed
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_train_seconds: float = 0.0   # training time of the unfinished epoch so far
    elapsed: float = 0.0
    finished: bool = False


def load_checkpoint(path: Path) -> dict:
    """A mvcl_fast checkpoint, read with weights_only=True: only tensors and plain values are
    unpickled, so a crafted file's payload never runs."""
    unreadable = ("the file may be truncated or not a torch checkpoint: start a new run, or resume "
                  "another")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; its one informative sentence follows this marker
        found = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\. |\n|$)", str(err))
        detail = found.group(1) if found else first_line(err)
        if "Unsupported global" in detail:
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain values; refused to "
                f"load it ({detail})", "mvcl_fast checkpoints hold none: this file was written by "
                                       "something else or by another version of mvcl_fast") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({detail})", unreadable) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line(err)})",
                              unreadable) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a mvcl_fast checkpoint of format {CHECKPOINT_FORMAT}",
                              "another version of mvcl_fast wrote it, or another program: start "
                              "a new run")
    return state


# ------------------------------------------------------------ random generators
def rng_state() -> dict:
    """Every generator's state as tensors, lists and numbers (what weights_only=True reads)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ the trainer's
def save_last(trainer) -> None:
    """last.pt of a mvcl_fast.intent.trainer.Trainer. Collective under DDP: every rank calls it
    (each contributes its loss sums and generators), rank 0 writes."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "args": vars(trainer.args),
        "model_config": trainer.cfg.to_dict(),
        "label_names": trainer.label_names,
        "model": trainer.model.state_dict(),
        "criterion": trainer.criterion.state_dict(),   # the --prototypes ema bank; else empty
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "grad_scaler": trainer.scaler.state_dict(),    # empty unless --precision fp16
        **asdict(trainer.progress),
        "world_size": trainer.dist.world_size,
        "epoch_sums": trainer.dist.gather(trainer.epoch_sums),
        "rng": trainer.dist.gather(rng_state()),
    }
    if trainer.dist.is_main:
        trainer.folder.replace(runs.LAST_CHECKPOINT, lambda file: torch.save(state, file))
    trainer.dist.barrier()


def restore_last(trainer, state: dict) -> None:
    """Continue a Trainer from its last.pt (load_checkpoint's dict)."""
    # The data shards, steps per epoch and learning-rate schedule all depend on the number
    # of processes: a resume with another number would not continue the same run.
    saved_world = state["world_size"]
    if saved_world != trainer.dist.world_size:
        launch = ("plain python -m mvcl_fast.train" if saved_world == 1
                  else f"torchrun --nproc_per_node={saved_world} (in all)")
        raise CheckpointError(f"--resume: {trainer.last_path} was written by {saved_world} "
                              f"process(es); resume it with the same number (this run has "
                              f"{trainer.dist.world_size})", f"start it with {launch}")
    trainer.model.load_state_dict(state["model"])
    trainer.criterion.load_state_dict(state["criterion"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["grad_scaler"])
    trainer.progress = Progress(**{f.name: state[f.name] for f in fields(Progress)})
    trainer.epoch_sums = state["epoch_sums"][trainer.dist.rank]
    set_rng_state(state["rng"][trainer.dist.rank])


def save_best(trainer, dev: dict) -> None:
    """best.pt of a Trainer: rank 0 writes, the others wait (they may load it next)."""
    if trainer.dist.is_main:
        weights = {k: v for k, v in trainer.model.state_dict().items()
                   if not k.startswith("anchor_encoder.")}   # inference never runs the anchor
        # args: the run's options (its data folder, feature files, lengths), which
        # mvcl_fast.analyze reads the run's data with
        best = {"format": CHECKPOINT_FORMAT, "args": vars(trainer.args),
                "model_config": trainer.cfg.to_dict(), "label_names": trainer.label_names,
                "epoch": trainer.progress.epoch, "dev": dev,
                "train_label_counts": trainer.train_label_counts, "model": weights}
        trainer.folder.replace(BEST_CHECKPOINT, lambda file: torch.save(best, file))
    trainer.dist.barrier()
