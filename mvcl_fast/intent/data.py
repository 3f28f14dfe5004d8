"""MIntRec / MIntRec2.0 loader: every published layout, features out of core.

A data folder holds ``train.tsv``, ``dev.tsv``, ``test.tsv`` (tab-separated,
header row) and two feature pickles, each a dict ``key -> array (T, D) or
(T, 1, D)``. Rows are joined to features by a key built from the TSV columns:
``season_episode_clip`` for MIntRec, ``dia{dialogue}_utt{utterance}`` for
MIntRec2.0. The layouts that load (one code path):

- MIntRec as thuiar/MIntRec releases it: ``video_data/video_feats.pkl`` (256-d),
  ``audio_data/audio_feats.pkl``; as TCL-MAP / MVCL-DAF read it: the pickles
  beside the TSVs (``video_feats.pkl`` or ``swin_feats.pkl``, 1024-d).
- MIntRec2.0 single turn as released: ``in-scope/{train,dev,test}.tsv``,
  ``in-scope/video_data/swin_roi_binary.pkl``,
  ``in-scope/audio_data/wavlm_feats_binary.pkl`` (the folder given may be the
  release root or ``in-scope`` itself).
- Any other file names through ``video_feats_path`` / ``audio_feats_path``.

Feature widths come from the data. The TSVs are read without quote
processing (a ``"`` is a character of the text, as in the published
loaders); columns are matched by header name, else read by the documented
positions.

Out of core: the first load converts each pickle once into a cache (one
float32 ``.npy`` with every key's frames end to end, and an index ``.npz``
with keys, offsets and frame counts) beside the pickle in ``.mvcl-cache/``
or under ``cache_dir``; later loads memory-map it and read only the frames
of the items asked for. Pickles go through a restricted unpickler that
builds dicts, lists, tuples, strings, numbers and numpy arrays only.

``load_split`` reads a split of a data folder; ``load_tsv`` any one TSV in the
layout, also new clips without labels (``labelled=False``, for
``mvcl_fast.predict --input``). The synthetic data set (mvcl_fast.intent.synthetic)
is written in the MIntRec layout and goes through this same code path.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import mmap
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "dev", "test")
UNLABELLED = -1   # MultimodalSplit.labels of clips read without labels (load_tsv, labelled=False)
SYNTHETIC_META = "synthetic.json"  # written by mvcl_fast.intent.synthetic next to the TSVs
CACHE_FORMAT = 1
CACHE_SUBFOLDER = ".mvcl-cache"
FAULT_AROUND = 1 << 16   # Linux's default fault_around_bytes


def _beside_and_under(subfolder: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """Candidate paths: each name beside the TSVs, then in ``subfolder``."""
    return (*names, *(f"{subfolder}/{n}" for n in names))


@dataclass(frozen=True)
class DatasetInfo:
    """What a benchmark's files look like, and its published training defaults.

    ``key_columns`` and ``key_format`` say how a row's feature key is built;
    column names are canonical (lower case, words joined by ``_``): the header
    of a TSV is matched after the same normalisation, so ``Dialogue_id``,
    ``dialogue id`` and ``DIALOGUE_ID`` all name the column ``dialogue_id``.
    ``columns`` is also the documented column order, used when the header
    does not name them.
    """

    name: str
    labels: tuple[str, ...]
    video_len: int
    audio_len: int
    key_columns: tuple[str, ...]
    key_format: str
    max_text_tokens: int           # word pieces of the utterance the published configs keep
    select_metric: str             # dev metric the published runs select the epoch on
    video_files: tuple[str, ...]   # feature pickles tried in order, relative to the TSVs
    audio_files: tuple[str, ...]
    release_subfolder: str | None = None   # where the release keeps the TSVs, if not at the top
    text_column: str = "text"
    label_column: str = "label"

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
        name="mintrec", labels=MINTREC_LABELS, video_len=230, audio_len=480,
        key_columns=("season", "episode", "clip"), key_format="{season}_{episode}_{clip}",
        max_text_tokens=30, select_metric="f1",
        # thuiar/MIntRec: video_data/video_feats.pkl (ResNet ROI, 256-d); TCL-MAP / MVCL-DAF:
        # the pickles beside the TSVs, swin_feats.pkl the 1024-d Swin features.
        video_files=_beside_and_under("video_data", ("video_feats.pkl", "swin_feats.pkl")),
        audio_files=_beside_and_under("audio_data", ("audio_feats.pkl", "wavlm_feats.pkl")),
    ),
    "mintrec2": DatasetInfo(
        name="mintrec2", labels=MINTREC2_LABELS, video_len=180, audio_len=400,
        key_columns=("dialogue_id", "utterance_id"), key_format="dia{dialogue_id}_utt{utterance_id}",
        max_text_tokens=76, select_metric="acc",   # MVCL-DAF's MIntRec2.0 config
        video_files=_beside_and_under("video_data", ("swin_roi_binary.pkl", "swin_roi.pkl",
                                                     "video_feats.pkl")),
        audio_files=_beside_and_under("audio_data", ("wavlm_feats_binary.pkl", "wavlm_feats.pkl",
                                                     "audio_feats.pkl")),
        release_subfolder="in-scope",
    ),
}


def dataset_info(dataset: str) -> DatasetInfo:
    name = dataset.lower().replace(".", "").replace("-", "").replace("_", "")
    name = {"mintrec20": "mintrec2"}.get(name, name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------- TSV

def _normalise_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _normalise_label(name: str) -> str:
    return " ".join(name.split()).lower()


def _read_rows(path: Path, info: DatasetInfo, labelled: bool = True
               ) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """(line number, row) for every data row, and notes for the log. labelled=False: the label
    column is not read (it may be absent).

    No quote processing: a ``"`` is part of the text (csv's default quoting
    would let a quote at the start of a text swallow the following rows).
    """
    columns = info.columns if labelled else (*info.key_columns, info.text_column)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({err.reason}: byte "
                         f"{raw[err.start:err.start + 1]!r} at offset {err.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: the file is empty (expected a header row with columns "
                         f"{', '.join(columns)})")
    names = [_normalise_column(h) for h in header]
    missing = [c for c in columns if c not in names]
    notes = []
    if not missing:
        where = {c: names.index(c) for c in columns}
    elif len(header) >= len(columns):
        # The published loaders ignore the header and read the columns by position.
        where = {c: i for i, c in enumerate(columns)}
        notes.append(f"{path.name}: the header does not name the column(s) {', '.join(missing)} "
                     f"(header {header}); reading the columns by position as the published "
                     f"loaders do: " + ", ".join(f"{c} = column {i + 1}" for c, i in where.items()))
    else:
        raise ValueError(f"{path}: header row {header} lacks the column(s) {missing} needed for "
                         f"{info.name} (columns {', '.join(columns)}, matched "
                         f"case-insensitively, else read by position), and has only "
                         f"{len(header)} columns")
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
    return rows, notes


# ------------------------------------------------------------- safe unpickling

# The globals a pickle of numpy arrays needs (numpy 1.x and 2.x module names; protocol 5
# uses _frombuffer, protocol 2 stores raw bytes through _codecs.encode). Nothing else can run.
_ARRAY_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, numbers and numpy arrays / dtypes only."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name} (a feature pickle may hold only dicts, lists, "
                "tuples, strings, numbers and numpy arrays; nothing in it was run)")
        return super().find_class(module, name)


def load_feature_pickle(path: str | os.PathLike) -> dict:
    """The pickled ``key -> array`` dict, through the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            feats = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError) as err:
        raise ValueError(f"{path}: cannot read the feature pickle: {type(err).__name__}: {err}") from err
    if not isinstance(feats, dict):
        raise ValueError(f"{path}: expected a pickled dict key -> array, got {type(feats).__name__}")
    return feats


