"""The paper's analyses of trained runs: ``python -m mvcl_fast.analyze --help``.

- ``embeddings RUN_DIR [RUN_DIR ...]``: the fused embeddings of a split (the
  label-slot view of the fused tokens, which the prototype loss sees) from
  each run's best checkpoint, in a t-SNE map coloured by intent (one panel
  per run, side by side, in a PNG), and in a JSON beside it per run: the
  silhouette score of the intents (cosine), the nearest-prototype accuracy
  (prototypes: the per-intent means of the training split's embeddings; each
  utterance gets the intent of the most cosine-similar one) and, for
  comparison, the classifier's accuracy.
- ``prototypes RUN_DIR``: how far a batch's prototype of an intent (the
  prototype loss's default) lies from the intent's mean over the whole
  training split, and how often an intent is absent from a batch, for
  several batch sizes, by head / middle / tail intents (thirds by training
  frequency): a PNG and a JSON.

Models load through ``mvcl_fast.intent.loading.load_model`` (``weights_only=True``:
nothing in a checkpoint runs), in fp32; the data are the run's own (its data
folder, feature files and lengths, recorded in best.pt) unless --data-dir
names another folder of the same data set. Embeddings are computed once per
split; the batches are sampled as index sets over them. Outputs are written
to a temporary file and renamed over their name.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mvcl_fast.intent import distributed, runs
from mvcl_fast.intent.cli import analyze_parser, run_command
from mvcl_fast.intent.options import PROTOTYPE_DISTANCE
from mvcl_fast.intent.errors import ConfigError
from mvcl_fast.intent.evaluation import loaded_model_outputs
from mvcl_fast.intent.loading import LoadedModel, load_model, read_split

EMBEDDING = "fused"    # the view of mvcl_fast.intent.model.ModelOutput.views the analyses read
EMBEDDING_NOTE = ("the fused view (label-slot mean of the fused tokens), which the prototype loss "
                  "sees; in fp32")


def output_path(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return args.output
    first = args.runs[0] if args.command == "embeddings" else args.run
    return first / f"{args.command}.png"


# ------------------------------------------------------------------- the data
def run_split(loaded: LoadedModel, args: argparse.Namespace, split: str):
    """A split of the run's data (or of --data-dir), read with the run's data options."""
    options = loaded.run_options
    return read_split(loaded, args.data_dir or options["data_dir"], split, dataset=args.dataset,
                      video_len=options["video_len"], audio_len=options["audio_len"],
                      video_feats=options["video_feats"], audio_feats=options["audio_feats"],
                      cache_dir=options["cache_dir"])


def embed(loaded: LoadedModel, split, args: argparse.Namespace, title: str):
    """(fused embeddings [N, H] fp32, the classifier's predictions [N]) of a split, on the CPU."""
    device = loaded.model.classifier.weight.device
    views, predictions = [], []
    for out in loaded_model_outputs(loaded, split, device, args.batch_size, precision="fp32",
                                    progress=title):
        views.append(out.views[EMBEDDING].float().cpu())
        predictions.append(out.logits.argmax(dim=-1).cpu())
    return torch.cat(views), torch.cat(predictions)


def loaded_run(run: Path, args: argparse.Namespace) -> LoadedModel:
    return load_model(run, distributed.from_env(args.device).device, args.text_model)


# ----------------------------------------------------------------- embeddings
def embedding_figures(z: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                      train_z: torch.Tensor, train_labels: torch.Tensor, num_classes: int) -> dict:
    """Silhouette (cosine; None when the split holds fewer than 2 intents or no fewer than one
    per utterance), nearest-prototype and classifier accuracy (%) of embeddings z [N, H]."""
    from sklearn.metrics import silhouette_score

    from mvcl_fast import batch_prototypes

    prototypes, counts = batch_prototypes(train_z, train_labels, num_classes)
    similarity = F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).T
    # an intent without training utterances has no prototype
    similarity[:, counts == 0] = -math.inf
    nearest = similarity.argmax(dim=1)
    intents = int(labels.unique().numel())
    silhouette = (float(silhouette_score(z.numpy(), labels.numpy(), metric="cosine"))
                  if 2 <= intents < len(labels) else None)
    percent = lambda hits: round(100 * hits.float().mean().item(), 2)  # noqa: E731
    return {"utterances": len(labels), "intents": intents,
            "silhouette": None if silhouette is None else round(silhouette, 4),
            "nearest_prototype_accuracy": percent(nearest == labels),
            "classifier_accuracy": percent(predictions == labels),
            "intents_without_training_utterances": int((counts == 0).sum())}


