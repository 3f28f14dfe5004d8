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
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from mvcl_fast.intent import runs
from mvcl_fast.intent.errors import CheckpointError, first_line

# The layout this module writes; a file of another format is refused.
CHECKPOINT_FORMAT = 4
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


# torch's refusal names the global the file asked for ("GLOBAL posix.system", "GLOBAL eval");
# the rest of its message is advice to load the file with weights_only=False, which would run it.
REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*([^\n]*?)(?:\. |\n|$)")


def load_checkpoint(path: Path) -> dict:
    """A mvcl_fast checkpoint, read with weights_only=True: only tensors and plain values are
    unpickled, so a crafted file's payload never runs."""
    unreadable = ("the file may be truncated or not a torch checkpoint: start a new run, or resume "
                  "another")
    try:
        # torch.load does not verify the archive's checksums: a flipped byte in a tensor would
        # load as silently changed weights. One read of the file checks them all.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise CheckpointError(f"{path} is damaged ({damaged} fails its CRC check)", unreadable)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        refused = REFUSED_GLOBAL.search(str(err))
        if refused:
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain values; refused to "
                f"load it (it asks for {refused.group(1)})",
                "mvcl_fast checkpoints hold none: this file was written by something else, or "
                "crafted; do not load it by other means") from None
        detail = UNPICKLER_DETAIL.search(str(err))
        raise CheckpointError(f"{path} is not a readable checkpoint ("
                              f"{detail.group(1) if detail else 'refused by the safe unpickler'})",
                              unreadable) from None
    except Exception as err:   # noqa: BLE001
        # Whatever else torch.load raises is about the file: a damaged zip or pickle reaches
        # its unpickler and storages as struct.error, IndexError, KeyError, AssertionError ...
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                              f"{first_line(err)})", unreadable) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a mvcl_fast checkpoint of format {CHECKPOINT_FORMAT}",
                              "another version of mvcl_fast wrote it, or another program: start "
                              "a new run")
    return state


def check_fields(state: dict, path: Path, kinds: dict[str, type | tuple], hint: str) -> None:
    """Each field of kinds is in state with a value of its type (bool is no int here), or a
    CheckpointError names the file and the field."""
    for name, kind in kinds.items():
        if name not in state:
            raise CheckpointError(f"{path} has no field {name!r}", hint)
        value = state[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
            raise CheckpointError(f"{path}: field {name!r} is a {type(value).__name__}, not "
                                  f"{' or '.join(t.__name__ for t in _types(kind))}", hint)


def _types(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


# What a trained model's checkpoint holds (best.pt; last.pt holds it too): load_model reads it.
MODEL_FIELDS = {"args": dict, "model_config": dict, "label_names": list, "model": dict}
# What last.pt holds besides: the training state and one field per Progress field.
_ANNOTATED_TYPES = {"int": int, "float": (float, int), "bool": bool, "list[dict]": list,
                    "list[float]": list}
LAST_FIELDS = {**MODEL_FIELDS, "criterion": dict, "optimizer": dict, "scheduler": dict,
               "grad_scaler": dict, "world_size": int, "epoch_sums": list, "rng": list,
               **{f.name: _ANNOTATED_TYPES[f.type] for f in fields(Progress)}}


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
    """Continue a Trainer from its last.pt (load_checkpoint's dict, whose fields
    mvcl_fast.intent.train checked); a field that does not fit the run is a CheckpointError."""
    path = trainer.last_path
    # The data shards, steps per epoch and learning-rate schedule all depend on the number
    # of processes: a resume with another number would not continue the same run.
    saved_world = state["world_size"]
    if saved_world != trainer.dist.world_size:
        launch = ("plain python -m mvcl_fast.train" if saved_world == 1
                  else f"torchrun --nproc_per_node={saved_world} (in all)")
        raise CheckpointError(f"--resume: {path} was written by {saved_world} "
                              f"process(es); resume it with the same number (this run has "
                              f"{trainer.dist.world_size})", f"start it with {launch}")
    hint = "resume with the data and text model the run was trained on, or start a new run"
    saved_config = state["model_config"]
    changed = [f"{key} {value!r} (the checkpoint's: {saved_config.get(key)!r})"
               for key, value in trainer.cfg.to_dict().items()
               if key not in ("text_model", "text_revision")   # the weights are the checkpoint's
               and _plain(saved_config.get(key)) != _plain(value)]
    if changed:
        raise CheckpointError(f"--resume: {path} holds a model of other data than --data-dir "
                              f"{trainer.args.data_dir} now gives: {', '.join(changed)}", hint)
    per_rank = {}
    for name in ("epoch_sums", "rng"):
        if len(state[name]) != saved_world:
            raise CheckpointError(f"--resume: {path}: field {name!r} holds {len(state[name])} "
                                  f"entries for a run of {saved_world} process(es)", hint)
        per_rank[name] = state[name][trainer.dist.rank]
    parts = {"model": trainer.model, "criterion": trainer.criterion,
             "optimizer": trainer.optimizer, "scheduler": trainer.scheduler,
             "grad_scaler": trainer.scaler}

    def set_epoch_sums(sums: dict) -> None:
        trainer.epoch_sums = {str(key): float(value) for key, value in sums.items()}

    restores = [*((name, part.load_state_dict) for name, part in parts.items()),
                ("epoch_sums", set_epoch_sums), ("rng", set_rng_state)]
    for name, restore in restores:
        try:
            restore(per_rank.get(name, state[name]))
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line),
                          first_line(err))
            raise CheckpointError(f"--resume: {path}: field {name!r} does not fit this run "
                                  f"({detail})", hint) from None
    trainer.progress = Progress(**{f.name: state[f.name] for f in fields(Progress)})


def _plain(value):
    """A configuration value as it compares after a round trip through a checkpoint."""
    return list(value) if isinstance(value, tuple) else value


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
