"""Seeded fuzzing of the data loader and the checkpoint reader.

Inputs: TSVs, feature pickles, synthetic.json and checkpoints built at random
from the types they may hold, and real files damaged (truncated, bits flipped,
runs of bytes overwritten, inserted or deleted): the synthetic set's files, a
checkpoint in best.pt's layout, a converted feature cache. The outcome of each
must be a loaded split (every frame read) or a checkpoint's dict, else one
line naming the file in a DataError / CheckpointError, the errors the commands
print without a traceback (anything else fails the test); no file is written
outside the cache folder, and memory stays flat. The generator is seeded and
the number of cases fixed, so every run sees the same inputs (a few seconds in
all).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import resource
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import mvcl_fast.intent.synthetic as synthetic
from mvcl_fast.intent.checkpoints import CHECKPOINT_FORMAT, load_checkpoint
from mvcl_fast.intent.data import DATASETS, SYNTHETIC_META, MultimodalSplit, load_split
from mvcl_fast.intent.errors import CheckpointError, DataError, reraised_as

SEED = 26
DATA_CASES = 600
CACHE_CASES = 60
CHECKPOINT_CASES = 400
DATA_FILES = ("train.tsv", "video_feats.pkl", "audio_feats.pkl", SYNTHETIC_META)
LABELS = DATASETS["mintrec"].labels
PEAK_MEMORY_GROWTH = 1 << 30   # bytes of resident memory the whole fuzz may add


# ---------------------------------------------------------------- write watch

class WriteWatch:
    """An audit hook that records every file the process opens for writing, renames, removes
    or creates outside the allowed folders while it is active (audit hooks cannot be removed:
    it is installed once and idles in between)."""

    EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod",
              "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.copyfile")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    installed = None

    def __init__(self):
        self.allowed: tuple[str, ...] | None = None
        self.outside: list[tuple[str, str]] = []

    @classmethod
    def get(cls) -> "WriteWatch":
        if cls.installed is None:
            cls.installed = cls()
            sys.addaudithook(cls.installed)
        return cls.installed

    def __call__(self, event, args):
        if self.allowed is None:
            return
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(flags, int) and flags & self.WRITE_FLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            paths = [path] if writes else []
        elif event in self.EVENTS:
            paths = args[:2]
        else:
            return
        for path in paths:
            if not isinstance(path, (str, bytes, os.PathLike)):   # a descriptor or a flag
                continue
            where = os.path.realpath(os.fsdecode(path))
            # the interpreter's bytecode cache, for a module first imported on an error path
            inside = (where + os.sep).startswith(self.allowed)
            if not inside and Path(where).parent.name != "__pycache__":
                self.outside.append((event, where))

    @contextlib.contextmanager
    def only_under(self, *folders: Path):
        self.allowed = tuple(os.path.realpath(f) + os.sep for f in folders)
        try:
            yield
        finally:
            self.allowed = None


def test_the_write_watch_sees_writes_outside_the_allowed_folders(tmp_path):
    watch = WriteWatch.get()
    (tmp_path / "allowed").mkdir()
    with watch.only_under(tmp_path / "allowed"):
        (tmp_path / "allowed" / "a").write_text("x")
        os.replace(tmp_path / "allowed" / "a", tmp_path / "allowed" / "b")
        (tmp_path / "allowed" / "b").read_text()
        (tmp_path / "outside").write_text("x")
        os.replace(tmp_path / "allowed" / "b", tmp_path / "moved")
    outside, watch.outside = watch.outside, []
    assert outside == [("open", str(tmp_path / "outside")), ("os.rename", str(tmp_path / "moved"))]


# ------------------------------------------------------------------ generators

def random_text(rng: random.Random, longest: int = 24) -> str:
    pieces = ["a", "Z", " ", "\t", '"', "'", "\\", "\r", "\n", "\x00", "é", "\u2028", "🙂",
              "{}", "%s", "_", "1", "-", "\ufeff"]
    if rng.random() < 0.01:
        return "x" * 200_000   # past csv's field size limit
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(longest)))


def random_tsv(rng: random.Random, keys: list[str]) -> bytes:
    header = ["season", "episode", "clip", "text", "label"]
    shape = rng.random()
    if shape < 0.15:
        rng.shuffle(header)
    elif shape < 0.25:
        header = [h.upper() for h in header]
    elif shape < 0.35:
        del header[rng.randrange(len(header))]
    elif shape < 0.45:
        header.insert(rng.randrange(len(header) + 1), random_text(rng, 6))
    lines = ["\t".join(header)]
    for _ in range(rng.randrange(8)):
        season, episode, clip = (rng.choice(keys) if rng.random() < 0.85
                                 else "_".join(random_text(rng, 4) for _ in range(3))).split("_", 2)
        label = rng.choice(LABELS) if rng.random() < 0.85 else random_text(rng)
        by_name = {"season": season, "episode": episode, "clip": clip, "label": label,
                   "text": random_text(rng)}
        row = [by_name.get(h, random_text(rng, 4)) for h in header]
        if rng.random() < 0.1:
            row = row[:rng.randrange(len(row) + 1)] + [random_text(rng, 4)] * rng.randrange(2)
        lines.append("\t".join(row))
    newline = rng.choice(["\n", "\r\n", "\r"])
    text = newline.join(lines) + rng.choice(["", newline, newline * 3])
    encoding = rng.choice(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"])
    return text.encode(encoding, errors="replace")


def random_array(rng: random.Random, width: int) -> np.ndarray:
    gen = np.random.default_rng(rng.randrange(2**32))
    frames = rng.choice([1, 2, 5, 0]) if rng.random() < 0.9 else rng.randrange(40)
    shape = rng.choice([(frames, width), (frames, width), (frames, 1, width), (width,),
                        (frames, 2, width), (frames, rng.randrange(4)), ()])
    dtype = rng.choice(["<f4", "<f4", ">f4", "<f8", "<f2", "<i8", "u1", "?", "<c8", "<U3",
                        "O", "f4,f4", "<M8[s]"])
    values = gen.standard_normal(shape)
    if values.size and rng.random() < 0.1:
        values.flat[gen.integers(values.size)] = rng.choice([np.nan, np.inf, 1e39, -1e300])
    if dtype == "O":
        return np.array(values.tolist() if shape else values.item(), dtype=object)
    with np.errstate(all="ignore"):
        return values.astype(dtype) if dtype not in ("f4,f4", "<M8[s]") else np.zeros(shape, dtype)


def random_value(rng: random.Random, width: int, depth: int = 2):
    kind = rng.randrange(10 if depth else 7)
    if kind < 3:
        return random_array(rng, width)
    if kind == 3:
        return rng.choice([0, -1, 2**70, 1.5, float("nan"), float("inf"), True, None])
    if kind == 4:
        return random_text(rng)
    if kind == 5:
        return rng.choice([b"", b"\x00" * 7, np.float32(2.5), np.int64(3), np.dtype("f4")])
    if kind == 6:
        return random_array(rng, width).reshape(-1)[:1].copy()
    items = [random_value(rng, width, depth - 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return items
    if kind == 8:
        return tuple(items)
    return {random_text(rng, 4): item for item in items}


def random_features(rng: random.Random, keys: list[str], width: int) -> bytes:
    if rng.random() < 0.05:
        feats = random_value(rng, width)
    else:
        feats = {}
        for key in keys:
            if rng.random() < 0.95:
                feats[key] = (random_array(rng, width) if rng.random() < 0.3 else
                              np.random.default_rng(len(feats)).standard_normal(
                                  (rng.randrange(1, 6), width)).astype(np.float32))
        for _ in range(rng.choice([0, 0, 1, 3])):
            key = rng.choice([random_text(rng, 8), 7, (1, 2), b"key", None])
            feats[key] = random_value(rng, width)
    return pickle.dumps(feats, protocol=rng.choice([2, 3, 4, 5]))


def random_meta(rng: random.Random) -> bytes:
    value = rng.choice([
        {"video_len": rng.choice([1, 4, 0, -3, 1e8, 10**8, "4", True, None, 2.0, [4]]),
         "audio_len": rng.choice([4, 10_000, 10_001, 1.5])},
        {}, [], [4, 4], "video_len", 3, None, {"audio_len": 4}])
    text = json.dumps(value)
    if rng.random() < 0.2:
        text = rng.choice(["[" * 100_000, "{", "", "NaN", "1" * 5000, "\xff"]) + text
    return text.encode("utf-8", errors="surrogatepass")


def mutate(rng: random.Random, blob: bytes, span: int | None = None) -> bytes:
    """A truncation, bit flips, an overwritten, inserted or deleted run of bytes, in the first
    span bytes (default: anywhere)."""
    data = bytearray(blob)
    span = len(data) if span is None else min(span, len(data))
    kind = rng.randrange(5)
    at = rng.randrange(span + 1)
    if kind == 0:
        del data[at:]
    elif kind == 1:
        for _ in range(rng.randint(1, 8)):
            if span:
                i = rng.randrange(span)
                data[i] ^= 1 << rng.randrange(8)
    elif kind == 2:
        run = rng.randbytes(rng.randint(1, 64))
        data[at:at + len(run)] = run
    elif kind == 3:
        data[at:at] = rng.randbytes(rng.randint(1, 64))
    else:
        del data[at:at + rng.randint(1, 256)]
    return bytes(data)


# ----------------------------------------------------------------- the loader

@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    folder = synthetic.write_synthetic_mintrec(tmp_path_factory.mktemp("fuzz") / "real", n_train=6,
                                               n_dev=2, n_test=2, video_len=4, audio_len=5)
    keys = [line.split("\t")[:3] for line in (folder / "train.tsv").read_text().splitlines()[1:]]
    return folder, ["_".join(k) for k in keys]


def load_outcome(folder: Path, cache: Path, root: Path) -> str:
    """What the commands do with the folder: its train split (every frame read) or a DataError
    (their one-line error), which must name a file of the case."""
    try:
        with reraised_as(DataError, "", "check --data-dir"):
            split = load_split(folder, "mintrec", "train", cache_dir=cache)
    except DataError as err:
        message = str(err)
        assert "\n" not in message and str(root) in message, message
        return "error"
    assert isinstance(split, MultimodalSplit) and len(split) > 0
    for frames in (split.video, split.audio):
        batch = frames[:]
        assert batch.shape == frames.shape and torch.isfinite(batch).all()
        assert ((frames.lengths >= 1) & (frames.lengths <= frames.max_len)).all()
    return "loaded"


def damage_cache(rng: random.Random, victim: Path) -> None:
    """Any damage to the index (a zip with CRCs); to the frames, a changed length or header.
    The frames' data has no checksum (checking one would read the whole cache on every load):
    a flipped bit in it is read as it is."""
    blob = victim.read_bytes()
    if victim.name.endswith(".frames.npy"):
        header = np.load(victim, mmap_mode="r").offset
        blob = blob[:rng.randrange(len(blob))] if rng.random() < 0.3 else mutate(rng, blob, header)
    else:
        blob = mutate(rng, blob)
    victim.write_bytes(blob)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_fuzz_the_data_loader(real_set, tmp_path):
    real, keys = real_set
    watch = WriteWatch.get()
    rng = random.Random(SEED)
    originals = {name: (real / name).read_bytes() for name in DATA_FILES}
    widths = {"video_feats.pkl": synthetic.VIDEO_DIM, "audio_feats.pkl": synthetic.AUDIO_DIM}
    load_outcome(real, tmp_path / "cache", real)   # imports what a load needs before the watch
    peak = peak_rss()
    outcomes = {}
    for case in range(DATA_CASES + CACHE_CASES):
        folder, cache = tmp_path / f"case{case}", tmp_path / f"cache{case}"
        folder.mkdir()
        for name, blob in originals.items():
            (folder / name).write_bytes(blob)
        if case >= DATA_CASES:   # a converted cache, damaged
            with watch.only_under(cache):
                assert load_outcome(folder, cache, folder) == "loaded"
            damage_cache(rng, rng.choice(sorted(p for p in cache.rglob("*") if p.is_file())))
            how = "cache"
        else:
            name = rng.choice(DATA_FILES)
            how = rng.choice(["mutate", "mutate", "random"])
            if how == "mutate":
                blob = mutate(rng, originals[name])
            elif name == "train.tsv":
                blob = random_tsv(rng, keys)
            elif name in widths:
                blob = random_features(rng, keys, widths[name])
            else:
                blob = random_meta(rng)
            (folder / name).write_bytes(blob)
        with watch.only_under(cache):
            outcome = load_outcome(folder, cache, tmp_path)
        assert not watch.outside, (case, watch.outside)
        outcomes[how, outcome] = outcomes.get((how, outcome), 0) + 1
        shutil.rmtree(folder)
        shutil.rmtree(cache, ignore_errors=True)
    assert peak_rss() - peak < PEAK_MEMORY_GROWTH
    # The cases reach both outcomes from every kind of input.
    assert all(outcomes.get((how, "loaded")) and outcomes.get((how, "error"))
               for how in ("mutate", "random")), outcomes
    assert outcomes.get(("cache", "loaded")), outcomes


# ------------------------------------------------------------ the checkpoints

def best_checkpoint() -> dict:
    """A checkpoint in best.pt's layout, with a small model."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    return {"format": CHECKPOINT_FORMAT, "args": {"lr": 5e-5, "data_dir": None, "seed": 0},
            "model_config": {"num_labels": len(LABELS), "video_dim": 256},
            "label_names": list(LABELS), "epoch": 2, "dev": {"acc": 0.5, "f1": 0.25},
            "train_label_counts": list(range(len(LABELS))), "model": model.state_dict()}


