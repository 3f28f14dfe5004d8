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
  release root or ``in-scope`` itself); 30 intents, no UNK. Its out-of-scope part,
  ``out-of-scope/MIntRec2.0-OOD/`` in the same layout with every row labelled
  UNK, is read only for the open-intent protocol (``out_of_scope=True``; class id
  30, as thuiar/MIntRec2.0's ``data/single_turn/base.py`` maps it).
- Any other file names through ``video_feats_path`` / ``audio_feats_path``.

Feature widths come from the data. The TSVs are read without quote
processing (a ``"`` is a character of the text, as in the published
loaders); columns are matched by header name, else read by the documented
positions.

Features are read out of core (mvcl_fast.intent.features): each pickle,
through a restricted unpickler, is converted once into a memory-mapped cache,
and an item's frames are read when it is asked for.

``load_split`` reads a split of a data folder; ``load_tsv`` any one TSV in the
layout, also new clips without labels (``labelled=False``, for
``mvcl_fast.predict --input``). The synthetic data sets (mvcl_fast.intent.synthetic)
are written in the MIntRec and MIntRec2.0 layouts and go through this same code path.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mvcl_fast.intent.errors import first_line
from mvcl_fast.intent.features import FeatureStore, Frames, open_features

SPLITS = ("train", "dev", "test")
UNLABELLED = -1   # MultimodalSplit.labels of clips read without labels (load_tsv, labelled=False)
SYNTHETIC_META = "synthetic.json"  # written by mvcl_fast.intent.synthetic next to the TSVs
# The most frames a clip is padded to: 20 times the longest published length (MIntRec's 480
# audio frames). An item is [length, width] float32 and a batch of them is allocated whole, so
# a length like 10**8 is refused rather than allocated.
MAX_FRAMES = 10_000

_shown = reprlib.Repr()   # TSV fields in messages: a line of a broken file can be megabytes long
_shown.maxstring, _shown.maxlist, _shown.maxother = 80, 8, 80


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
    oos_folder: str | None = None          # the release's out-of-scope part (open intent)
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
# (data/single_turn/__init__.py, benchmarks['MIntRec2.0']['intent_labels']). The in-scope task
# is 30-way: out-of-scope utterances (label UNK) are only read by the open-intent protocol
# (mvcl_fast.intent.open_intent), where they are class 30, as the benchmark's ood_label_id.
MINTREC2_LABELS = (
    "Acknowledge", "Advise", "Agree", "Apologise", "Arrange",
    "Ask for help", "Asking for opinions", "Care", "Comfort", "Complain",
    "Confirm", "Criticize", "Doubt", "Emphasize", "Explain",
    "Flaunt", "Greet", "Inform", "Introduce", "Invite",
    "Joke", "Leave", "Oppose", "Plan", "Praise",
    "Prevent", "Refuse", "Taunt", "Thank", "Warn",
)
# The label of out-of-scope utterances (benchmarks['MIntRec2.0']['ood_data']['MIntRec2.0-OOD']),
# and where the release keeps them: out-of-scope/MIntRec2.0-OOD/ beside in-scope/, in the same
# layout (thuiar/MIntRec2.0 data/single_turn/base.py, prepare_data).
OOS_LABEL = "UNK"
MINTREC2_OOS_FOLDER = "out-of-scope/MIntRec2.0-OOD"

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
        release_subfolder="in-scope", oos_folder=MINTREC2_OOS_FOLDER,
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
    try:
        return _parse_rows(path, reader, info, columns)
    except csv.Error as err:   # a field beyond csv.field_size_limit(): not a TSV of utterances
        raise ValueError(f"{path}, line {reader.line_num}: {err} (is it a tab-separated file "
                         "with one utterance per line?)") from None


def _parse_rows(path: Path, reader, info: DatasetInfo, columns: tuple[str, ...]
                ) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
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
        positions = ", ".join(f"{c} = column {i + 1}" for c, i in where.items())
        notes.append(f"{path.name}: the header does not name the column(s) {', '.join(missing)} "
                     f"(header {_shown.repr(header)}); reading the columns by position as the "
                     f"published loaders do: {positions}")
    else:
        raise ValueError(f"{path}: header row {_shown.repr(header)} lacks the column(s) "
                         f"{missing} needed for {info.name} (columns {', '.join(columns)}, matched "
                         f"case-insensitively, else read by position), and has only "
                         f"{len(header)} columns")
    rows = []
    for fields in reader:
        line = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {line}: {len(fields)} tab-separated fields, "
                             f"the header has {len(header)}: {_shown.repr(fields)}")
        rows.append((line, {c: fields[i].strip() if c != info.text_column else fields[i]
                            for c, i in where.items()}))
    return rows, notes


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
    out_of_scope: bool = False    # the release's out-of-scope rows: every label len(label_names)

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


