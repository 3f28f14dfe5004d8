"""Train and evaluate MVCL-DAF++: ``python -m mvcl_fast.train --help``.

One run: tokenise every split once, train with AdamW (pretrained text
encoders at --lr, the freshly initialised fusion layers at --fusion-lr; both
with linear warm-up and decay), evaluate the dev split after every epoch,
stop early on the dev selection metric (--select-metric: macro F1 for
MIntRec, accuracy for MIntRec2.0), then report the test split with the best
dev checkpoint. What a run folder holds, how a run is resumed and the exit
statuses: the run contract in mvcl_fast.intent.cli.

This module resolves the options (the resumed run's, the data set's
defaults, the text model checked before anything is loaded) and runs one
:class:`~mvcl_fast.intent.trainer.Trainer` per seed.

Precision (--precision): the forward passes and the loss run under
``torch.autocast`` (bf16 by default on CUDA cards that support it, fp32 on the
CPU), so the fused ops receive bf16; the weights, the AdamW state and the
checkpoints stay fp32, and fp16 adds a GradScaler (its state is in
``last.pt``). The final evaluation loads ``best.pt`` with
``mvcl_fast.intent.loading.load_model``, as ``python -m mvcl_fast.predict`` does, and
reports per-intent figures, the head / middle / tail thirds by training
frequency, and (--eval-drop-modality) the test split with a modality blanked
out; --seeds repeats the run per seed and summarises them.

Several processes: ``torchrun --nproc_per_node=N -m mvcl_fast.train`` runs
DDP (nccl on CUDA, gloo on the CPU) with a distributed sampler; --batch-size
is per process, the prototypes and the multi-view negatives come from the
global batch, dev/test predictions are gathered from every rank, and rank 0
alone writes checkpoints, logs and metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from mvcl_fast.intent import distributed, runs
from mvcl_fast.intent.checkpoints import BEST_CHECKPOINT, LAST_FIELDS, check_fields, load_checkpoint
from mvcl_fast.intent.cli import (check_dropped_modalities, check_saved_options,
                                  check_train_options, run_command, train_parser)
from mvcl_fast.intent.errors import (CheckpointError, ConfigError, DiskError, Interrupted,
                                     MVCLError, first_line)
from mvcl_fast.intent.evaluation import final_report
from mvcl_fast.intent.presets import apply_preset
from mvcl_fast.intent.trainer import Trainer, TrainingDiverged

# Options that only change how a run executes, not what it computes: a
# resumed run takes these from the command line, everything else from the
# checkpoint, and refuses a command line that sets any other option to
# another value (so a resume cannot silently change the experiment).
RUNTIME_OPTIONS = ("resume", "num_workers", "compile", "backend", "device", "output_dir", "name",
                   "overwrite", "debug", "cache_dir", "eval_drop_modality", "log_every")
# What a text-model folder must hold besides config.json (any one of each).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def apply_dataset_defaults(args: argparse.Namespace) -> None:
    """Fill the options left unset with the data set's published defaults."""
    from mvcl_fast.intent.data import DATASETS

    info = DATASETS[args.dataset]
    if args.max_text_tokens is None:
        args.max_text_tokens = info.max_text_tokens
    if args.select_metric is None:
        args.select_metric = info.select_metric


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options that argv sets (whatever their value), as opposed to those left at their default."""
    unset = object()   # argparse fills in defaults only where the namespace has no value yet
    blank = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {k for k, v in vars(parser.parse_args(argv, namespace=blank)).items() if v is not unset}


def resume_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   given: set[str]) -> dict:
    """The resumed run's state; args becomes the run's options (its own, plus this command
    line's run options)."""
    path = runs.resume_checkpoint(args.resume, args.output_dir, args.name)
    state = load_checkpoint(path)
    if "world_size" not in state and "dev" in state:
        raise CheckpointError(f"--resume {path}: a {BEST_CHECKPOINT} holds the model of the best dev "
                              "epoch, not the training state a run continues from",
                              f"resume the run's {runs.LAST_CHECKPOINT}: --resume {path.parent}")
    check_fields(state, path, LAST_FIELDS,
                 f"--resume reads the {runs.LAST_CHECKPOINT} of a mvcl_fast.train run, unchanged")
    check_saved_options(state["args"], path)
    saved = state["args"]
    changed = [key for key in sorted(given - set(RUNTIME_OPTIONS))
               if getattr(args, key) != saved[key]]
    if changed:
        parser.error(f"--resume {path.parent}: "
                     + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved[k]})"
                                 for k in changed)
                     + " would change the run; drop them to continue it as it was, or start a "
                       "new run for the new options")
    runtime = {key: getattr(args, key) for key in RUNTIME_OPTIONS}
    vars(args).update({**saved, **runtime, "output_dir": str(path.parent)})
    return state


