"""Feature pickles out of core: read safely once, then memory-mapped.

A feature pickle is a dict ``key -> array (T, D) or (T, 1, D)``. It goes
through a restricted unpickler that builds dicts, lists, tuples, strings,
numbers and numpy arrays only, and no array larger than the file, so a data
file never runs code nor asks for memory it does not hold. The first load
converts it once into a cache (one float32 ``.npy`` with every key's frames
end to end, and an index ``.npz`` with keys, offsets and frame counts, and
the pickle's identity and SHA-256) beside the pickle in ``.mvcl-cache/`` or
under ``cache_dir``; later loads check the cache against the pickle
(:func:`open_features`) and its own files against each other, memory-map it
(:class:`FeatureStore`) and read only the frames of the items asked for
(:class:`Frames`), so a data set larger than memory trains. A cache that is
stale or damaged is converted again.
"""
from __future__ import annotations

import codecs
import hashlib
import math
import mmap
import os
import pickle
import re
import time
import tokenize
import zipfile
from pathlib import Path

import numpy as np
import torch

from mvcl_fast.intent.errors import first_line

CACHE_FORMAT = 2
CACHE_SUBFOLDER = ".mvcl-cache"
FAULT_AROUND = 1 << 16   # Linux's default fault_around_bytes


# ------------------------------------------------------------- safe unpickling

# The globals a pickle of numpy arrays needs (numpy 1.x and 2.x module names; protocol 5
# uses _frombuffer, protocol 2 stores raw bytes through _codecs.encode). Nothing else can run.
_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_ARRAY_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((module, name) for module in _MULTIARRAY for name in ("_reconstruct", "scalar")),
    *((module, "_frombuffer") for module in _NUMERIC),
})
# numpy writes its raw bytes as a latin-1 string (protocol 2); no other codec is ever needed.
_LATIN1 = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"})


def _plain_dtype(dtype) -> np.dtype:
    """dtype if it is one numpy's type code describes in full: not structured, not a
    subarray, no Python objects. A pickled dtype's state can declare fields outside its
    items or an object array can name more items than its data holds, and numpy reads out
    of bounds (or crashes) on them; a feature array needs neither."""
    dtype = np.dtype(dtype)
    if (dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None
            or dtype != np.dtype(dtype.str) or dtype.itemsize != np.dtype(dtype.str).itemsize):
        raise pickle.UnpicklingError(f"refused an array of dtype {dtype!r} (a feature pickle's "
                                     "arrays hold plain numbers or strings)")
    return dtype


class _PickledArray(np.ndarray):
    """numpy.ndarray as a feature pickle names it: numpy's pickles make an empty array with
    _reconstruct and fill it with __setstate__ (which checks the data's length against the
    shape before allocating); a direct call, which would allocate any shape, is refused."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("refused a direct call of numpy.ndarray (numpy's pickles "
                                     "build arrays through _reconstruct)")

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) in (4, 5):
            _plain_dtype(state[-3])
        super().__setstate__(state)


def _encode_latin1(text, encoding):
    if not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"refused codec {encoding!r} (numpy's pickles encode their "
                                     "bytes as latin1)")
    return codecs.encode(text, "latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, numbers and numpy arrays / dtypes only, and no
    array larger than the file: what the file declares is checked before it is allocated."""

    def __init__(self, file, size: int):
        super().__init__(file)
        self.size = size

    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name} (a feature pickle may hold only dicts, lists, "
                "tuples, strings, numbers and numpy arrays; nothing in it was run)")
        found = super().find_class(module, name)
        if (module, name) == ("numpy", "ndarray"):
            return _PickledArray
        if name == "_reconstruct":
            return lambda subtype, shape, dtype: found(*self._checked(subtype, shape, dtype))
        if name == "scalar":
            return lambda dtype, *args: found(_plain_dtype(dtype), *args)
        if name == "_frombuffer":
            return lambda buffer, dtype, *args: found(buffer, _plain_dtype(dtype), *args)
        if name == "encode":
            return _encode_latin1
        return found

    def _checked(self, subtype, shape, dtype) -> tuple:
        dtype = _plain_dtype(dtype)
        if subtype is not _PickledArray:
            raise pickle.UnpicklingError(f"refused to reconstruct a {subtype!r} (only "
                                         "numpy.ndarray)")
        shape = tuple(int(n) for n in shape)
        if min(shape, default=0) < 0 or math.prod(shape) * dtype.itemsize > self.size:
            raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {dtype} is "
                                         f"larger than the file ({self.size} bytes)")
        return subtype, shape, dtype