def random_state(rng: random.Random, depth: int = 2):
    kind = rng.randrange(9 if depth else 5)
    if kind == 0:
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                            torch.uint8, torch.complex64])
        shape = [rng.randrange(4) for _ in range(rng.randrange(4))]
        tensor = torch.zeros(shape, dtype=dtype)
        return tensor.t() if tensor.dim() == 2 and rng.random() < 0.2 else tensor
    if kind == 1:
        return rng.choice([0, 2**70, -1.5, float("nan"), True, None, CHECKPOINT_FORMAT])
    if kind == 2:
        return random_text(rng, 8)
    if kind == 3:
        return rng.choice([b"", torch.float32, torch.device("cpu"), torch.Size([2, 3])])
    if kind == 4:
        return {"format": CHECKPOINT_FORMAT}
    items = [random_state(rng, depth - 1) for _ in range(rng.randrange(4))]
    if kind in (5, 6):
        return {**({"format": CHECKPOINT_FORMAT} if kind == 5 else {}),
                **{random_text(rng, 6): item for item in items}}
    return items if kind == 7 else tuple(items)


def mutate_member(rng: random.Random, blob: bytes) -> bytes:
    """The checkpoint with one zip member's bytes mutated and the zip rewritten around them
    (valid CRCs), so the mutation reaches torch's unpickler or its storages."""
    with zipfile.ZipFile(io.BytesIO(blob)) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    victim = rng.choice([i for i, (info, _) in enumerate(members)
                         if not info.filename.endswith(("version", "byteorder"))])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for i, (info, data) in enumerate(members):
            dst.writestr(info.filename, mutate(rng, data) if i == victim else data)
    return out.getvalue()