def out_of_scope_folder(data_dir: Path, info: DatasetInfo) -> Path:
    """The release's out-of-scope folder (MIntRec2.0: out-of-scope/MIntRec2.0-OOD/, its own
    TSVs and video_data/, audio_data/ pickles) for data_dir, the release root or its in-scope/."""
    if info.oos_folder is None:
        raise ValueError(f"{info.name} has no out-of-scope part: the open-intent protocol is "
                         "MIntRec2.0's (--dataset mintrec2)")
    candidates = [data_dir / info.oos_folder]
    if info.release_subfolder and data_dir.name == info.release_subfolder:
        candidates.append(data_dir.parent / info.oos_folder)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"{data_dir}: no out-of-scope folder (looked for "
                            f"{', '.join(map(str, candidates))}); the open-intent protocol reads "
                            f"the release's {info.oos_folder}/{{train,dev,test}}.tsv and its "
                            "video_data/, audio_data/ pickles")


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
            raise ValueError(f"{store.source}: no features for key {_shown.repr(key)} "
                             f"({tsv.name}, line {line}; {len(store.keys)} keys in the file)")
        rows[i] = row
    return rows


def _recorded_lengths(path: Path) -> dict[str, int]:
    """video_len and audio_len as the synthetic writer records them in synthetic.json."""
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path} does not read as JSON ({first_line(err)})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: holds a JSON {type(meta).__name__}; expected an object with "
                         "video_len and audio_len")
    for key in ("video_len", "audio_len"):
        value = meta.get(key)
        if type(value) is not int or not 1 <= value <= MAX_FRAMES:   # bool is not a length
            raise ValueError(f"{path}: {key} must be an integer from 1 to {MAX_FRAMES}, got "
                             f"{'nothing' if key not in meta else _shown.repr(value)}")
    return meta


def load_split(data_dir: str | os.PathLike, dataset: str = "mintrec", split: str = "train", *,
               video_len: int | None = None, audio_len: int | None = None,
               video_feats_path: str | os.PathLike | None = None,
               audio_feats_path: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None,
               out_of_scope: bool = False) -> MultimodalSplit:
    """Read ``<data_dir>/<split>.tsv`` (or ``<data_dir>/in-scope/<split>.tsv`` for
    a MIntRec2.0 release) and its video/audio features; out_of_scope=True: the release's
    out-of-scope split instead (:func:`out_of_scope_folder`), every row class num_labels.

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
    folder = out_of_scope_folder(data_dir, info) if out_of_scope else _tsv_folder(data_dir, info, split)
    tsv = folder / f"{split}.tsv"
    if not tsv.is_file():
        inner = f" (or {info.release_subfolder}/)" if info.release_subfolder else ""
        raise FileNotFoundError(f"{tsv} does not exist (a {info.name} folder{inner} holds "
                                f"{', '.join(s + '.tsv' for s in SPLITS)} and the feature pickles)")
    return load_tsv(tsv, info.name, out_of_scope=out_of_scope, video_len=video_len,
                    audio_len=audio_len, video_feats_path=video_feats_path,
                    audio_feats_path=audio_feats_path, cache_dir=cache_dir)


def _label_id(info: DatasetInfo, by_name: dict[str, int], name: str, tsv: Path, line: int,
              out_of_scope: bool) -> int:
    """The class id of a row's label: an intent's index; OOS_LABEL (out_of_scope files only,
    where every row carries it) is num_labels, as the benchmark's ood_label_id."""
    oos = info.oos_folder is not None and _normalise_label(name) == _normalise_label(OOS_LABEL)
    if out_of_scope and not oos:
        raise ValueError(f"{tsv}, line {line}: label {_shown.repr(name)} in an out-of-scope file; "
                         f"every row of {info.oos_folder}/ is labelled {OOS_LABEL}")
    if oos:
        if not out_of_scope:
            # The release's in-scope files hold none (the benchmark's label map would fail on
            # one): an UNK row here is another layout, not a 31st class.
            raise ValueError(f"{tsv}, line {line}: label {OOS_LABEL} (out of scope) in an "
                             f"in-scope file; the in-scope task of {info.name} is "
                             f"{info.num_labels}-way, and out-of-scope utterances belong in the "
                             f"release's {info.oos_folder}/, which --open-intent reads")
        return info.num_labels
    label = by_name.get(_normalise_label(name))
    if label is None:
        raise ValueError(f"{tsv}, line {line}: unknown {info.name} label {_shown.repr(name)}; "
                         f"valid labels: {', '.join(info.labels)}")
    return label