def tsne_map(z: torch.Tensor, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of the L2-normalised embeddings (euclidean there ranks as cosine does)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: at these sizes (a split: hundreds to a few thousand points) two threads
    # on the 2-core test machine took 5-8x longer than one (400 points: 8.8 s against 1.9 s),
    # waiting on each other while other work ran.
    with threadpool_limits(limits=1, user_api="openmp"):
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=seed).fit_transform(F.normalize(z, dim=1).numpy())


def intent_colours(num_classes: int) -> list:
    import matplotlib

    if num_classes <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(num_classes)]
    return [matplotlib.colormaps["turbo"](i / (num_classes - 1)) for i in range(num_classes)]


def save_embeddings_png(panels: list[dict], label_names: list[str], file) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = intent_colours(len(label_names))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.2, 5.2), squeeze=False)
    try:
        shown = set()
        for ax, panel in zip(axes[0], panels):
            xy, labels = panel["map"], panel["labels"]
            for c in np.unique(labels):
                mine = labels == c
                ax.scatter(xy[mine, 0], xy[mine, 1], s=12, color=colours[c], alpha=0.85,
                           linewidths=0)
                shown.add(int(c))
            f = panel["figures"]
            silhouette = "n/a" if f["silhouette"] is None else f"{f['silhouette']:.3f}"
            ax.set_title(f"{panel['run']}\nsilhouette {silhouette} | nearest-prototype "
                         f"{f['nearest_prototype_accuracy']:.1f}%", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[c], label=label_names[c])
                   for c in sorted(shown)]
        fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
        fig.savefig(file, format="png", dpi=100)
    finally:
        plt.close(fig)


def analyze_embeddings(args: argparse.Namespace) -> dict:
    panels, label_names = [], None
    for run in args.runs:
        loaded = loaded_run(run, args)
        if label_names is not None and loaded.label_names != label_names:
            raise ConfigError(f"{run}: its intents are not those of {args.runs[0]}",
                              "map runs of one data set together")
        label_names = loaded.label_names
        split = run_split(loaded, args, args.split)
        if args.perplexity >= len(split):
            raise ConfigError(f"--perplexity {args.perplexity:g}: the {args.split} split of {run} "
                              f"holds {len(split)} utterances; t-SNE needs a perplexity below that",
                              f"pass a --perplexity below {len(split)}")
        z, predictions = embed(loaded, split, args, f"{run} {args.split}")
        train = split if args.split == "train" else run_split(loaded, args, "train")
        train_z = z if train is split else embed(loaded, train, args, f"{run} train")[0]
        figures = embedding_figures(z, split.labels, predictions, train_z, train.labels,
                                    len(label_names))
        panels.append({"run": str(run), "figures": figures,
                       "labels": split.labels.numpy(), "map": tsne_map(z, args.perplexity, args.seed)})
    results = {"split": args.split, "embedding": EMBEDDING_NOTE,
               "silhouette": "sklearn.metrics.silhouette_score of the intents, cosine distance",
               "nearest_prototype": "prototypes: the per-intent means of the training split's "
                                    "embeddings; nearest by cosine similarity; accuracy in %",
               "perplexity": args.perplexity, "seed": args.seed,
               "runs": [{"run": p["run"], **p["figures"]} for p in panels]}
    write_outputs(output_path(args), lambda file: save_embeddings_png(panels, label_names, file),
                  results)
    for p in panels:
        f = p["figures"]
        print(f"{p['run']}: {args.split} {f['utterances']} utterances, silhouette "
              f"{f['silhouette']}, nearest-prototype accuracy {f['nearest_prototype_accuracy']:.2f}%, "
              f"classifier accuracy {f['classifier_accuracy']:.2f}%")
    return results