def load_feature_pickle(path: str | os.PathLike) -> dict:
    """The pickled ``key -> array`` dict, through the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            feats = _ArrayUnpickler(f, os.fstat(f.fileno()).st_size).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            LookupError, OverflowError, MemoryError) as err:
        raise ValueError(f"{path}: cannot read the feature pickle: {type(err).__name__}: "
                         f"{first_line(err)}") from err
    if not isinstance(feats, dict):
        raise ValueError(f"{path}: expected a pickled dict key -> array, got {type(feats).__name__}")
    return {key: value.view(np.ndarray) if isinstance(value, _PickledArray) else value
            for key, value in feats.items()}


# ------------------------------------------------------------------ the cache

def _as_frames(arr, path: Path, key) -> np.ndarray:
    """(T, D) view of an array stored as (T, D) or (T, 1, D)."""
    if not isinstance(key, str):
        raise ValueError(f"{path}: key {key!r} is a {type(key).__name__}, expected a string")
    if "\0" in key:   # numpy's string arrays, which the index keeps the keys in, drop NULs
        raise ValueError(f"{path}: key {key!r} holds a NUL character")
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


def _cache_stem(source: Path, st: os.stat_result, cache_dir: Path | None) -> Path:
    """Where the cache of ``source`` lives: named by its size and modification time."""
    if cache_dir is None:
        root = source.parent / CACHE_SUBFOLDER
    else:  # one subfolder per source folder, so equal file names never collide
        root = Path(cache_dir) / hashlib.sha1(str(source.resolve().parent).encode()).hexdigest()[:16]
    return root / f"{source.name}.{st.st_size}-{st.st_mtime_ns}.v{CACHE_FORMAT}"


def _identity(st: os.stat_result) -> str:
    """What os.utime cannot set back: the status-change time (a write, a chmod or os.utime
    itself sets it to now) and the inode (a file renamed over the pickle has its own)."""
    return f"{st.st_ctime_ns}-{st.st_ino}"


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def _write_index(stem: Path, arrays: dict) -> None:
    """The index, through a temporary file renamed into place (the index marks a complete
    cache: it is written last)."""
    tmp = stem.with_name(f".{stem.name}.index.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, f"{stem}.index.npz")
    finally:
        tmp.unlink(missing_ok=True)


def _convert(source: Path, stem: Path, identity: str) -> None:
    """Write the cache of one pickle: frames first, the index last (the index marks a complete
    cache); both through temporary files renamed into place, so a killed conversion leaves no
    half cache. The index records the pickle's identity and the SHA-256 of its bytes. Peak
    memory: the unpickled dict, the frames are streamed to disk."""
    digest = _digest(source)
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
    try:
        with open(frames_tmp, "wb") as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (len(nonzero), dim)})
            for key, arr, offset in zip(keys, frames, offsets):
                block = _finite_float32(arr, source, key)
                nonzero[offset:offset + len(block)] = block.any(axis=1)
                f.write(block.tobytes())
        os.replace(frames_tmp, f"{stem}.frames.npy")
    finally:
        frames_tmp.unlink(missing_ok=True)
    _write_index(stem, {"keys": np.array(keys, dtype=str), "offsets": offsets, "counts": counts,
                        "nonzero": nonzero, "dim": np.int64(dim), "source": np.array(identity),
                        "digest": np.array(digest)})
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


class DamagedCache(ValueError):
    """A cache whose index and frames do not describe each other (a truncated or replaced
    file): open_features converts the pickle again."""


# What reading a damaged index or frames header raises (np.load of a truncated .npz: BadZipFile,
# or OSError for a seek before the start; a member's flags or method garbled: RuntimeError
# "password required" or NotImplementedError; a corrupted .npy header: ValueError, or
# tokenize.TokenError from numpy's header filter, or MemoryError for the size it declares).
# A cache that cannot be read is converted again.
_DAMAGE = (OSError, EOFError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile,
           tokenize.TokenError, MemoryError)


def _read_index(path: Path) -> dict:
    """The index's arrays, checked against each other: keys, offsets and counts one per key,
    the offsets the running sum of the counts, nonzero one per frame."""
    names = ("keys", "offsets", "counts", "nonzero", "dim", "source", "digest")
    try:   # opened here: np.load leaves the file open when the zip does not read
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as index:
            arrays = {name: index[name] for name in names}
    except _DAMAGE as err:
        raise DamagedCache(f"{path} does not read: {first_line(err)}") from err
    keys, offsets, counts, nonzero, dim, source, digest = arrays.values()
    n = len(keys) if keys.ndim == 1 else -1
    if not (n > 0 and keys.dtype.kind == "U" and len(set(keys.tolist())) == n
            and source.shape == digest.shape == () and source.dtype.kind == digest.dtype.kind == "U"
            and offsets.shape == counts.shape == (n,) and offsets.dtype == counts.dtype == np.int64
            and dim.shape == () and dim.dtype == np.int64 and dim >= 1 and counts.min() >= 1
            and offsets[0] == 0 and (offsets[1:] == np.cumsum(counts)[:-1]).all()
            and nonzero.dtype == bool and nonzero.shape == (counts.sum(),)):
        raise DamagedCache(f"{path}: its keys, offsets, counts and frame flags disagree")
    return arrays


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def _check_frames(path: Path, frames: int, dim: int) -> None:
    """The frames file holds a C-order float32 [frames, dim] array, whole."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in _NPY_HEADERS:   # what np.load's memory map reads
                raise ValueError(f"unknown .npy format version {version}")
            shape, fortran_order, dtype = _NPY_HEADERS[version](f)
            size = f.tell() + frames * dim * 4
            actual = os.fstat(f.fileno()).st_size
    except _DAMAGE as err:
        raise DamagedCache(f"{path} does not read: {first_line(err)}") from err
    if shape != (frames, dim) or fortran_order or dtype != np.dtype("<f4") or actual != size:
        raise DamagedCache(f"{path} holds {actual} bytes, a {dtype} array of shape {shape}; the "
                           f"index describes {frames} frames of {dim} float32 features ({size} "
                           "bytes)")


