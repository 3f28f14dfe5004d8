"""MIntRec / MIntRec2.0 loader: the real benchmark layout, read exactly.

A data folder holds ``train.tsv``, ``dev.tsv``, ``test.tsv`` (tab-separated,
header row) and two pickles, ``video_feats.pkl`` and ``audio_feats.pkl``, each
a dict ``key -> array (T, D) or (T, 1, D)``. Rows are joined to features by a
key built from the TSV columns: ``season_episode_clip`` for MIntRec,
``dia{dialogue}_utt{utterance}`` for MIntRec2.0. Features are zero-padded or
truncated to a fixed length; the number of real frames is kept so that the
model can mask the padding.

The synthetic data set (mvcl_fast.synthetic) is written in the MIntRec layout
and goes through this same code path.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "dev", "test")
SYNTHETIC_META = "synthetic.json"  # written by mvcl_fast.synthetic next to the TSVs


@dataclass(frozen=True)
class DatasetInfo:
    """What a benchmark's files look like.

    ``key_columns`` and ``key_format`` say how a row's feature key is built;
    column names are canonical (lower case, words joined by ``_``): the header
    of a TSV is matched after the same normalisation, so ``Dialogue_id``,
    ``dialogue id`` and ``DIALOGUE_ID`` all name the column ``dialogue_id``.
    """

    name: str
    labels: tuple[str, ...]
    video_len: int
    video_dim: int
    audio_len: int
    audio_dim: int
    key_columns: tuple[str, ...]
    key_format: str
    text_column: str = "text"
    label_column: str = "label"
    # Feature pickles, tried in order (relative to the data folder).
    video_files: tuple[str, ...] = ("video_feats.pkl", "video_data/video_feats.pkl")
    audio_files: tuple[str, ...] = ("audio_feats.pkl", "audio_data/audio_feats.pkl")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.key_columns, self.text_column, self.label_column)

    def key(self, row: dict[str, str]) -> str:
        return self.key_format.format(**{c: row[c] for c in self.key_columns})


MINTREC_LABELS = (
    "Complain", "Praise", "Apologise", "Thank", "Criticize", "Care", "Agree", "Taunt",
    "Flaunt", "Joke", "Oppose", "Comfort", "Inform", "Advise", "Arrange", "Introduce",
    "Leave", "Prevent", "Greet", "Ask for help",
)

# The 30 in-scope intents in the order of thuiar/MIntRec2.0
# (data/single_turn/__init__.py, benchmarks['MIntRec2.0']['intent_labels']);
# out-of-scope utterances carry the label UNK, the last id.
MINTREC2_LABELS = (
    "Acknowledge", "Advise", "Agree", "Apologise", "Arrange",
    "Ask for help", "Asking for opinions", "Care", "Comfort", "Complain",
    "Confirm", "Criticize", "Doubt", "Emphasize", "Explain",
    "Flaunt", "Greet", "Inform", "Introduce", "Invite",
    "Joke", "Leave", "Oppose", "Plan", "Praise",
    "Prevent", "Refuse", "Taunt", "Thank", "Warn",
    "UNK",
)

DATASETS: dict[str, DatasetInfo] = {
    "mintrec": DatasetInfo(
        name="mintrec", labels=MINTREC_LABELS,
        video_len=230, video_dim=256, audio_len=480, audio_dim=768,
        key_columns=("season", "episode", "clip"), key_format="{season}_{episode}_{clip}",
    ),
    "mintrec2": DatasetInfo(
        name="mintrec2", labels=MINTREC2_LABELS,
        video_len=180, video_dim=256, audio_len=400, audio_dim=768,
        key_columns=("dialogue_id", "utterance_id"), key_format="dia{dialogue_id}_utt{utterance_id}",
        # The MIntRec2.0 release names its Swin ROI / WavLM pickles after the extractors.
        video_files=("video_feats.pkl", "swin_feats.pkl",
                     "video_data/video_feats.pkl", "video_data/swin_feats.pkl"),
        audio_files=("audio_feats.pkl", "wavlm_feats.pkl",
                     "audio_data/audio_feats.pkl", "audio_data/wavlm_feats.pkl"),
    ),
}


def dataset_info(dataset: str) -> DatasetInfo:
    name = dataset.lower().replace(".", "").replace("-", "").replace("_", "")
    name = {"mintrec20": "mintrec2"}.get(name, name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


@dataclass
class MultimodalSplit:
    """One split, padded: video [N, Tv, Dv], audio [N, Ta, Da] (float32, zero padding)."""

    texts: list[str]
    labels: torch.Tensor          # int64 [N]
    video: torch.Tensor           # float32 [N, Tv, Dv]
    audio: torch.Tensor           # float32 [N, Ta, Da]
    video_lengths: torch.Tensor   # int64 [N], real frames (>= 1)
    audio_lengths: torch.Tensor   # int64 [N]
    keys: list[str]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


# --------------------------------------------------------------------------- TSV

def _normalise_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lstrip("\ufeff").lower())


def _normalise_label(name: str) -> str:
    return " ".join(name.split()).lower()


def _read_rows(path: Path, info: DatasetInfo) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row; the header decides the columns."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"')
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty (expected a header row with columns "
                             f"{', '.join(info.columns)})")
        names = [_normalise_column(h) for h in header]
        missing = [c for c in info.columns if c not in names]
        if missing:
            raise ValueError(f"{path}: header row {header} lacks the column(s) {missing} "
                             f"needed for {info.name} (columns {', '.join(info.columns)}, "
                             f"matched case-insensitively)")
        where = {c: names.index(c) for c in info.columns}
        rows = []
        for fields in reader:
            line = reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if len(fields) != len(header):
                raise ValueError(f"{path}, line {line}: {len(fields)} tab-separated fields, "
                                 f"the header has {len(header)}: {fields!r}")
            rows.append((line, {c: fields[i].strip() if c != info.text_column else fields[i]
                                for c, i in where.items()}))
    return rows


# ---------------------------------------------------------------------- features

_FEATURE_CACHE: dict[str, tuple[int, int, dict]] = {}


def clear_feature_cache() -> None:
    _FEATURE_CACHE.clear()


def load_feature_pickle(path: str | os.PathLike) -> dict:
    """The pickled ``key -> array`` dict, loaded once per process (keyed by path,
    mtime and size, so a rewritten file is read again)."""
    path = Path(path).resolve()
    st = path.stat()
    hit = _FEATURE_CACHE.get(str(path))
    if hit is not None and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
        return hit[2]
    with open(path, "rb") as f:
        feats = pickle.load(f)
    if not isinstance(feats, dict):
        raise ValueError(f"{path}: expected a pickled dict key -> array, got {type(feats).__name__}")
    _FEATURE_CACHE[str(path)] = (st.st_mtime_ns, st.st_size, feats)
    return feats


def _find_file(data_dir: Path, candidates: tuple[str, ...], what: str) -> Path:
    for name in candidates:
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"{data_dir}: no {what} features file; looked for "
                            f"{', '.join(candidates)}")


def _as_frames(arr, path: Path, key: str, dim: int) -> np.ndarray:
    """(T, D) float32 from an array stored as (T, D) or (T, 1, D)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[1] == 1:
        arr = arr[:, 0, :]
    if arr.ndim != 2:
        raise ValueError(f"{path}: key {key!r} has shape {arr.shape}; expected (T, {dim}) "
                         f"or (T, 1, {dim})")
    if arr.shape[1] != dim:
        raise ValueError(f"{path}: key {key!r} has feature width {arr.shape[1]}, "
                         f"expected {dim} (shape {arr.shape})")
    if arr.shape[0] == 0:
        raise ValueError(f"{path}: key {key!r} has no frames (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{path}: key {key!r} holds {arr.dtype} data, not numbers")
    return arr