# torch's weights-only unpickler warns about a class of its own while it refuses a mutated file
@pytest.mark.filterwarnings("ignore:Defining your `__torch_function__` as a plain method")
def test_fuzz_the_checkpoint_reader(tmp_path):
    watch = WriteWatch.get()
    rng = random.Random(SEED)
    buffer = io.BytesIO()
    torch.save(best_checkpoint(), buffer)
    real = buffer.getvalue()
    path = tmp_path / "best.pt"
    path.write_bytes(real)
    assert load_checkpoint(path)["label_names"] == list(LABELS)
    peak = peak_rss()
    outcomes, escaped = {}, []
    for case in range(CHECKPOINT_CASES):
        how = rng.choice(["bytes", "member", "member", "random"])
        if how == "bytes":
            blob = mutate(rng, real)
        elif how == "member":
            blob = mutate_member(rng, real)
        else:
            buffer = io.BytesIO()
            torch.save(random_state(rng), buffer)
            blob = buffer.getvalue()
        path.write_bytes(blob)
        with watch.only_under():   # reading writes nothing
            try:
                state = load_checkpoint(path)
            except CheckpointError as err:
                assert "\n" not in str(err) and str(path) in str(err), (case, str(err))
                outcome = "error"
            except Exception as err:   # noqa: BLE001 (every other exception is the finding)
                kind = f"{type(err).__module__}.{type(err).__name__}"
                escaped.append(f"case {case} ({how}): {kind}: {err}")
                outcome = "escaped"
            else:
                assert isinstance(state, dict) and state["format"] == CHECKPOINT_FORMAT
                outcome = "loaded"
        assert not watch.outside, (case, watch.outside)
        outcomes[how, outcome] = outcomes.get((how, outcome), 0) + 1
    assert not escaped, "\n".join(escaped)
    assert peak_rss() - peak < PEAK_MEMORY_GROWTH
    assert all(outcomes.get((how, "error")) for how in ("bytes", "member", "random")), outcomes
    assert outcomes.get(("random", "loaded")), outcomes