def check_text_model(text_model: Optional[str]):
    """The text model's config, once it is known to be a BERT-family encoder checkpoint: a
    folder, or a hub id in the local Hugging Face cache or downloaded into it (unless the user
    set HF_HUB_OFFLINE=1).

    Checked before anything is loaded: transformers' own errors for these cases
    name no option (an empty folder asks to install sentencepiece, an id that is
    not cached while offline names no way to get it) and it loads a GPT-2
    without a word.
    """
    from huggingface_hub import is_offline_mode
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from mvcl_fast.intent.model import default_text_model, hub_revision

    try:
        text_model = text_model or default_text_model()
    except RuntimeError as err:
        raise ConfigError(str(err)) from None
    option = f"--text-model {text_model}"
    hint = ("pass the folder of a BERT-family encoder checkpoint (config.json, model.safetensors "
            "or pytorch_model.bin, tokenizer files), as save_pretrained writes it, or a hub id")
    folder = Path(text_model).expanduser()
    if folder.is_dir():
        missing = [what for what, names in (("config.json", ("config.json",)),
                                            ("tokenizer files", TOKENIZER_FILES),
                                            ("weights", WEIGHT_FILES))
                   if not any((folder / name).is_file() for name in names)]
        if missing:
            raise ConfigError(f"{option}: the folder has no {' and no '.join(missing)}", hint)
    # A hub id is NAME or ORG/NAME; anything else was meant as a folder.
    hub_id = text_model.count("/") <= 1 and not text_model.startswith((".", "~", "/"))
    if not folder.is_dir() and not hub_id:
        raise ConfigError(f"{option}: no such folder", hint)
    try:
        revision = hub_revision(text_model)
    except (OSError, ValueError) as err:
        if is_offline_mode():
            raise ConfigError(f"{option}: no such folder, and no model of that name in the local "
                              "Hugging Face cache (HF_HUB_OFFLINE=1: downloads are off)",
                              f"download it once where the hub is reachable (hf download "
                              f"{text_model}), unset HF_HUB_OFFLINE to let the trainer download "
                              "it, or pass a folder") from None
        raise ConfigError(f"{option}: no such folder, and the Hugging Face hub has no such model "
                          f"or cannot be reached ({first_line(err)})",
                          "check the name (NAME or ORG/NAME, as on huggingface.co) and the "
                          "network, or pass a folder") from None
    try:
        config = AutoConfig.from_pretrained(text_model, revision=revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{option}: config.json cannot be read ({first_line(err)})", hint) from None
    # A masked-LM encoder (the label prompt fills [MASK] slots), not an encoder-decoder.
    if (config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            or getattr(config, "is_encoder_decoder", False)):
        raise ConfigError(f"{option}: a {config.model_type!r} model is not an encoder-only "
                          "BERT-family model", "use a masked-language-model encoder: bert, roberta, "
                                               "deberta, electra, mpnet, ...")
    return config


def resolve_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 argv: Optional[list[str]]) -> Optional[dict]:
    """Complete args into the run's options, all checked before anything is loaded (usage errors
    exit 2 through parser.error); return the state to resume (None for a new run)."""
    given = given_options(parser, sys.argv[1:] if argv is None else argv)
    if args.resume is None:    # a resumed run takes its options, its preset's too, from last.pt
        apply_preset(args, given)
    check_train_options(parser, args)
    state = None
    if args.resume is not None:
        state = resume_options(parser, args, given)
    elif args.output_dir is None:
        args.output_dir = str(runs.default_output_dir(args.name))
    apply_dataset_defaults(args)
    check_dropped_modalities(parser, args)
    width = check_text_model(args.text_model).hidden_size
    if width % args.fusion_heads:
        parser.error(f"argument --fusion-heads: must divide the text encoder's width {width}, "
                     f"got {args.fusion_heads}")
    return state


def prepare_args(argv=None) -> tuple[argparse.Namespace, Optional[dict]]:
    """Parse and resolve argv, for callers that build a Trainer themselves (one per torchrun rank)."""
    parser = train_parser()
    args = parser.parse_args(argv)
    return args, resolve_args(parser, args, argv)


