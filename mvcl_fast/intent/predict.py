"""Label clips with a trained model: ``python -m mvcl_fast.predict --help``.

Reads one split of a data folder in the layout the model was trained on
(--data-dir: its TSV and feature pickles, found and cached as
``mvcl_fast.train`` finds them), or new clips without labels (--input: a TSV
in that layout, its label column absent or empty, and the feature pickles of
its clips, read by the same code), runs the best checkpoint of a run
(``load_model``: the same loading path as the trainer's final evaluation) and
writes, into --output-dir, ``predictions.tsv`` (key, text, predicted intent,
its probability, the true intent: empty for --input). For a labelled split
it also writes ``prediction_metrics.json`` (the benchmark metrics, per
intent, and head / middle / tail by the run's training frequencies) and
prints the tables. A checkpoint of another data set, label set or text model
is refused with one line and a hint (exit 1); bad options exit 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import textwrap
from pathlib import Path
from typing import Optional

import torch

from mvcl_fast.intent import distributed, runs
from mvcl_fast.intent.data import UNLABELLED
from mvcl_fast.intent.errors import MVCLError, is_disk_full, print_error
from mvcl_fast.intent.loading import (BEST_CHECKPOINT, PRECISIONS, load_model, model_outputs,
                               quiet_transformers, read_clips, read_split)
from mvcl_fast.intent.train import HelpFormatter, device_name, number

PREDICTIONS = "predictions.tsv"
PREDICTION_METRICS = "prediction_metrics.json"
EPILOG = """\
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

exit status: 0 done, 1 error (one line and a hint; --debug for the traceback), 2 bad options.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mvcl_fast.predict",
        description=textwrap.fill("Predict the intents of a split with a model that mvcl_fast.train "
                                  "trained, and score them against the split's labels; or label "
                                  "new clips without labels (--input).", 79),
        epilog=EPILOG, formatter_class=HelpFormatter)
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
    p.add_argument("--batch-size", type=number(int, at_least=1), default=64,
                   help="utterances per forward pass, %(type)s")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                   help="torch.autocast precision: auto = bf16 on CUDA cards that support it, fp32 "
                        "on the CPU")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of data, checkpoint and configuration errors")
    return p


def output_folder(args: argparse.Namespace) -> Path:
    if args.output_dir is not None:
        return Path(args.output_dir)
    path = Path(args.checkpoint)
    return path if path.is_dir() else path.parent


@torch.no_grad()
def predict(args: argparse.Namespace) -> Optional[dict]:
    """Label the split, or the clips of --input; write the predictions and, for a split, the
    metrics; return the metrics (None for clips without labels)."""
    from mvcl_fast.intent.metrics import GROUP_COLUMNS, breakdown, classification_metrics, format_table

    device = distributed.from_env(args.device).device
    loaded = load_model(args.checkpoint, device, args.text_model)
    features = dict(dataset=args.dataset, video_feats=args.video_feats, audio_feats=args.audio_feats,
                    cache_dir=args.cache_dir)
    if args.input is None:
        split = read_split(loaded, args.data_dir, args.split, **features)
    else:
        split = read_clips(loaded, args.input, **features)
    probabilities = [out.logits.float().softmax(dim=-1).cpu()
                     for out in model_outputs(loaded, split, device, args.batch_size, args.precision)]
    confidence, predicted = torch.cat(probabilities).max(dim=-1)

    names = loaded.label_names
    table = io.StringIO()
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(["key", "text", "predicted", "probability", "true"])
    for key, text, p, c, t in zip(split.keys, split.texts, predicted.tolist(), confidence.tolist(),
                                  split.labels.tolist()):
        writer.writerow([key, text, names[p], f"{c:.4f}", "" if t == UNLABELLED else names[t]])
    folder = output_folder(args)
    folder.mkdir(parents=True, exist_ok=True)
    runs.replace_file(folder, PREDICTIONS, lambda file: file.write(table.getvalue().encode()))
    model = f"model {args.checkpoint}" + ("" if "text" in loaded.config.modalities
                                          else " (trained without text: the texts are not read)")
    if args.input is not None:
        # Metrics an earlier labelled run left in the folder describe other predictions.
        (folder / PREDICTION_METRICS).unlink(missing_ok=True)
        print(f"{len(split)} clips of {args.input} labelled, {model}; without labels, no metrics\n"
              f"predictions in {folder / PREDICTIONS}")
        return None

    metrics = {"split": args.split, "data_dir": str(args.data_dir), "checkpoint": str(args.checkpoint),
               "dataset": loaded.dataset, "utterances": len(split),
               "metrics": classification_metrics(split.labels, predicted, len(names))}
    if loaded.train_label_counts:
        metrics.update(breakdown(split.labels, predicted, names, loaded.train_label_counts))
    runs.replace_file(folder, PREDICTION_METRICS,
                      lambda file: file.write((json.dumps(metrics, indent=1) + "\n").encode()))
    print(f"{args.split}: {len(split)} utterances of {args.data_dir}, {model}\n"
          + format_table({args.split: metrics["metrics"]}))
    if "groups" in metrics:
        print("\nby training frequency (intents in thirds):\n"
              + format_table(metrics["groups"], GROUP_COLUMNS))
    print(f"\npredictions in {folder / PREDICTIONS}")
    return metrics


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input is not None and args.split is not None:
        parser.error("--split picks a TSV of --data-dir; --input names the TSV itself: drop --split")
    args.split = args.split or "test"
    quiet_transformers(parser.prog)
    try:
        predict(args)
        return 0
    except (MVCLError, OSError) as err:
        if args.debug or not (isinstance(err, MVCLError) or is_disk_full(err)):
            raise
        print_error(parser.prog, err, output_folder(args))
        return 1