def _pad_features(feats: dict, keys: list[str], path: Path, max_len: int, dim: int):
    """Zero-padded [N, max_len, dim] float32 and real lengths [N]: frames up to the
    last row that is not all zero (at least 1), after truncation to max_len."""
    out = torch.zeros(len(keys), max_len, dim, dtype=torch.float32)
    lengths = torch.ones(len(keys), dtype=torch.int64)
    for i, key in enumerate(keys):
        if key not in feats:
            raise ValueError(f"{path}: no features for key {key!r} "
                             f"({len(feats)} keys in the file)")
        frames = _as_frames(feats[key], path, key, dim)[:max_len]
        nonzero = np.flatnonzero(np.any(frames != 0, axis=1))
        length = int(nonzero[-1]) + 1 if nonzero.size else 1
        out[i, :length] = torch.from_numpy(np.ascontiguousarray(frames[:length], dtype=np.float32))
        lengths[i] = length
    return out, lengths


# ------------------------------------------------------------------------ public

def load_split(data_dir: str | os.PathLike, dataset: str = "mintrec", split: str = "train", *,
               video_len: int | None = None, audio_len: int | None = None,
               video_feats_path: str | os.PathLike | None = None,
               audio_feats_path: str | os.PathLike | None = None) -> MultimodalSplit:
    """Read ``<data_dir>/<split>.tsv`` and its video/audio features.

    ``video_len`` / ``audio_len`` default to the lengths recorded by the
    synthetic writer (``synthetic.json``) when the folder has one, else to the
    benchmark's (MIntRec 230/480, MIntRec2.0 180/400). The feature pickles are
    found in the folder (or its ``video_data/`` / ``audio_data/`` subfolders)
    unless given explicitly.
    """
    info = dataset_info(dataset)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    tsv = data_dir / f"{split}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{tsv} does not exist (a {info.name} folder holds "
                                f"{', '.join(s + '.tsv' for s in SPLITS)} and the feature pickles)")

    meta_path = data_dir / SYNTHETIC_META
    if (video_len is None or audio_len is None) and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        video_len = video_len if video_len is not None else int(meta["video_len"])
        audio_len = audio_len if audio_len is not None else int(meta["audio_len"])
    video_len = info.video_len if video_len is None else int(video_len)
    audio_len = info.audio_len if audio_len is None else int(audio_len)
    if video_len < 1 or audio_len < 1:
        raise ValueError(f"video_len and audio_len must be >= 1, got {video_len}, {audio_len}")

    by_name = {_normalise_label(n): i for i, n in enumerate(info.labels)}
    texts, labels, keys = [], [], []
    for line, row in _read_rows(tsv, info):
        label = by_name.get(_normalise_label(row[info.label_column]))
        if label is None:
            raise ValueError(f"{tsv}, line {line}: unknown {info.name} label "
                             f"{row[info.label_column]!r}; valid labels: {', '.join(info.labels)}")
        texts.append(row[info.text_column])
        labels.append(label)
        keys.append(info.key(row))
    if not keys:
        raise ValueError(f"{tsv}: no data rows after the header")

    video_file = Path(video_feats_path) if video_feats_path else _find_file(data_dir, info.video_files, "video")
    audio_file = Path(audio_feats_path) if audio_feats_path else _find_file(data_dir, info.audio_files, "audio")
    for p in (video_file, audio_file):
        if not p.is_file():
            raise FileNotFoundError(f"features file {p} does not exist")
    video, video_lengths = _pad_features(load_feature_pickle(video_file), keys, video_file,
                                         video_len, info.video_dim)
    audio, audio_lengths = _pad_features(load_feature_pickle(audio_file), keys, audio_file,
                                         audio_len, info.audio_dim)
    return MultimodalSplit(
        texts=texts, labels=torch.tensor(labels, dtype=torch.int64),
        video=video, audio=audio, video_lengths=video_lengths, audio_lengths=audio_lengths,
        keys=keys, label_names=info.labels,
    )


class MultimodalDataset(torch.utils.data.Dataset):
    """Items are dicts: index, text, label, video, audio, video_length, audio_length."""

    def __init__(self, split: MultimodalSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        s = self.split
        return {
            "index": i,
            "text": s.texts[i],
            "label": s.labels[i],
            "video": s.video[i],
            "audio": s.audio[i],
            "video_length": s.video_lengths[i],
            "audio_length": s.audio_lengths[i],
        }


def collate(items: list[dict]) -> dict:
    """Batch of items: the same keys, tensors stacked, ``text`` a list of str."""
    if not items:
        raise ValueError("collate needs at least one item")
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "text": [it["text"] for it in items],
        "label": torch.stack([torch.as_tensor(it["label"]) for it in items]),
        "video": torch.stack([it["video"] for it in items]),
        "audio": torch.stack([it["audio"] for it in items]),
        "video_length": torch.stack([torch.as_tensor(it["video_length"]) for it in items]),
        "audio_length": torch.stack([torch.as_tensor(it["audio_length"]) for it in items]),
    }
