"""Peak memory of loading MIntRec / MIntRec2.0-shaped data sets (CPU).

For each shape and clip count, a folder in the release layout is written
(MIntRec: the pickles beside the TSVs, video 230 x 256, audio 480 x 768;
MIntRec2.0: ``in-scope/`` with ``video_data/swin_roi_binary.pkl`` 180 x 256
and ``audio_data/wavlm_feats_binary.pkl`` 400 x 768; each clip with a random
number of frames between half and all of these lengths, splits 60/20/20).
Then, each in a fresh subprocess:

- baseline: torch, numpy and ``mvcl_fast.intent.data`` imported, nothing loaded;
- first load: ``load_split`` of the three splits with an empty cache (the
  one-time conversion of each pickle), then one epoch of training batches
  (DataLoader, batch 32, shuffled);
- second load: the same with the cache in place.

Reported: the pickles' size, the peak resident set of each subprocess
(``VmHWM``, file-backed mapped pages included: ``ru_maxrss`` would do, but
Linux carries it over from the forking parent across exec) and its excess
over the baseline, the load and epoch wall times. Values are random (only
their sizes matter here).

    python benchmarks/bench_data_memory.py                       # 500 and 2,000 clips
    python benchmarks/bench_data_memory.py --clips 8000 --shapes mintrec2
    python benchmarks/bench_data_memory.py --json results.json

Not part of ``make bench`` / ``make test`` (the large cases write ~10 GB of
pickles and as much cache; the folder is removed after each case unless
--keep).
"""
from __future__ import annotations

import argparse
import json
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mvcl_fast.intent.data import MultimodalDataset, collate, dataset_info, load_split

SHAPES = {
    # name: dataset, (video frames, width), (audio frames, width), TSV folder, video / audio pickles
    "mintrec": dict(dataset="mintrec", video=(230, 256), audio=(480, 768), tsv_folder=".",
                    video_file="video_feats.pkl", audio_file="audio_feats.pkl"),
    "mintrec2": dict(dataset="mintrec2", video=(180, 256), audio=(400, 768), tsv_folder="in-scope",
                     video_file="video_data/swin_roi_binary.pkl",
                     audio_file="audio_data/wavlm_feats_binary.pkl"),
}
SPLIT_SHARES = (("train", 0.6), ("dev", 0.2), ("test", 0.2))
BLOCK_ROWS = 1024   # clips are views into one random block: writing 10 GB needs no 10 GB of RAM
GB = 1e9


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM of /proc/self/status, Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GB
    raise SystemExit("bench_data_memory needs Linux (/proc/self/status VmHWM)")