# ------------------------------------------------------------------ the cache

def _as_frames(arr, path: Path, key) -> np.ndarray:
    """(T, D) view of an array stored as (T, D) or (T, 1, D)."""
    if not isinstance(key, str):
        raise ValueError(f"{path}: key {key!r} is a {type(key).__name__}, expected a string")
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{path}: key {key!r} holds a {type(arr).__name__}, expected a numpy array")
    if arr.ndim == 3 and arr.shape[1] == 1:
        arr = arr[:, 0, :]
    if arr.ndim != 2:
        raise ValueError(f"{path}: key {key!r} has shape {arr.shape}; expected (T, D) or (T, 1, D)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{path}: key {key!r} has no frames or no features (shape {arr.shape})")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{path}: key {key!r} holds {arr.dtype} data, not real numbers")
    return arr


def _finite_float32(frames: np.ndarray, path: Path, key: str) -> np.ndarray:
    """float32 frames; a NaN, an Inf or a value beyond float32's range is an error."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(frames, dtype=np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        t = int(np.argmax(bad))
        j = int(np.argmax(~np.isfinite(out[t])))
        value = frames[t, j]
        why = "beyond float32's range" if np.isfinite(value) else "not finite"
        raise ValueError(f"{path}: key {key!r}, frame {t} (of {len(frames)}), feature {j}: "
                         f"value {value} is {why}; features must be finite float32 values")
    return out


def _cache_stem(source: Path, cache_dir: Path | None) -> Path:
    """Where the cache of ``source`` lives: keyed by its size and modification time."""
    st = source.stat()
    if cache_dir is None:
        root = source.parent / CACHE_SUBFOLDER
    else:  # one subfolder per source folder, so equal file names never collide
        root = Path(cache_dir) / hashlib.sha1(str(source.resolve().parent).encode()).hexdigest()[:16]
    return root / f"{source.name}.{st.st_size}-{st.st_mtime_ns}.v{CACHE_FORMAT}"


def _convert(source: Path, stem: Path) -> None:
    """Write the cache of one pickle: frames first, the index last (the index marks a complete
    cache); both through temporary files renamed into place, so a killed conversion leaves no
    half cache. Peak memory: the unpickled dict, the frames are streamed to disk."""
    feats = load_feature_pickle(source)
    keys = list(feats)
    if not keys:
        raise ValueError(f"{source}: the feature dict is empty")
    frames = [_as_frames(feats[k], source, k) for k in keys]
    dim = frames[0].shape[1]
    for key, arr in zip(keys, frames):
        if arr.shape[1] != dim:
            raise ValueError(f"{source}: key {key!r} has feature width {arr.shape[1]}, but key "
                             f"{keys[0]!r} has {dim}: every key must have the same width")
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    nonzero = np.empty(int(counts.sum()), dtype=bool)   # real (not all-zero) frames

    stem.parent.mkdir(parents=True, exist_ok=True)
    frames_tmp = stem.with_name(f".{stem.name}.frames.tmp-{os.getpid()}.npy")
    index_tmp = stem.with_name(f".{stem.name}.index.tmp-{os.getpid()}.npz")
    try:
        with open(frames_tmp, "wb") as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (len(nonzero), dim)})
            for key, arr, offset in zip(keys, frames, offsets):
                block = _finite_float32(arr, source, key)
                nonzero[offset:offset + len(block)] = block.any(axis=1)
                f.write(block.tobytes())
        np.savez(index_tmp, keys=np.array(keys, dtype=str), offsets=offsets, counts=counts,
                 nonzero=nonzero, dim=np.int64(dim))
        os.replace(frames_tmp, f"{stem}.frames.npy")
        os.replace(index_tmp, f"{stem}.index.npz")
    finally:
        for tmp in (frames_tmp, index_tmp):
            tmp.unlink(missing_ok=True)
    _remove_stale(source, stem)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        pass
    return True


def _remove_stale(source: Path, stem: Path) -> None:
    """Remove the caches of earlier versions of the pickle and the temporaries of killed
    conversions (their writer's process is gone)."""
    name = re.escape(source.name)
    cache = re.compile(rf"{name}\.\d+-\d+\.v\d+\.(frames\.npy|index\.npz)")
    temporary = re.compile(rf"\.{name}\.\d+-\d+\.v\d+\.(frames|index)\.tmp-(\d+)\.np[yz]")
    for path in stem.parent.iterdir():
        dead = temporary.fullmatch(path.name)
        if ((cache.fullmatch(path.name) and not path.name.startswith(stem.name + "."))
                or (dead and not _pid_alive(int(dead.group(2))))):
            path.unlink(missing_ok=True)


class FeatureStore:
    """One feature pickle, read from its memory-mapped cache.

    The map is opened lazily in each process (DataLoader workers open their
    own, sharing the page cache) and is never pickled.
    """

    def __init__(self, source: Path, stem: Path):
        self.source = source
        self.frames_path = Path(f"{stem}.frames.npy")
        with np.load(f"{stem}.index.npz", allow_pickle=False) as index:
            self.keys = index["keys"].tolist()
            self.offsets = index["offsets"]
            self.counts = index["counts"]
            self.nonzero = index["nonzero"]
            self.dim = int(index["dim"])
        self.row_of = {k: i for i, k in enumerate(self.keys)}
        self._frames = None

    def __getstate__(self):
        return {**self.__dict__, "_frames": None}

    def lengths(self, rows: np.ndarray, max_len: int) -> np.ndarray:
        """Real frames of each row after truncation to max_len: up to the last frame that is
        not all zero (at least 1)."""
        out = np.ones(len(rows), dtype=np.int64)
        for i, row in enumerate(rows):
            start = self.offsets[row]
            real = np.flatnonzero(self.nonzero[start:start + min(self.counts[row], max_len)])
            if real.size:
                out[i] = real[-1] + 1
        return out

    def read_into(self, row: int, out: np.ndarray) -> None:
        """Copy the first len(out) frames of a row into out."""
        if self._frames is None:
            self._frames = np.load(self.frames_path, mmap_mode="r")
        start = int(self.offsets[row])
        out[...] = self._frames[start:start + len(out)]
        # Drop the pages from this process's mapping (they stay in the page cache): an epoch
        # over the whole cache would otherwise count all of it in the resident set. The range
        # is widened to the 64 KiB windows the kernel maps around each fault (fault-around).
        # np.memmap maps the file from the allocation-granularity boundary below the header.
        mapping = self._frames.base
        map_start = self._frames.offset - self._frames.offset % mmap.ALLOCATIONGRANULARITY
        begin = self._frames.offset - map_start + start * self.dim * 4
        first = begin - begin % FAULT_AROUND
        last = min(len(mapping), -(-(begin + out.nbytes) // FAULT_AROUND) * FAULT_AROUND)
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        return out


def open_features(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  notes: list[str] | None = None) -> FeatureStore:
    """The feature store of a pickle, converting it into the cache on first use (or when
    the pickle's size or modification time changed)."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"features file {source} does not exist")
    stem = _cache_stem(source, None if cache_dir is None else Path(cache_dir))
    if not Path(f"{stem}.index.npz").is_file():
        start = time.perf_counter()
        try:
            _convert(source, stem)
        except PermissionError as err:
            raise PermissionError(f"cannot write the feature cache of {source} in {stem.parent} "
                                  f"({err}); name a writable folder with cache_dir "
                                  "(--cache-dir)") from err
        if notes is not None:
            notes.append(f"{source.name}: converted once into the cache {stem.parent} "
                         f"({time.perf_counter() - start:.1f}s)")
    return FeatureStore(source, stem)


class Frames:
    """One modality of one split: ``frames[i]`` is item i's zero-padded float32
    [max_len, D] tensor, ``frames[a:b]`` or ``frames[[i, j]]`` a batch; read from
    the cache on demand, never held whole in memory."""

    dtype = torch.float32

    def __init__(self, store: FeatureStore, rows: np.ndarray, max_len: int):
        self.store = store
        self.rows = rows
        self.max_len = max_len
        self.lengths = torch.from_numpy(store.lengths(rows, max_len))

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.rows), self.max_len, self.dim)

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, i: int) -> torch.Tensor:
        # Built in numpy: one single-threaded copy (torch's multi-threaded fill of a small
        # tensor costs tens of ms on a loaded 2-core machine).
        out = np.zeros((self.max_len, self.dim), dtype=np.float32)
        self.store.read_into(int(self.rows[i]), out[:int(self.lengths[i])])
        return torch.from_numpy(out)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self.item(range(len(self))[index])
        picked = range(len(self))[index] if isinstance(index, slice) else index
        items = [self.item(range(len(self))[int(i)]) for i in picked]
        return torch.stack(items) if items else torch.zeros(0, self.max_len, self.dim)


# ------------------------------------------------------------------------ public

@dataclass
class MultimodalSplit:
    """One split: texts, labels and the video [N, Tv, Dv] / audio [N, Ta, Da] frames."""

    texts: list[str]
    labels: torch.Tensor          # int64 [N]; UNLABELLED for clips read without labels
    video: Frames
    audio: Frames
    keys: list[str]
    label_names: tuple[str, ...]
    notes: list[str] = field(default_factory=list)   # what the loader decided, for the log

    @property
    def video_lengths(self) -> torch.Tensor:   # int64 [N], real frames (>= 1)
        return self.video.lengths

    @property
    def audio_lengths(self) -> torch.Tensor:
        return self.audio.lengths

    def __len__(self) -> int:
        return len(self.texts)


def _tsv_folder(data_dir: Path, info: DatasetInfo, split: str) -> Path:
    """The folder that holds the TSVs: the one given, or the release's subfolder in it."""
    if not (data_dir / f"{split}.tsv").is_file() and info.release_subfolder:
        inner = data_dir / info.release_subfolder
        if (inner / f"{split}.tsv").is_file():
            return inner
    return data_dir


def _find_file(folder: Path, given, candidates: tuple[str, ...], what: str) -> Path:
    if given:
        path = Path(given)
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise FileNotFoundError(f"{what} features file {path} does not exist")
        return path
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {what} features file; looked for "
                            f"{', '.join(candidates)} (name another with --{what}-feats)")


def _rows_of(store: FeatureStore, keys: list[str], lines: list[int], tsv: Path) -> np.ndarray:
    rows = np.empty(len(keys), dtype=np.int64)
    for i, (key, line) in enumerate(zip(keys, lines)):
        row = store.row_of.get(key)
        if row is None:
            raise ValueError(f"{store.source}: no features for key {key!r} ({tsv.name}, line "
                             f"{line}; {len(store.keys)} keys in the file)")
        rows[i] = row
    return rows


def load_split(data_dir: str | os.PathLike, dataset: str = "mintrec", split: str = "train", *,
               video_len: int | None = None, audio_len: int | None = None,
               video_feats_path: str | os.PathLike | None = None,
               audio_feats_path: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> MultimodalSplit:
    """Read ``<data_dir>/<split>.tsv`` (or ``<data_dir>/in-scope/<split>.tsv`` for
    a MIntRec2.0 release) and its video/audio features.

    ``video_len`` / ``audio_len`` default to the lengths recorded by the
    synthetic writer (``synthetic.json``) when the folder has one, else to the
    benchmark's (MIntRec 230/480, MIntRec2.0 180/400). The feature pickles are
    found beside the TSVs or in their ``video_data/`` / ``audio_data/``
    subfolders under the published names unless given (a relative path is
    taken from the TSVs' folder). The cache goes under ``cache_dir`` if given.
    """
    info = dataset_info(dataset)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    folder = _tsv_folder(data_dir, info, split)
    tsv = folder / f"{split}.tsv"
    if not tsv.is_file():
        inner = f" (or {info.release_subfolder}/)" if info.release_subfolder else ""
        raise FileNotFoundError(f"{tsv} does not exist (a {info.name} folder{inner} holds "
                                f"{', '.join(s + '.tsv' for s in SPLITS)} and the feature pickles)")
    return load_tsv(tsv, info.name, video_len=video_len, audio_len=audio_len,
                    video_feats_path=video_feats_path, audio_feats_path=audio_feats_path,
                    cache_dir=cache_dir)


def load_tsv(tsv: str | os.PathLike, dataset: str = "mintrec", *, labelled: bool = True,
             video_len: int | None = None, audio_len: int | None = None,
             video_feats_path: str | os.PathLike | None = None,
             audio_feats_path: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None) -> MultimodalSplit:
    """One TSV in the data set's layout and the features of its clips, as load_split reads a
    split; the folder of the TSV stands for the data folder (feature pickles, synthetic.json).

    labelled=False: new clips to label; the label column is not read (it may be absent or
    empty) and every label is UNLABELLED.
    """
    info = dataset_info(dataset)
    tsv = Path(tsv)
    if not tsv.is_file():
        raise FileNotFoundError(f"{tsv} does not exist")
    folder = tsv.parent
    meta_path = folder / SYNTHETIC_META
    if (video_len is None or audio_len is None) and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        video_len = video_len if video_len is not None else int(meta["video_len"])
        audio_len = audio_len if audio_len is not None else int(meta["audio_len"])
    video_len = info.video_len if video_len is None else int(video_len)
    audio_len = info.audio_len if audio_len is None else int(audio_len)
    if video_len < 1 or audio_len < 1:
        raise ValueError(f"video_len and audio_len must be >= 1, got {video_len}, {audio_len}")

    by_name = {_normalise_label(n): i for i, n in enumerate(info.labels)}
    rows, notes = _read_rows(tsv, info, labelled)
    texts, labels, keys, lines = [], [], [], []
    for line, row in rows:
        label = by_name.get(_normalise_label(row[info.label_column])) if labelled else UNLABELLED
        if label is None:
            raise ValueError(f"{tsv}, line {line}: unknown {info.name} label "
                             f"{row[info.label_column]!r}; valid labels: {', '.join(info.labels)}")
        texts.append(row[info.text_column])
        labels.append(label)
        keys.append(info.key(row))
        lines.append(line)
    if not keys:
        raise ValueError(f"{tsv}: no data rows after the header")

    modalities = {}
    for what, given, candidates, max_len in (("video", video_feats_path, info.video_files, video_len),
                                             ("audio", audio_feats_path, info.audio_files, audio_len)):
        store = open_features(_find_file(folder, given, candidates, what), cache_dir, notes)
        modalities[what] = Frames(store, _rows_of(store, keys, lines, tsv), max_len)
    return MultimodalSplit(texts=texts, labels=torch.tensor(labels, dtype=torch.int64),
                           video=modalities["video"], audio=modalities["audio"], keys=keys,
                           label_names=info.labels, notes=notes)


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