def main(argv=None) -> int:
    started = time.perf_counter()
    parser = train_parser()

    def train(args: argparse.Namespace) -> int:
        state = resolve_args(parser, args, argv)
        os.environ["MVCL_FAST_BACKEND"] = args.backend
        if args.seeds is not None:
            return run_seeds(args)
        return train_once(args, state, started)

    return run_command(parser, argv, train, lambda args: args.output_dir)


def train_once(args: argparse.Namespace, state: Optional[dict], started: float) -> int:
    dist_ctx = distributed.from_env(args.device)
    if dist_ctx.enabled:   # rank 0's folder (a timestamped default differs between processes)
        args.output_dir = dist_ctx.gather(args.output_dir)[0]
    trainer = Trainer(args, resume_state=state, dist_ctx=dist_ctx)
    try:
        return run(trainer, state is not None, started)
    finally:
        trainer.close()


def run_seeds(args: argparse.Namespace) -> int:
    """--seeds: one run per seed in OUTPUT_DIR/seed-N, then summary.json and summary.txt there."""
    from mvcl_fast.intent.metrics import seed_summary, seed_table

    folder = runs.RunFolder.claim(args.output_dir, resume=False, overwrite=args.overwrite)
    try:
        results = {}
        for seed in args.seeds:
            seed_dir = Path(args.output_dir) / f"seed-{seed}"
            seed_args = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None,
                                              "output_dir": str(seed_dir)})
            code = train_once(seed_args, None, time.perf_counter())
            if code:
                print(f"seed {seed} stopped (exit status {code}); no summary over the seeds",
                      file=sys.stderr)
                return code
            results[seed] = json.loads((seed_dir / "metrics.json").read_text())
        summary = seed_summary(results)
        table = seed_table(summary)
        folder.replace("summary.json", lambda file: file.write((json.dumps(summary, indent=1) + "\n").encode()))
        folder.replace("summary.txt", lambda file: file.write((table + "\n").encode()))
        print(f"\n{len(results)} seeds ({' '.join(map(str, results))}), mean +- standard deviation:\n"
              f"{table}\n\nsummary in {Path(args.output_dir) / 'summary.json'}")
        return 0
    finally:
        folder.release()


def stopped_run_error(trainer: Trainer, err: BaseException) -> MVCLError:
    """The error a run that stopped on err (divergence, a full disk, a second stop signal) ends
    with: what stopped it and what last.pt holds, with a hint; appended to train.log too."""
    progress = trainer.progress
    if trainer.last_path.exists():
        kept = f"the last good checkpoint is {trainer.last_path}"
        again = "writes its report again" if progress.finished else "continues from it"
        resume = f"--resume {trainer.output_dir} {again}"
    else:
        kept, resume = "no checkpoint had been written yet", "start the run again"
    if isinstance(err, TrainingDiverged):
        error = TrainingDiverged(f"{err}; {kept}" + (f" (epoch {progress.epoch})"
                                                      if trainer.last_path.exists() else ""),
                                 f"try a lower --lr / --fusion-lr, or --grad-clip 1; {resume}")
    elif isinstance(err, DiskError):
        error = DiskError(f"{err}; {kept}", f"{err.hint}; then {resume}")
    else:
        error = Interrupted(f"interrupted; {kept}", resume)
    trainer.append_to_log(f"error: {error}")
    return error


def run(trainer: Trainer, resumed: bool, started: float) -> int:
    args, progress = trainer.args, trainer.progress
    if resumed:
        trainer.log(f"resumed from {trainer.last_path}: epoch {progress.epoch}, step "
                    f"{progress.step_in_epoch} of the next, best dev {args.select_metric} "
                    f"{progress.best_score:.2f}"
                    + ("; the run had finished: its result again" if progress.finished else ""))
    processes = f" x {trainer.dist.world_size} processes" if trainer.dist.enabled else ""
    momentum = f" (momentum {args.prototype_momentum})" if args.prototypes == "ema" else ""
    preset = f" | preset {args.preset}" if args.preset else ""
    trainer.log(f"run: {args.output_dir}{preset} | device {trainer.device}{processes} | modalities {args.modalities} | "
                f"lambda_proto {args.lambda_proto} lambda_mv {args.lambda_mv} tau {args.tau} "
                f"prototypes {args.prototypes}{momentum} | "
                f"precision {trainer.precision} | compile {'on' if trainer.compiled else 'off'} | "
                f"backend {args.backend}")
    try:
        if trainer.fit() == "interrupted":
            return 130
        final_report(trainer, started)
    except (TrainingDiverged, KeyboardInterrupt, DiskError) as err:
        raise stopped_run_error(trainer, err) from err
    return 0