def write_folder(root: Path, shape: dict, clips: int, seed: int = 0) -> int:
    """Write the data set; return the bytes of its two pickles."""
    info = dataset_info(shape["dataset"])
    folder = root / shape["tsv_folder"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = ([f"dia{i // 10}_utt{i % 10}" for i in range(clips)] if info.name == "mintrec2"
            else [f"S01_E{i // 100:02d}_{i % 100}" for i in range(clips)])
    start = 0
    for split, share in SPLIT_SHARES:
        n = round(share * clips) if split != "test" else clips - start
        lines = ["\t".join(info.columns)]
        for i in range(start, start + n):
            fields = keys[i].replace("dia", "").replace("utt", "").split("_")
            lines.append("\t".join([*fields, f"Utterance {i}.", info.labels[i % len(info.labels)]]))
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        start += n
    total = 0
    for modality, name in (("video", shape["video_file"]), ("audio", shape["audio_file"])):
        frames, dim = shape[modality]
        block = rng.standard_normal((frames + BLOCK_ROWS, dim), dtype=np.float32)
        lengths = rng.integers(frames // 2, frames + 1, size=clips)
        feats = {key: block[i % BLOCK_ROWS:i % BLOCK_ROWS + t]
                 for i, (key, t) in enumerate(zip(keys, lengths))}
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(feats, f, protocol=4)
        total += path.stat().st_size
    return total


def child(folder: str, dataset: str, cache_dir: str, batch_size: int, workers: int) -> dict:
    """One measured process: load the three splits, then one epoch of training batches."""
    start = time.perf_counter()
    splits = {s: load_split(folder, dataset, s, cache_dir=cache_dir) for s, _ in SPLIT_SHARES}
    loaded = time.perf_counter()
    loader = torch.utils.data.DataLoader(MultimodalDataset(splits["train"]), batch_size=batch_size,
                                         shuffle=True, collate_fn=collate, num_workers=workers)
    batches = sum(1 for _ in loader)
    done = time.perf_counter()
    return {"load_s": loaded - start, "epoch_s": done - loaded, "batches": batches,
            "peak_rss_gb": peak_rss_gb(),
            # The largest forked DataLoader worker (its count starts from the pages it shares with
            # this process at the fork: an upper bound).
            "workers_peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB}


def baseline() -> dict:
    """The process with torch, numpy and mvcl_fast.intent.data imported, nothing loaded."""
    return {"peak_rss_gb": peak_rss_gb()}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measurement subprocess {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def measure(shape_name: str, clips: int, workdir: Path, batch_size: int, workers: int,
            keep: bool) -> dict:
    shape = SHAPES[shape_name]
    root = Path(tempfile.mkdtemp(prefix=f"{shape_name}-{clips}-", dir=workdir))
    try:
        t0 = time.perf_counter()
        pickle_bytes = write_folder(root, shape, clips)
        written = time.perf_counter() - t0
        base = run_child("--baseline")
        args = ["--child", str(root), shape["dataset"], str(root / "cache"), str(batch_size), str(workers)]
        first = run_child(*args)
        second = run_child(*args)
        cache_bytes = sum(p.stat().st_size for p in (root / "cache").rglob("*") if p.is_file())
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return {"shape": shape_name, "clips": clips, "pickles_gb": pickle_bytes / GB,
            "cache_gb": cache_bytes / GB, "write_s": written, "workers": workers,
            "baseline_rss_gb": base["peak_rss_gb"], "first": first, "second": second,
            "load_speedup": first["load_s"] / second["load_s"]}


def table(results: list[dict]) -> str:
    head = ("| shape | clips | pickles GB | baseline RSS GB | first load: peak RSS GB (+ over base) "
            "| load s | second load: peak RSS GB (+ over base) | load s | epoch s | speed-up |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        b, f, s = r["baseline_rss_gb"], r["first"], r["second"]
        rows.append(f"| {r['shape']} | {r['clips']:,} | {r['pickles_gb']:.2f} | {b:.2f} "
                    f"| {f['peak_rss_gb']:.2f} (+{f['peak_rss_gb'] - b:.2f}) | {f['load_s']:.1f} "
                    f"| {s['peak_rss_gb']:.2f} (+{s['peak_rss_gb'] - b:.2f}) | {s['load_s']:.2f} "
                    f"| {s['epoch_s']:.1f} | {r['load_speedup']:.0f}x |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--clips", nargs="+", type=int, default=[500, 2000])
    p.add_argument("--workdir", default=None, help="where the data sets are written (default: /tmp)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the epoch")
    p.add_argument("--keep", action="store_true", help="keep the generated folders")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", nargs=5, metavar=("FOLDER", "DATASET", "CACHE", "BATCH", "WORKERS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline:
        print(json.dumps(baseline()))
        return 0
    if args.child:
        folder, dataset, cache, batch, workers = args.child
        print(json.dumps(child(folder, dataset, cache, int(batch), int(workers))))
        return 0
    if min(args.clips) < 5:
        p.error("--clips: at least 5 clips (every split needs one)")
    workdir = Path(args.workdir or tempfile.gettempdir())
    results = []
    for shape in args.shapes:
        for clips in args.clips:
            results.append(measure(shape, clips, workdir, args.batch_size, args.workers, args.keep))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
