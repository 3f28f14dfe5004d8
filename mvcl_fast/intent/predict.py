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

A model trained with --open-intent (its best.pt holds DOC thresholds) labels a
clip UNK where DOC rejects its argmax intent (mvcl_fast.intent.open_intent);
the probability column stays the softmax probability of the argmax intent.
With --data-dir it labels the split's out-of-scope rows too (the release's
out-of-scope/MIntRec2.0-OOD/SPLIT.tsv, after the in-scope rows) and reports the
open-intent figures beside the in-scope ones (the in-scope rows by argmax).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Optional

import torch

from mvcl_fast.intent import distributed, runs
from mvcl_fast.intent.data import OOS_LABEL, UNLABELLED
from mvcl_fast.intent.cli import check_predict_options, predict_parser, run_command
from mvcl_fast.intent.evaluation import loaded_model_outputs
from mvcl_fast.intent.loading import load_model, read_clips, read_split
from mvcl_fast.intent.open_intent import OPEN_COLUMNS, doc_predict, evaluate_open

PREDICTIONS = "predictions.tsv"
PREDICTION_METRICS = "prediction_metrics.json"


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
    thresholds = loaded.doc_thresholds
    features = dict(dataset=args.dataset, video_feats=args.video_feats, audio_feats=args.audio_feats,
                    cache_dir=args.cache_dir)
    oos = None
    if args.input is None:
        split = read_split(loaded, args.data_dir, args.split, **features)
        if thresholds is not None:
            oos = read_split(loaded, args.data_dir, args.split, out_of_scope=True, **features)
    else:
        split = read_clips(loaded, args.input, **features)

    def logits_of(data) -> torch.Tensor:
        return torch.cat([out.logits.float().cpu() for out in loaded_model_outputs(
            loaded, data, device, args.batch_size, args.precision)])

    logits = logits_of(split)
    oos_logits = logits_of(oos) if oos is not None else logits[:0]
    everything = torch.cat([logits, oos_logits])
    confidence, predicted = everything.softmax(dim=-1).max(dim=-1)
    names = [*loaded.label_names, OOS_LABEL]   # UNK: class len(label_names)
    if thresholds is None:
        labelled = predicted.numpy()
    elif oos is None:
        labelled = doc_predict(everything, thresholds)[0]
    else:   # DOC's labels and the open-intent figures of the in-scope and out-of-scope rows
        open_figures, labelled = evaluate_open(logits, split.labels, oos_logits, thresholds)

    table = io.StringIO()
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(["key", "text", "predicted", "probability", "true"])
    parts = [split] if oos is None else [split, oos]
    for key, text, p, c, t in zip([k for s in parts for k in s.keys], [x for s in parts for x in s.texts],
                                  labelled.tolist(), confidence.tolist(),
                                  torch.cat([s.labels for s in parts]).tolist()):
        writer.writerow([key, text, names[p], f"{c:.4f}", "" if t == UNLABELLED else names[t]])
    folder = output_folder(args)
    runs.make_output_folder(folder, "--output-dir")
    runs.replace_file(folder, PREDICTIONS, lambda file: file.write(table.getvalue().encode()))
    model = f"model {args.checkpoint}" + ("" if "text" in loaded.config.modalities
                                          else " (trained without text: the texts are not read)")
    if args.input is not None:
        # Metrics an earlier labelled run left in the folder describe other predictions.
        (folder / PREDICTION_METRICS).unlink(missing_ok=True)
        print(f"{len(split)} clips of {args.input} labelled, {model}; without labels, no metrics\n"
              f"predictions in {folder / PREDICTIONS}")
        return None

    names = loaded.label_names
    in_scope = predicted[:len(split)]   # by argmax, as the benchmark's in-scope figures
    metrics = {"split": args.split, "data_dir": str(args.data_dir), "checkpoint": str(args.checkpoint),
               "dataset": loaded.dataset, "utterances": len(split),
               "metrics": classification_metrics(split.labels, in_scope, len(names))}
    if loaded.train_label_counts:
        metrics.update(breakdown(split.labels, in_scope, names, loaded.train_label_counts))
    if oos is not None:
        metrics["out_of_scope_utterances"] = len(oos)
        metrics["open"] = open_figures
    runs.replace_file(folder, PREDICTION_METRICS,
                      lambda file: file.write((json.dumps(metrics, indent=1) + "\n").encode()))
    print(f"{args.split}: {len(split)} utterances of {args.data_dir}, {model}\n"
          + format_table({args.split: metrics["metrics"]}))
    if "groups" in metrics:
        print("\nby training frequency (intents in thirds):\n"
              + format_table(metrics["groups"], GROUP_COLUMNS))
    if "open" in metrics:
        print(f"\nopen intent ({len(split)} in-scope and {len(oos)} out-of-scope utterances; UNK by "
              "the run's DOC thresholds):\n" + format_table({args.split: metrics["open"]}, OPEN_COLUMNS))
    print(f"\npredictions in {folder / PREDICTIONS}")
    return metrics


def main(argv=None) -> int:
    parser = predict_parser()

    def label(args: argparse.Namespace) -> int:
        check_predict_options(parser, args)
        predict(args)
        return 0

    return run_command(parser, argv, label, output_folder)