def load_tsv(tsv: str | os.PathLike, dataset: str = "mintrec", *, labelled: bool = True,
             out_of_scope: bool = False,
             video_len: int | None = None, audio_len: int | None = None,
             video_feats_path: str | os.PathLike | None = None,
             audio_feats_path: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None) -> MultimodalSplit:
    """One TSV in the data set's layout and the features of its clips, as load_split reads a
    split; the folder of the TSV stands for the data folder (feature pickles, synthetic.json).

    labelled=False: new clips to label; the label column is not read (it may be absent or
    empty) and every label is UNLABELLED. out_of_scope=True: a file of the release's
    out-of-scope part, every row labelled OOS_LABEL (class id num_labels); elsewhere that
    label is refused.
    """
    info = dataset_info(dataset)
    tsv = Path(tsv)
    if not tsv.is_file():
        raise FileNotFoundError(f"{tsv} does not exist")
    folder = tsv.parent
    meta_path = folder / SYNTHETIC_META
    if (video_len is None or audio_len is None) and meta_path.is_file():
        recorded = _recorded_lengths(meta_path)
        video_len = recorded["video_len"] if video_len is None else video_len
        audio_len = recorded["audio_len"] if audio_len is None else audio_len
    video_len = info.video_len if video_len is None else int(video_len)
    audio_len = info.audio_len if audio_len is None else int(audio_len)
    for name, value in (("video_len", video_len), ("audio_len", audio_len)):
        if not 1 <= value <= MAX_FRAMES:
            raise ValueError(f"{name} must be from 1 to {MAX_FRAMES} frames, got {value}")

    by_name = {_normalise_label(n): i for i, n in enumerate(info.labels)}
    rows, notes = _read_rows(tsv, info, labelled)
    texts, labels, keys, lines = [], [], [], []
    for line, row in rows:
        label = (_label_id(info, by_name, row[info.label_column], tsv, line, out_of_scope)
                 if labelled else UNLABELLED)
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
                           label_names=info.labels, notes=notes, out_of_scope=out_of_scope)


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


class FullBatches(torch.utils.data.Sampler):
    """Batches of exactly batch_size indices of sampler's order, the last one completed with
    the order's first indices (as DistributedSampler pads the split for its ranks): every step
    of an epoch has the same shapes, and every item is still read each epoch."""

    def __init__(self, sampler: torch.utils.data.Sampler, batch_size: int):
        self.sampler = sampler
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        order = list(self.sampler)
        order = list(itertools.islice(itertools.cycle(order), len(self) * self.batch_size))
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]


def data_loader(split: MultimodalSplit, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                dist=None, num_workers: int = 0, pin_memory: bool = False,
                full_batches: bool = False) -> torch.utils.data.DataLoader:
    """Collated batches of split, for training and evaluation.

    An explicit generator (reseeded by the trainer each epoch) or the sampler's seed fixes the
    batch order and keeps the DataLoader off the global RNG, so --resume reproduces a run
    exactly. dist (mvcl_fast.intent.distributed.Distributed, under DDP): each rank reads its
    own 1/R of the split; the sampler pads the split by repeating a few items so every rank has
    as many batches of the same sizes (the all-gathered negatives need equal batches).
    full_batches (training): every batch holds batch_size items (FullBatches), so a step's
    shapes never change; the sampler is then the batch sampler's (``loader.batch_sampler.sampler``).
    """
    dataset = MultimodalDataset(split)
    generator = torch.Generator()
    generator.manual_seed(seed)
    if dist is not None and dist.enabled:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle, seed=seed)
    elif shuffle:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    if full_batches:
        batching = dict(batch_sampler=FullBatches(sampler, batch_size))
    else:
        batching = dict(batch_size=batch_size, sampler=sampler)
    return torch.utils.data.DataLoader(dataset, **batching, collate_fn=collate,
                                       num_workers=num_workers, generator=generator,
                                       pin_memory=pin_memory)
