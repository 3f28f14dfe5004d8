"""Batch prototypes against the EMA bank (--prototypes batch | ema) across batch sizes, on a CPU.

For each batch size and prototype mode, ``mvcl_fast.train --seeds ...`` trains
one run per seed on a synthetic MIntRec-format set (written by
``mvcl_fast.intent.synthetic``) and summarises them; this script collects the test
figures (ACC, macro F1, the tail third of the intents' macro F1: the rare
intents, which small batches miss most often) into a markdown table and a plot.

The default size is chosen so that the whole grid (3 batch sizes x 2 modes x
3 seeds = 18 runs) fits in about 15 minutes on a 2-core CPU: a smaller set
(500 / 125 / 250 utterances, 16 video / 24 audio frames), all-MiniLM-L6-v2
cut to its first --text-layers layers and to the word pieces of the set
(the pieces' embeddings and those layers keep their pretrained weights),
narrow video / audio encoders (width 32, one video layer), two epochs.
These are figures of a small model on a synthetic set, for comparing the two
modes with each other, not MIntRec accuracy.

    OMP_NUM_THREADS=1 python -m benchmarks.prototype_bank      # or python benchmarks/prototype_bank.py
    python benchmarks/prototype_bank.py --runs-dir runs/prototype-bank   # keep the runs (best.pt)

Writes prototype_bank.md, prototype_bank.png and prototype_bank.json into
--output-dir (default benchmarks/results/). Not part of ``make bench``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):     # run as a file: the repository root on the path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvcl_fast.intent import options, runs, train  # noqa: E402
from mvcl_fast.intent.loading import quiet_transformers  # noqa: E402
from mvcl_fast.intent.synthetic import ensure_synthetic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(".cache") / "prototype-bank"
MODES = ("batch", "ema")
# The figures of the table: (metrics.json section, key, column title).
FIGURES = (("test", "acc", "test ACC"), ("test", "f1", "test macro F1"),
           ("test_groups/tail", "f1", "tail macro F1"))


def parse_args(argv=None) -> argparse.Namespace:
    number = options.number
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.prototype_bank",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=options.HelpFormatter)
    p.add_argument("--batch-sizes", nargs="+", type=number(int, at_least=1), default=[8, 16, 32],
                   metavar="N", help="training batch sizes")
    p.add_argument("--seeds", nargs="+", type=number(int, at_least=0), default=[0, 1, 2],
                   metavar="SEED", help="one run per seed, at least two")
    p.add_argument("--epochs", type=number(int, at_least=1), default=2,
                   help="epochs of every run (also its patience: no early stop)")
    p.add_argument("--momentum", type=number(float, at_least=0, below=1), default=0.9,
                   help="--prototype-momentum of the ema runs")
    p.add_argument("--text-layers", type=number(int, at_least=1), default=2,
                   help="layers of all-MiniLM-L6-v2 kept")
    p.add_argument("--train", type=number(int, at_least=20), default=500,
                   help="training utterances of the synthetic set")
    p.add_argument("--dev", type=number(int, at_least=20), default=125,
                   help="dev utterances of the synthetic set")
    p.add_argument("--test", type=number(int, at_least=20), default=250,
                   help="test utterances of the synthetic set")
    p.add_argument("--output-dir", type=Path, default=RESULTS, metavar="DIR",
                   help="where the table, the plot and the JSON go")
    p.add_argument("--runs-dir", type=Path, default=None, metavar="DIR",
                   help="keep the runs here (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    if len(set(args.seeds)) < 2:
        p.error("argument --seeds: at least two different seeds (a mean and a spread)")
    return args


def small_text_model(layers: int, data_dir: Path, folder: Path) -> Path:
    """all-MiniLM-L6-v2 (the trainer's default) cut to its first `layers` layers and to the word
    pieces the data set's texts and intent names use (their embedding rows kept), saved once.

    Greedy longest-match WordPiece over a subset of the vocabulary that holds every piece the
    full tokenizer produced for these texts splits them into the same pieces: no text changes.
    The cut vocabulary (a few hundred pieces instead of 30,522) is what makes a CPU step fast:
    the embedding matrices of the two encoders were most of the weights AdamW updates.
    """
    from transformers import AutoModel, AutoTokenizer, BertTokenizer

    from mvcl_fast.intent.data import SPLITS, dataset_info, load_split
    from mvcl_fast.intent.model import default_text_model

    if (folder / "config.json").is_file():
        return folder
    source = default_text_model()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    texts = [t for split in SPLITS for t in load_split(data_dir, "mintrec", split).texts]
    texts += list(dataset_info("mintrec").labels)
    used = set(tokenizer.all_special_ids)
    for text in texts:
        used.update(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)))
    ids = sorted(used)
    vocab = tokenizer.convert_ids_to_tokens(ids)

    model = AutoModel.from_pretrained(source, local_files_only=True)
    model.encoder.layer = model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    rows = model.embeddings.word_embeddings.weight.data[ids].clone()
    model.resize_token_embeddings(len(ids))
    model.embeddings.word_embeddings.weight.data.copy_(rows)
    model.config.pad_token_id = vocab.index(tokenizer.pad_token)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    small = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True,
                          model_max_length=tokenizer.model_max_length)
    assert all(small.tokenize(t) == tokenizer.tokenize(t) for t in texts), "a text splits otherwise"
    small.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def train_seeds(args, data_dir: Path, text_model: Path, batch_size: int, mode: str,
                out_dir: Path) -> tuple[dict, float]:
    """One run per seed (train --seeds); (their summary.json, wall seconds)."""
    command = ["--data-dir", str(data_dir), "--text-model", str(text_model),
               "--output-dir", str(out_dir), "--batch-size", str(batch_size),
               "--epochs", str(args.epochs), "--patience", str(args.epochs),
               "--video-width", "32", "--video-layers", "1", "--audio-width", "32",
               "--fusion-heads", "4", "--compile", "off", "--device", "cpu",
               "--prototypes", mode, "--seeds", *map(str, args.seeds), "--overwrite"]
    if mode == "ema":
        command += ["--prototype-momentum", str(args.momentum)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as log:     # each run keeps its train.log
        code = train.main(command)
    seconds = time.perf_counter() - start
    if code:
        sys.exit(f"batch {batch_size}, {mode}: the trainer exited with {code}:\n"
                 + log.getvalue()[-2000:])
    for seed in args.seeds:   # the table needs metrics.json; analyses need best.pt, not last.pt
        (out_dir / f"seed-{seed}" / runs.LAST_CHECKPOINT).unlink(missing_ok=True)
    return json.loads((out_dir / "summary.json").read_text()), seconds


def overall(summary: dict) -> dict:
    """The seeds' summary without its per-intent sections (the table reads test, dev, groups)."""
    return {**summary, "metrics": {k: v for k, v in summary["metrics"].items()
                                   if not k.startswith("test_per_class/")}}


def cell(summary: dict, section: str, key: str) -> str:
    figure = summary["metrics"][section][key]
    return f"{figure['mean']:.2f} ± {figure['std']:.2f}"


def markdown(rows: list[dict], args) -> str:
    head = ["batch size", "prototypes", *(title for _, _, title in FIGURES), "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join([str(row["batch_size"]), row["mode"],
                                        *(cell(row["summary"], s, k) for s, k, _ in FIGURES),
                                        f"{row['seconds'] / len(args.seeds):.0f}"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = FIGURES[1:]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    try:
        for ax, (section, key, title) in zip(axes, panels):
            for offset, mode in zip((-0.03, 0.03), MODES):
                mine = [r for r in rows if r["mode"] == mode]
                sizes = [r["batch_size"] * 2 ** offset for r in mine]
                figures = [r["summary"]["metrics"][section][key] for r in mine]
                ax.errorbar(sizes, [f["mean"] for f in figures], yerr=[f["std"] for f in figures],
                            marker="o", capsize=3, label=f"--prototypes {mode}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.set_title(f"{title} (mean ± std, {len(args.seeds)} seeds)", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("synthetic MIntRec-format set, small model, 2-core CPU: not MIntRec accuracy",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers(Path(__file__).name)
    started = time.perf_counter()
    data_dir = ensure_synthetic(CACHE / "data", n_train=args.train, n_dev=args.dev,
                                n_test=args.test, video_len=16, audio_len=24)
    # one per data set: its vocabulary is the set's
    text_model = small_text_model(args.text_layers, data_dir,
                                  CACHE / f"minilm-{args.text_layers}-layers-{data_dir.name}")
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="prototype-bank-"))
    rows = []
    try:
        for batch_size in args.batch_sizes:
            for mode in MODES:
                summary, seconds = train_seeds(args, data_dir, text_model, batch_size, mode,
                                               runs_dir / f"batch-{batch_size}-{mode}")
                rows.append({"batch_size": batch_size, "mode": mode, "seconds": round(seconds, 1),
                             "summary": overall(summary)})
                print(f"batch {batch_size:>3} {mode:<5} " + "  ".join(
                    f"{title} {cell(summary, s, k)}" for s, k, title in FIGURES)
                    + f"  ({seconds:.0f} s for {len(args.seeds)} seeds)", flush=True)
    finally:
        if args.runs_dir is None:
            shutil.rmtree(runs_dir, ignore_errors=True)
    wall = time.perf_counter() - started
    args.output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args)
    (args.output_dir / "prototype_bank.md").write_text(table + "\n")
    plot(rows, args, args.output_dir / "prototype_bank.png")
    import torch

    setup = {k: v for k, v in vars(args).items() if k not in ("output_dir", "runs_dir")}
    (args.output_dir / "prototype_bank.json").write_text(json.dumps({
        "setup": setup, "wall_seconds": round(wall, 1),
        "environment": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows}, indent=1) + "\n")
    print(f"\n{table}\n\n{len(rows) * len(args.seeds)} runs in {wall:.0f} s; "
          f"wrote {args.output_dir}/prototype_bank.md, .png and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