class FeatureStore:
    """One feature pickle, read from its memory-mapped cache.

    The map is opened lazily in each process (DataLoader workers open their
    own, sharing the page cache) and is never pickled. Opening checks the
    index and the frames file against each other (DamagedCache if they
    disagree), so a read never runs past the file.
    """

    def __init__(self, source: Path, stem: Path):
        self.source = source
        self.frames_path = Path(f"{stem}.frames.npy")
        index = _read_index(Path(f"{stem}.index.npz"))
        self.keys = index["keys"].tolist()
        self.offsets = index["offsets"]
        self.counts = index["counts"]
        self.nonzero = index["nonzero"]
        self.dim = int(index["dim"])
        self.source_identity, self.source_digest = str(index["source"]), str(index["digest"])
        _check_frames(self.frames_path, len(self.nonzero), self.dim)
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
    """The feature store of a pickle, converting it into the cache on first use, when the
    pickle changed, or when the cache is damaged (a note says which).

    A cache is found by the pickle's size and modification time. When the pickle's
    status-change time or inode differ from those the cache recorded (a chmod, a copy, or
    other bytes written with the modification time set back), the SHA-256 of its bytes
    decides: the same, the cache serves and records them (if its folder is writable); else
    the pickle is converted again. A load of an unchanged pickle reads none of it."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"features file {source} does not exist")
    st = source.stat()
    stem = _cache_stem(source, st, None if cache_dir is None else Path(cache_dir))
    identity = _identity(st)
    why = "converted once"
    if Path(f"{stem}.index.npz").is_file():
        try:
            store = FeatureStore(source, stem)
        except DamagedCache as err:
            why = f"the cache was damaged ({err}); converted again"
        else:
            if store.source_identity == identity:
                return store
            if _digest(source) == store.source_digest:
                _record_identity(stem, identity)
                return store
            why = ("other bytes than its cache's, with the same size and modification time; "
                   "converted again")
    start = time.perf_counter()
    try:
        _convert(source, stem, identity)
    except PermissionError as err:
        raise PermissionError(f"cannot write the feature cache of {source} in {stem.parent} "
                              f"({err}); name a writable folder with cache_dir "
                              "(--cache-dir)") from err
    seconds = time.perf_counter() - start
    if notes is not None:
        notes.append(f"{source.name}: {why} into the cache {stem.parent} ({seconds:.1f}s)")
    return FeatureStore(source, stem)


def _record_identity(stem: Path, identity: str) -> None:
    """The pickle's new identity in its cache's index, so that the next load does not hash it
    again. Where the cache folder cannot be written, the next load hashes it again."""
    arrays = _read_index(Path(f"{stem}.index.npz"))
    try:
        _write_index(stem, {**arrays, "source": np.array(identity)})
    except OSError:
        pass


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