# ----------------------------------------------------------------- prototypes
def prototype_drift(z: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int,
                    batches: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per intent, over `batches` random batches of the rows of z [N, H]: the summed cosine
    distance of its batch prototype to its mean over all of z (over the batches that hold it),
    and the number of batches that hold it."""
    from mvcl_fast import batch_prototypes

    means, _ = batch_prototypes(z, labels, num_classes)
    distance_sum = torch.zeros(num_classes, dtype=torch.float64)
    present = torch.zeros(num_classes, dtype=torch.int64)
    for _ in range(batches):
        rows = torch.randperm(len(labels), generator=generator)[:batch_size]
        prototypes, counts = batch_prototypes(z[rows], labels[rows], num_classes)
        held = counts > 0
        # clamped: rounding can take 1 - cos a hair below 0
        distance = (1 - F.cosine_similarity(prototypes, means, dim=1)).clamp_min(0).double()
        distance_sum += torch.where(held, distance, 0.0)
        present += held
    return distance_sum, present


def frequency_thirds(counts: torch.Tensor) -> dict[str, list[int]]:
    """Head / middle / tail: the intents the split holds, in thirds by their utterances."""
    from mvcl_fast.intent.metrics import frequency_groups

    held = torch.nonzero(counts > 0).flatten()
    return {name: held[positions].tolist()
            for name, positions in frequency_groups(counts[held].tolist()).items()}


def save_prototypes_png(results: dict, file) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["batch_sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for name, group in results["groups"].items():
            label = f"{name} ({len(group['intents'])} intents)"
            distance = [math.nan if d is None else d for d in group["distance"]]
            left.plot(sizes, distance, marker="o", label=label)
            right.plot(sizes, group["absent_share"], marker="o", label=label)
        for ax, title in ((left, "1 - cos(batch prototype, split mean)"),
                          (right, "share of batches without the intent")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.set_title(title, fontsize=10)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        right.set_ylim(top=1.02)
        left.legend(fontsize=8)
        fig.suptitle(f"{results['run']}: {results['batches']} random batches of the training "
                     f"split per size", fontsize=10)
        fig.tight_layout()
        fig.savefig(file, format="png", dpi=100)
    finally:
        plt.close(fig)


def analyze_prototypes(args: argparse.Namespace) -> dict:
    loaded = loaded_run(args.run, args)
    split = run_split(loaded, args, "train")
    sizes = sorted(set(args.batch_sizes))
    if sizes[-1] > len(split):
        raise ConfigError(f"--batch-sizes {sizes[-1]}: the training split of {args.run} holds "
                          f"{len(split)} utterances", f"pass batch sizes up to {len(split)}")
    z, _ = embed(loaded, split, args, f"{args.run} train")
    names, labels = loaded.label_names, split.labels
    counts = torch.bincount(labels, minlength=len(names))
    generator = torch.Generator().manual_seed(args.seed)
    drift = {b: prototype_drift(z, labels, len(names), b, args.batches, generator) for b in sizes}

    def mean_distance(classes, b) -> Optional[float]:
        distance_sum, present = drift[b]
        pairs = int(present[classes].sum())   # (intent, batch) pairs with the intent in the batch
        return round(float(distance_sum[classes].sum()) / pairs, 6) if pairs else None

    def absent_share(classes, b) -> float:
        return round(1 - float(drift[b][1][classes].sum()) / (len(classes) * args.batches), 6)

    groups = frequency_thirds(counts)
    results = {
        "run": str(args.run), "split": "train", "utterances": len(split),
        "embedding": EMBEDDING_NOTE,
        "distance": PROTOTYPE_DISTANCE, "absent_share": "share of the batches without the intent",
        "batches": args.batches, "seed": args.seed, "batch_sizes": sizes,
        "groups": {name: {"intents": [names[c] for c in classes],
                          "utterances": int(counts[classes].sum()),
                          "distance": [mean_distance(classes, b) for b in sizes],
                          "absent_share": [absent_share(classes, b) for b in sizes]}
                   for name, classes in groups.items() if classes},
        "per_intent": {names[c]: {"utterances": int(counts[c]),
                                  "distance": [mean_distance([c], b) for b in sizes],
                                  "absent_share": [absent_share([c], b) for b in sizes]}
                       for c in torch.nonzero(counts > 0).flatten().tolist()},
        "intents_without_utterances": [names[c] for c in range(len(names)) if counts[c] == 0],
    }
    write_outputs(output_path(args), lambda file: save_prototypes_png(results, file), results)
    print(f"{args.run}: {len(split)} training utterances, {args.batches} batches per size; "
          "mean cosine distance of the batch prototypes to the split means / share of batches "
          "without the intent:")
    print("batch size  " + "  ".join(f"{name:>15}" for name in results["groups"]))
    for i, b in enumerate(sizes):
        cells = [f"{'-' if g['distance'][i] is None else format(g['distance'][i], '.4f'):>7} / "
                 f"{g['absent_share'][i]:.2f}" for g in results["groups"].values()]
        print(f"{b:>10}  " + "  ".join(f"{c:>15}" for c in cells))
    return results


# ------------------------------------------------------------------------ main
def write_outputs(png: Path, draw, results: dict) -> None:
    """The figure (draw(file)) at png and the results as JSON beside it, each replaced atomically."""
    folder = png.parent
    runs.make_output_folder(folder, "--output")
    runs.replace_file(folder, png.name, draw, option="--output")
    json_name = png.with_suffix(".json").name
    runs.replace_file(folder, json_name,
                      lambda file: file.write((json.dumps(results, indent=1) + "\n").encode()),
                      option="--output")
    print(f"wrote {png} and {folder / json_name}")


ANALYSES = {"embeddings": analyze_embeddings, "prototypes": analyze_prototypes}


def main(argv=None) -> int:
    def analyze(args: argparse.Namespace) -> int:
        ANALYSES[args.command](args)
        return 0

    return run_command(analyze_parser(), argv, analyze, lambda args: output_path(args).parent)
