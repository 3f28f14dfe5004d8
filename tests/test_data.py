"""The MIntRec / MIntRec2.0 loader on tiny data sets in the real layout, its
errors, and the synthetic writer."""
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mvcl_fast.intent.features as features
import mvcl_fast.intent.synthetic as synthetic
from mvcl_fast.intent.data import DATASETS, MultimodalDataset, collate, load_split

V, A = synthetic.VIDEO_DIM, synthetic.AUDIO_DIM
TV, TA = 6, 5  # padded lengths used in most tests


def frames(rng, n, dim, *, middle_axis=False, trailing_zeros=0):
    x = rng.standard_normal((n, dim)).astype(np.float32) + 0.5
    if trailing_zeros:
        x = np.concatenate([x, np.zeros((trailing_zeros, dim), np.float32)])
    return x[:, None, :] if middle_axis else x


def write_folder(folder, header, rows_by_split, video, audio, *, video_name="video_feats.pkl",
                 audio_name="audio_feats.pkl"):
    """TSVs as the releases write them: fields joined by tabs, nothing quoted."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        lines = ["\t".join(map(str, row)) for row in [header, *rows]]
        (folder / f"{split}.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for name, feats in ((video_name, video), (audio_name, audio)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "wb") as f:
            pickle.dump(feats, f)
    return folder


@pytest.fixture
def mintrec_dir(tmp_path):
    """Train: four clips covering (T, D) / (T, 1, D), shorter / longer than the padded
    lengths, and stored zero padding; dev: one clip."""
    rng = np.random.default_rng(0)
    rows = {
        "train": [
            ["S04", "E01", "10", "Thank you so much.", "Thank"],
            ["S04", "E01", "11", 'He said "no", really.', "Ask for help"],
            ["S05", "E12", "3", '"Stop!" Now.', "prevent"],      # opening quote; label case
            ["S06", "E02", "7", "Okay.", "Complain"],
        ],
        "dev": [["S01", "E01", "1", "Hi there.", "Greet"]],
    }
    video = {
        "S04_E01_10": frames(rng, 3, V),                                    # shorter
        "S04_E01_11": frames(rng, 9, V, middle_axis=True),                  # longer, (T, 1, D)
        "S05_E12_3": frames(rng, 2, V, trailing_zeros=2),                   # stored padding
        "S06_E02_7": frames(rng, TV, V, middle_axis=True),                  # exactly TV
        "S01_E01_1": frames(rng, 1, V),
        "S09_E09_9": frames(rng, 4, V),                                     # key not in any split
    }
    audio = {
        "S04_E01_10": frames(rng, 8, A, middle_axis=True),
        "S04_E01_11": frames(rng, 1, A),
        "S05_E12_3": np.zeros((4, A), np.float32),                          # all zero: length 1
        "S06_E02_7": frames(rng, 3, A, trailing_zeros=9),                   # zeros past TA
        "S01_E01_1": frames(rng, 2, A, middle_axis=True),
    }
    folder = write_folder(tmp_path / "MIntRec", ["season", "episode", "clip", "text", "label"],
                          rows, video, audio)
    return folder, video, audio


def test_loads_mintrec_layout(mintrec_dir):
    folder, video, audio = mintrec_dir
    s = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    assert len(s) == 4
    assert s.keys == ["S04_E01_10", "S04_E01_11", "S05_E12_3", "S06_E02_7"]
    assert s.texts == ["Thank you so much.", 'He said "no", really.', '"Stop!" Now.', "Okay."]
    names = DATASETS["mintrec"].labels
    assert [names[i] for i in s.labels] == ["Thank", "Ask for help", "Prevent", "Complain"]
    assert s.label_names == names
    assert s.video.shape == (4, TV, V) and s.video.dtype == torch.float32
    assert s.audio.shape == (4, TA, A) and s.audio.dtype == torch.float32
    assert s.labels.dtype == torch.int64
    assert s.video_lengths.tolist() == [3, TV, 2, TV]
    assert s.audio_lengths.tolist() == [TA, 1, 1, 3]
    for i, key in enumerate(s.keys):
        for got, L, stored, T in ((s.video[i], s.video_lengths[i], video[key], TV),
                                  (s.audio[i], s.audio_lengths[i], audio[key], TA)):
            stored = stored.reshape(stored.shape[0], -1)[:T]
            torch.testing.assert_close(got[:len(stored)], torch.from_numpy(stored))
            assert not got[len(stored):].any()   # zero padding
            assert not got[L:].any()             # nothing real past the length


def test_default_lengths_are_the_benchmarks(mintrec_dir):
    folder, _, _ = mintrec_dir
    s = load_split(folder, "mintrec", "dev")
    assert s.video.shape == (1, 230, V) and s.audio.shape == (1, 480, A)
    assert s.video_lengths.tolist() == [1] and s.audio_lengths.tolist() == [2]


MINTREC2_HEADER = ["Dialogue_id", "Utterance_id", "Text", "Label", "Start_timestamp",
                   "End_timestamp", "Season", "Speaker"]
MINTREC2_ROWS = [
    ["12", "0", "What do you think about it?", "Asking for opinions", "0:00:01", "0:00:03", "S1", "Ross"],
    ["12", "1", "No idea.", "Doubt", "0:00:03", "0:00:04", "S1", "Rachel"],
    ["7", "3", "Watch out!", "Warn", "0:01:00", "0:01:02", "S2", "Amy"],
]
MINTREC2_KEYS = ["dia12_utt0", "dia12_utt1", "dia7_utt3"]


def mintrec2_release(root, header=MINTREC2_HEADER):
    """A MIntRec2.0 single-turn release: in-scope/ with the extractor-named pickles in
    video_data/ and audio_data/; float64 video, both pickle shapes."""
    rng = np.random.default_rng(1)
    video = {k: frames(rng, n, V, middle_axis=n % 2 == 0).astype(np.float64)
             for k, n in zip(MINTREC2_KEYS, (4, 200, 1))}
    audio = {k: frames(rng, n, A, middle_axis=n % 2 == 1) for k, n in zip(MINTREC2_KEYS, (401, 3, 2))}
    write_folder(root / "in-scope", header, {"test": MINTREC2_ROWS}, video, audio,
                 video_name="video_data/swin_roi_binary.pkl",
                 audio_name="audio_data/wavlm_feats_binary.pkl")
    return root, video, audio


def test_loads_mintrec2_release(tmp_path):
    root, video, audio = mintrec2_release(tmp_path / "MIntRec2.0")
    s = load_split(root, "MIntRec2.0", "test")
    info = DATASETS["mintrec2"]
    assert len(info.labels) == 30 and "UNK" not in info.labels   # the in-scope task is 30-way
    assert s.keys == MINTREC2_KEYS and not s.out_of_scope
    assert [info.labels[i] for i in s.labels] == ["Asking for opinions", "Doubt", "Warn"]
    assert s.video.shape == (3, 180, V) and s.audio.shape == (3, 400, A)
    assert s.video_lengths.tolist() == [4, 180, 1]
    assert s.audio_lengths.tolist() == [400, 3, 2]
    torch.testing.assert_close(s.video[0][:4], torch.from_numpy(video["dia12_utt0"][:, 0]).float())
    assert [n.split(":")[0] for n in s.notes] == ["swin_roi_binary.pkl", "wavlm_feats_binary.pkl"]
    assert all("converted once into the cache" in n for n in s.notes), s.notes
    # The in-scope folder itself loads the same.
    again = load_split(root / "in-scope", "mintrec2", "test")
    assert again.keys == s.keys and again.notes == []   # read from the cache
    torch.testing.assert_close(again.audio[:], s.audio[:])
    # Header spellings are matched case-insensitively, spaces or underscores.
    header2 = ["dialogue id", "UTTERANCE ID", "text", "label"]
    write_folder(tmp_path / "lower", header2, {"dev": [r[:4] for r in MINTREC2_ROWS]}, video, audio)
    assert load_split(tmp_path / "lower", "mintrec2", "dev", video_len=3, audio_len=3).keys == MINTREC2_KEYS


def test_mintrec2_out_of_scope_part_loads_as_class_30_and_in_scope_refuses_unk(tmp_path):
    """out-of-scope/MIntRec2.0-OOD/ beside in-scope/ (thuiar/MIntRec2.0 data/single_turn/base.py):
    its own pickles, every row UNK = class 30; found from the release root or from in-scope/."""
    root, video, audio = mintrec2_release(tmp_path / "MIntRec2.0")
    oos_rows = [[*r[:3], "UNK", *r[4:]] for r in MINTREC2_ROWS]
    write_folder(root / "out-of-scope" / "MIntRec2.0-OOD", MINTREC2_HEADER, {"train": oos_rows},
                 video, audio, video_name="video_data/swin_roi_binary.pkl",
                 audio_name="audio_data/wavlm_feats_binary.pkl")
    for folder in (root, root / "in-scope"):
        s = load_split(folder, "mintrec2", "train", out_of_scope=True, video_len=3, audio_len=3)
        assert s.out_of_scope and s.keys == MINTREC2_KEYS and s.labels.tolist() == [30, 30, 30]
        assert s.label_names == DATASETS["mintrec2"].labels
    # An intent in the out-of-scope part, UNK in the in-scope part: refused, naming file and line.
    write_folder(root / "out-of-scope" / "MIntRec2.0-OOD", MINTREC2_HEADER, {"dev": MINTREC2_ROWS},
                 video, audio, video_name="video_data/swin_roi_binary.pkl",
                 audio_name="audio_data/wavlm_feats_binary.pkl")
    with pytest.raises(ValueError, match=r"MIntRec2.0-OOD/dev.tsv, line 2: label 'Asking for "
                                         r"opinions' in an out-of-scope file.*labelled UNK"):
        load_split(root, "mintrec2", "dev", out_of_scope=True, video_len=3, audio_len=3)
    write_folder(root / "in-scope", MINTREC2_HEADER, {"dev": oos_rows}, video, audio,
                 video_name="video_data/swin_roi_binary.pkl",
                 audio_name="audio_data/wavlm_feats_binary.pkl")
    with pytest.raises(ValueError, match=r"in-scope/dev.tsv, line 2: label UNK \(out of scope\) in "
                                         r"an in-scope file; the in-scope task of mintrec2 is 30-way"):
        load_split(root, "mintrec2", "dev", video_len=3, audio_len=3)
    with pytest.raises(FileNotFoundError, match=r"no out-of-scope folder.*MIntRec2.0-OOD"):
        load_split(root / "in-scope" / "video_data", "mintrec2", "test", out_of_scope=True)
    with pytest.raises(ValueError, match="the open-intent protocol is MIntRec2.0's"):
        load_split(root, "mintrec", "test", out_of_scope=True)


def test_columns_by_position_when_the_header_does_not_name_them(tmp_path):
    header = ["Dialogue_id", "Utterance_id", "Utterance", "Label", "Start", "End", "Season", "Speaker"]
    root, _, _ = mintrec2_release(tmp_path / "MIntRec2.0", header)
    s = load_split(root, "mintrec2", "test", video_len=3, audio_len=3)
    assert s.keys == MINTREC2_KEYS and s.texts == [r[2] for r in MINTREC2_ROWS]
    notes = [n for n in s.notes if "by position" in n]
    assert len(notes) == 1 and "test.tsv" in notes[0] and "text" in notes[0], s.notes
    # MIntRec's documented positions: season, episode, clip, text, label.
    rng = np.random.default_rng(2)
    write_folder(tmp_path / "MIntRec", ["Season", "Episode", "Clip", "Utterance", "Intent"],
                 {"dev": [["S01", "E02", "3", "Hi.", "Greet"]]},
                 {"S01_E02_3": frames(rng, 2, V)}, {"S01_E02_3": frames(rng, 2, A)})
    s = load_split(tmp_path / "MIntRec", "mintrec", "dev", video_len=3, audio_len=3)
    assert s.keys == ["S01_E02_3"] and s.texts == ["Hi."]
    assert DATASETS["mintrec"].labels[s.labels[0]] == "Greet"
    assert any("label = column 5" in n for n in s.notes), s.notes


@pytest.mark.parametrize("release,video_name,audio_name,video_dim", [
    ("thuiar/MIntRec", "video_data/video_feats.pkl", "audio_data/audio_feats.pkl", 256),
    ("TCL-MAP", "video_feats.pkl", "audio_feats.pkl", 1024),
    ("MVCL-DAF", "swin_feats.pkl", "wavlm_feats.pkl", 1024),
])
def test_loads_each_mintrec_release(tmp_path, release, video_name, audio_name, video_dim):
    rng = np.random.default_rng(3)
    keys = ["S01_E01_1", "S01_E01_2"]
    video = {k: frames(rng, n, video_dim, middle_axis=n == 5) for k, n in zip(keys, (2, 5))}
    audio = {k: frames(rng, n, A) for k, n in zip(keys, (4, 1))}
    folder = write_folder(tmp_path / "MIntRec", ["season", "episode", "clip", "text", "label"],
                          {"train": [["S01", "E01", "1", "Hi.", "Greet"],
                                     ["S01", "E01", "2", "Bye.", "Leave"]]},
                          video, audio, video_name=video_name, audio_name=audio_name)
    s = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    assert s.video.shape == (2, TV, video_dim) and s.video.dim == video_dim and s.audio.dim == A
    assert s.video_lengths.tolist() == [2, 5] and s.audio_lengths.tolist() == [4, 1]
    torch.testing.assert_close(s.video[1][:5], torch.from_numpy(video["S01_E01_2"][:, 0]))


def test_feature_files_named_explicitly(mintrec_dir, tmp_path):
    folder, video, audio = mintrec_dir
    (folder / "feats").mkdir()
    os.rename(folder / "video_feats.pkl", folder / "feats" / "roi.pkl")
    os.rename(folder / "audio_feats.pkl", tmp_path / "wav.pkl")
    s = load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA,
                   video_feats_path="feats/roi.pkl", audio_feats_path=tmp_path / "wav.pkl")
    assert s.video_lengths.tolist() == [1] and s.audio_lengths.tolist() == [2]
    with pytest.raises(FileNotFoundError, match="roi2.pkl"):
        load_split(folder, "mintrec", "dev", video_feats_path="feats/roi2.pkl",
                   audio_feats_path=tmp_path / "wav.pkl")


def test_quotes_are_part_of_the_text(tmp_path):
    """An opening quote on row 5 and a closing one on row 9 merge nothing (csv's default
    quoting made them one field and gave a clip another row's label)."""
    rng = np.random.default_rng(4)
    labels = DATASETS["mintrec"].labels
    rows = [["S01", "E01", str(i), f"Line {i}.", labels[i % 20]] for i in range(40)]
    rows[5][3] = '"Wait, you mean it?'
    rows[9][3] = 'I do," she said.'
    rows[12][3] = '"'
    feats = {f"S01_E01_{i}": frames(rng, 1, 4) for i in range(40)}
    folder = write_folder(tmp_path / "q", ["season", "episode", "clip", "text", "label"],
                          {"train": rows}, feats, feats)
    s = load_split(folder, "mintrec", "train", video_len=2, audio_len=2)
    assert s.texts == [r[3] for r in rows]
    assert [labels[i] for i in s.labels] == [r[4] for r in rows]
    assert s.keys == [f"S01_E01_{i}" for i in range(40)]

def test_dataset_and_collate(mintrec_dir):
    folder, _, _ = mintrec_dir
    s = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    ds = MultimodalDataset(s)
    assert len(ds) == 4
    item = ds[2]
    assert set(item) == {"index", "text", "label", "video", "audio", "video_length", "audio_length"}
    assert item["index"] == 2 and item["text"] == '"Stop!" Now.'
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    batches = list(loader)
    b = batches[0]
    assert b["text"] == s.texts[:3]
    assert b["index"].tolist() == [0, 1, 2]
    torch.testing.assert_close(b["video"], s.video[:3])
    torch.testing.assert_close(b["audio"], s.audio[:3])
    assert b["label"].dtype == torch.int64 and b["label"].tolist() == s.labels[:3].tolist()
    assert b["video_length"].tolist() == s.video_lengths[:3].tolist()
    assert b["audio_length"].tolist() == s.audio_lengths[:3].tolist()
    assert batches[1]["video"].shape == (1, TV, V)


def cache_files(folder):
    return sorted(p.name for p in (folder / features.CACHE_SUBFOLDER).iterdir())


def test_each_pickle_is_converted_once(mintrec_dir, monkeypatch):
    folder, video, audio = mintrec_dir
    calls = []
    real_load = features.load_feature_pickle
    monkeypatch.setattr(features, "load_feature_pickle", lambda p: calls.append(p.name) or real_load(p))
    first = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA)
    assert calls == ["video_feats.pkl", "audio_feats.pkl"]
    files = cache_files(folder)
    assert len(files) == 4 and not [f for f in files if "tmp" in f], files
    # Later loads (a fresh process would do the same) read the cache: same values.
    again = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    assert calls == ["video_feats.pkl", "audio_feats.pkl"]
    torch.testing.assert_close(again.video[:], first.video[:])
    # A rewritten file is converted again, and its stale cache removed.
    video["S01_E01_1"] = frames(np.random.default_rng(5), 2, V)
    repickle(folder, "video_feats.pkl", video)
    st = os.stat(folder / "video_feats.pkl")
    os.utime(folder / "video_feats.pkl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA).video_lengths.tolist() == [2]
    assert calls == ["video_feats.pkl", "audio_feats.pkl", "video_feats.pkl"]
    assert len(cache_files(folder)) == 4 and cache_files(folder) != files


@pytest.mark.parametrize("how", ["in_place", "renamed_over"])
def test_a_pickle_replaced_with_its_size_and_mtime_restored_is_converted_again(mintrec_dir, how):
    folder, video, _ = mintrec_dir
    path = folder / "video_feats.pkl"
    before = load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA).video[:]
    old = os.stat(path)
    time.sleep(0.05)   # past the file system's timestamp granularity
    video["S01_E01_1"] = -video["S01_E01_1"]        # other values, the same pickled size
    blob = pickle.dumps(video)
    if how == "in_place":
        with open(path, "r+b") as f:
            f.write(blob)
    else:
        (folder / "replacement.pkl").write_bytes(blob)
        os.replace(folder / "replacement.pkl", path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = os.stat(path)
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    after = load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA)
    torch.testing.assert_close(after.video[:], -before)
    assert [n for n in after.notes if "other bytes than its cache's" in n], after.notes
    assert len(cache_files(folder)) == 4                  # the old cache is replaced


@pytest.mark.parametrize("how", ["chmod", "copied_back"])
def test_a_pickle_with_the_same_bytes_and_a_new_inode_or_ctime_is_hashed_once(mintrec_dir,
                                                                                monkeypatch, how):
    folder, _, _ = mintrec_dir
    path = folder / "video_feats.pkl"
    before = load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA).video[:]
    time.sleep(0.05)   # past the file system's timestamp granularity
    if how == "chmod":
        os.chmod(path, 0o444)
    else:
        old = os.stat(path)
        (folder / "copy.pkl").write_bytes(path.read_bytes())
        os.replace(folder / "copy.pkl", path)
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    calls = []
    real_load, real_digest = features.load_feature_pickle, features._digest
    monkeypatch.setattr(features, "load_feature_pickle", lambda p: calls.append("load") or real_load(p))
    monkeypatch.setattr(features, "_digest", lambda p: calls.append("hash") or real_digest(p))
    again = load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA)
    assert calls == ["hash"] and not again.notes
    torch.testing.assert_close(again.video[:], before)
    load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA)
    assert calls == ["hash"]   # the cache recorded the pickle's new identity


def damage(stem, how):
    frames, index = Path(f"{stem}.frames.npy"), Path(f"{stem}.index.npz")
    if how == "truncated_frames":
        frames.write_bytes(frames.read_bytes()[:frames.stat().st_size // 2])
    elif how == "frames_header_only":
        frames.write_bytes(frames.read_bytes()[:128])
    elif how == "empty_frames":
        frames.write_bytes(b"")
    elif how == "missing_frames":
        frames.unlink()
    elif how == "smaller_frames":   # a valid .npy, one frame short
        np.save(frames, np.load(frames)[:-1])
    elif how == "frames_of_another_width":
        np.save(frames, np.load(frames)[:, :-1])
    elif how == "frames_format_version":   # the .npy magic's minor version byte
        blob = bytearray(frames.read_bytes())
        blob[7] = 8
        frames.write_bytes(bytes(blob))
    elif how == "truncated_index":
        index.write_bytes(index.read_bytes()[:index.stat().st_size // 2])
    elif how == "index_compression_method":   # of its first member, in the central directory
        blob = bytearray(index.read_bytes())
        at = blob.index(b"PK\x01\x02") + 10
        blob[at:at + 2] = (99).to_bytes(2, "little")
        index.write_bytes(bytes(blob))
    elif how == "garbage_index":
        index.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    elif how == "smaller_index":    # a valid index of one key fewer
        with np.load(index) as arrays:
            kept = {k: arrays[k] for k in arrays.files}
        n = int(kept["counts"][-1])
        kept.update(keys=kept["keys"][:-1], offsets=kept["offsets"][:-1],
                    counts=kept["counts"][:-1], nonzero=kept["nonzero"][:-n])
        np.savez(index, **kept)
    elif how == "index_offsets_disagree":
        with np.load(index) as arrays:
            kept = {k: arrays[k] for k in arrays.files}
        kept["offsets"] = kept["offsets"] + 1
        np.savez(index, **kept)


@pytest.mark.parametrize("how", [
    "truncated_frames", "frames_header_only", "empty_frames", "missing_frames", "smaller_frames",
    "frames_of_another_width", "frames_format_version", "truncated_index",
    "index_compression_method", "garbage_index", "smaller_index", "index_offsets_disagree"])
def test_a_damaged_cache_is_rebuilt_once(mintrec_dir, monkeypatch, how):
    folder, _, _ = mintrec_dir
    first = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    (stem,) = {str(folder / features.CACHE_SUBFOLDER / f).split(".frames")[0]
               for f in cache_files(folder) if f.startswith("video_feats.pkl.") and ".frames" in f}
    damage(stem, how)
    calls = []
    real_load = features.load_feature_pickle
    monkeypatch.setattr(features, "load_feature_pickle", lambda p: calls.append(p.name) or real_load(p))
    again = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    assert calls == ["video_feats.pkl"]
    (note,) = [n for n in again.notes if "damaged" in n]
    assert note.startswith("video_feats.pkl: the cache was damaged (") and "\n" not in note, note
    torch.testing.assert_close(again.video[:], first.video[:])
    assert again.video_lengths.tolist() == first.video_lengths.tolist()
    third = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    assert calls == ["video_feats.pkl"] and not [n for n in third.notes if "damaged" in n]
    assert len(cache_files(folder)) == 4


def test_a_cache_that_stays_damaged_is_an_error(mintrec_dir, monkeypatch):
    folder, _, _ = mintrec_dir
    real_convert = features._convert

    def convert_then_truncate(source, stem, *args):
        real_convert(source, stem, *args)
        damage(stem, "truncated_frames")

    monkeypatch.setattr(features, "_convert", convert_then_truncate)
    with pytest.raises(ValueError, match=r"video_feats\.pkl\..*\.frames\.npy holds \d+ bytes"):
        load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA)


def test_cache_dir(mintrec_dir, tmp_path):
    folder, _, _ = mintrec_dir
    s = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA, cache_dir=tmp_path / "cache")
    assert not (folder / features.CACHE_SUBFOLDER).exists()
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    beside = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    torch.testing.assert_close(s.audio[:], beside.audio[:])


KILLED_CONVERSION = """
import os, signal, sys
import mvcl_fast.intent.features as features
real = features._finite_float32
seen = []
def dies_on_the_third_key(frames, path, key):
    seen.append(key)
    if len(seen) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(frames, path, key)
features._finite_float32 = dies_on_the_third_key
features.open_features(sys.argv[1])
"""


def test_a_killed_conversion_leaves_no_cache(mintrec_dir):
    import subprocess
    import sys

    folder, _, _ = mintrec_dir
    source = folder / "video_feats.pkl"
    proc = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(source)], timeout=120)
    assert proc.returncode == -9
    left = cache_files(folder)
    assert left and all(".tmp-" in f for f in left), left     # only the dead writer's temporaries
    s = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    assert s.video_lengths.tolist() == [3, TV, 2, TV]
    assert not [f for f in cache_files(folder) if ".tmp-" in f]   # cleaned up by the next writer


def test_workers_share_the_map(mintrec_dir):
    folder, _, _ = mintrec_dir
    s = load_split(folder, "mintrec", "train", video_len=TV, audio_len=TA)
    ds = MultimodalDataset(s)
    ds[0]                                   # opens the map in this process
    blob = pickle.dumps(ds)                 # what a worker receives: no map, no frames
    assert len(blob) < 20_000 and pickle.loads(blob).split.video.store._frames is None
    serial = list(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate))
    parallel = list(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate, num_workers=2))
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a["video"], b["video"])
        torch.testing.assert_close(a["audio"], b["audio"])


def test_pickles_of_numpy_1_and_every_protocol_load(tmp_path):
    feats = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((1, 1, 3), np.float64)}
    for protocol in (2, 4, 5):
        blob = pickle.dumps(feats, protocol=protocol)
        if protocol == 2:   # the module names numpy 1.x writes (the releases' pickles)
            blob = blob.replace(b"numpy._core.", b"numpy.core.")
        (tmp_path / "f.pkl").write_bytes(blob)
        got = features.load_feature_pickle(tmp_path / "f.pkl")
        assert got.keys() == feats.keys()
        for k in feats:
            np.testing.assert_array_equal(got[k], feats[k])


class RunsCode:
    """A crafted pickle's payload: unpickling it with pickle.load runs os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Declares:
    """Pickles as the call func(*args), then __setstate__(state) if given: what a crafted
    feature pickle can declare through the globals the loader allows."""

    def __init__(self, func, args, state=None):
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


def test_a_crafted_pickle_runs_nothing(mintrec_dir, tmp_path):
    folder, video, _ = mintrec_dir
    marker = tmp_path / "payload-ran"
    repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": RunsCode(marker)})
    with pytest.raises(ValueError) as info:
        load_split(folder, "mintrec", "dev", video_len=TV, audio_len=TA)
    message = str(info.value)
    assert "video_feats.pkl" in message and f"refused global {os.system.__module__}.system" in message
    assert not marker.exists()
    # The same payload through pickle.load does run: the test's payload is real.
    with open(folder / "video_feats.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


# ------------------------------------------------------------------ clear errors

def rewrite_tsv(folder, split, lines):
    (folder / f"{split}.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def repickle(folder, name, feats):
    with open(folder / name, "wb") as f:
        pickle.dump(feats, f)


HEADER = "season\tepisode\tclip\ttext\tlabel"


@pytest.mark.parametrize("case,exc,fragments", [
    ("no_folder", FileNotFoundError, ["nowhere", "does not exist"]),
    ("no_split", FileNotFoundError, ["test.tsv"]),
    ("no_video", FileNotFoundError, ["video features", "video_feats.pkl"]),
    ("no_audio", FileNotFoundError, ["audio features", "audio_feats.pkl"]),
    ("empty_tsv", ValueError, ["dev.tsv", "empty"]),
    ("header_only", ValueError, ["dev.tsv", "no data rows"]),
    ("missing_column", ValueError, ["dev.tsv", "clip"]),
    ("short_row", ValueError, ["dev.tsv", "line 3", "4 tab-separated fields", "header has 5"]),
    ("long_row", ValueError, ["dev.tsv", "line 2", "6 tab-separated fields"]),
    ("unknown_label", ValueError, ["dev.tsv", "line 3", "'Gossip'", "Complain", "Ask for help"]),
    ("missing_key", ValueError, ["video_feats.pkl", "'S01_E01_2'"]),
    ("wrong_width", ValueError, ["audio_feats.pkl", "'S01_E01_1'", "width 700", "'S04_E01_10' has 768"]),
    ("wrong_rank", ValueError, ["video_feats.pkl", "'S01_E01_1'", "(4, 2, 256)"]),
    ("rank_one", ValueError, ["video_feats.pkl", "'S01_E01_1'", "(256,)"]),
    ("not_a_dict", ValueError, ["audio_feats.pkl", "dict"]),
    ("unknown_dataset", ValueError, ["'mintrec3'", "mintrec2"]),
    ("nan_frame", ValueError, ["video_feats.pkl", "'S01_E01_1'", "frame 2 (of 4)", "nan", "finite"]),
    ("inf_frame", ValueError, ["audio_feats.pkl", "'S01_E01_1'", "frame 0 ", "inf"]),
    ("float64_overflow", ValueError, ["video_feats.pkl", "'S01_E01_1'", "frame 1 ", "1e+39",
                                      "beyond float32's range"]),
    ("not_utf8", ValueError, ["dev.tsv", "line 3", "not UTF-8", "b'\\xff'"]),
    ("truncated_pickle", ValueError, ["video_feats.pkl", "cannot read the feature pickle"]),
    ("not_a_pickle", ValueError, ["audio_feats.pkl", "UnpicklingError"]),
    ("empty_pickle", ValueError, ["audio_feats.pkl", "EOFError"]),
    ("strings_not_numbers", ValueError, ["video_feats.pkl", "'S01_E01_1'", "not real numbers"]),
    ("empty_dict", ValueError, ["audio_feats.pkl", "empty"]),
    ("long_text", ValueError, ["dev.tsv", "line 3", "field larger than field limit"]),
    ("meta_not_json", ValueError, ["synthetic.json", "does not read as JSON"]),
    ("meta_empty_object", ValueError, ["synthetic.json", "video_len", "got nothing"]),
    ("meta_list", ValueError, ["synthetic.json", "JSON list"]),
    ("meta_float_length", ValueError, ["synthetic.json", "video_len", "from 1 to 10000", "100000000.0"]),
    ("meta_huge_length", ValueError, ["synthetic.json", "audio_len", "100000000"]),
    ("huge_video_len", ValueError, ["video_len", "from 1 to 10000", "100000000"]),
    ("declares_huge_array", ValueError, ["video_feats.pkl", "(1000000000000, 256)",
                                         "larger than the file"]),
    ("huge_array_state", ValueError, ["video_feats.pkl", "buffer size does not match"]),
    ("direct_ndarray_call", ValueError, ["audio_feats.pkl", "direct call of numpy.ndarray"]),
    ("unknown_codec", ValueError, ["video_feats.pkl", "refused codec 'no-such-codec'"]),
    ("object_array", ValueError, ["video_feats.pkl", "refused an array of dtype dtype('O')"]),
    ("structured_array", ValueError, ["audio_feats.pkl", "refused an array of dtype"]),
    ("key_with_nul", ValueError, ["video_feats.pkl", "'S01_E01_1\\x00'", "NUL"]),
])
def test_clear_errors(mintrec_dir, tmp_path, case, exc, fragments):
    folder, video, audio = mintrec_dir
    target, dataset, split = folder, "mintrec", "dev"
    lengths = dict(video_len=TV, audio_len=TA)
    ok_row = "S01\tE01\t1\tHi there.\tGreet"
    if case == "no_folder":
        target = tmp_path / "nowhere"
    elif case == "no_split":
        split = "test"
    elif case == "no_video":
        (folder / "video_feats.pkl").unlink()
    elif case == "no_audio":
        (folder / "audio_feats.pkl").unlink()
    elif case == "empty_tsv":
        rewrite_tsv(folder, "dev", [])
    elif case == "header_only":
        rewrite_tsv(folder, "dev", [HEADER])
    elif case == "missing_column":
        rewrite_tsv(folder, "dev", ["season\tepisode\ttext\tlabel", "S01\tE01\tHi.\tGreet"])
    elif case == "short_row":
        rewrite_tsv(folder, "dev", [HEADER, ok_row, "S01\tE01\tHi.\tGreet"])
    elif case == "long_row":
        rewrite_tsv(folder, "dev", [HEADER, ok_row + "\textra"])
    elif case == "unknown_label":
        rewrite_tsv(folder, "dev", [HEADER, ok_row, "S01\tE01\t1\tDid you hear?\tGossip"])
    elif case == "missing_key":
        rewrite_tsv(folder, "dev", [HEADER, ok_row, "S01\tE01\t2\tHi.\tGreet"])
    elif case == "wrong_width":
        repickle(folder, "audio_feats.pkl", {**audio, "S01_E01_1": np.ones((3, 700), np.float32)})
    elif case == "wrong_rank":
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": np.ones((4, 2, V), np.float32)})
    elif case == "rank_one":
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": np.ones(V, np.float32)})
    elif case == "not_a_dict":
        repickle(folder, "audio_feats.pkl", [np.ones((3, A))])
    elif case == "unknown_dataset":
        dataset = "mintrec3"
    elif case == "nan_frame":
        bad = np.ones((4, V), np.float32)
        bad[2, 7] = np.nan
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": bad})
    elif case == "inf_frame":
        bad = np.ones((3, 1, A), np.float32)
        bad[0, 0, 0] = -np.inf
        repickle(folder, "audio_feats.pkl", {**audio, "S01_E01_1": bad})
    elif case == "float64_overflow":
        bad = np.ones((3, V), np.float64)
        bad[1, 3] = 1e39
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": bad})
    elif case == "not_utf8":
        (folder / "dev.tsv").write_bytes(f"{HEADER}\n{ok_row}\nS01\tE01\t2\tcaf\xe9\tGreet\n"
                                         .encode("latin-1").replace(b"\xe9", b"\xff"))
    elif case == "truncated_pickle":
        blob = (folder / "video_feats.pkl").read_bytes()
        (folder / "video_feats.pkl").write_bytes(blob[:len(blob) // 2])
    elif case == "not_a_pickle":
        (folder / "audio_feats.pkl").write_bytes(b"season\tepisode\n")
    elif case == "empty_pickle":
        (folder / "audio_feats.pkl").write_bytes(b"")
    elif case == "strings_not_numbers":
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": np.array([["a"] * V])})
    elif case == "empty_dict":
        repickle(folder, "audio_feats.pkl", {})
    elif case == "long_text":
        rewrite_tsv(folder, "dev", [HEADER, ok_row, f"S01\tE01\t1\t{'a' * 200_000}\tGreet"])
    elif case.startswith("meta_"):
        lengths = {}
        (folder / "synthetic.json").write_text({
            "meta_not_json": "{video_len: 3", "meta_empty_object": "{}", "meta_list": "[6, 5]",
            "meta_float_length": '{"video_len": 1e8, "audio_len": 5}',
            "meta_huge_length": '{"video_len": 6, "audio_len": 100000000}'}[case])
    elif case == "huge_video_len":
        lengths["video_len"] = 10**8
    elif case == "declares_huge_array":
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": Declares(
            np._core.multiarray._reconstruct, (np.ndarray, (10**12, V), b"b"))})
    elif case == "huge_array_state":
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": Declares(
            np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
            (1, (10**12, V), np.dtype(np.float32), False, b"\0" * 16))})
    elif case == "direct_ndarray_call":
        repickle(folder, "audio_feats.pkl", {**audio, "S01_E01_1": Declares(np.ndarray, ((10**12, A),))})
    elif case == "unknown_codec":
        import _codecs
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": Declares(
            _codecs.encode, ("abc", "no-such-codec"))})
    elif case == "object_array":   # numpy itself reads past the list of such a state and crashes
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1": Declares(
            np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
            (1, (10**6,), np.dtype(object), False, [1.0]))})
    elif case == "structured_array":
        repickle(folder, "audio_feats.pkl", {**audio, "S01_E01_1": np.zeros(3, "f4,f4")})
    elif case == "key_with_nul":
        repickle(folder, "video_feats.pkl", {**video, "S01_E01_1\0": frames(np.random.default_rng(1), 2, V)})
    with pytest.raises(exc) as info:
        load_split(target, dataset, split, **lengths)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# ------------------------------------------------------------------- synthetic

def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic.write_synthetic_mintrec(tmp_path / "a", seed=3, **synthetic.TINY)
    b = synthetic.write_synthetic_mintrec(tmp_path / "b", seed=3, **synthetic.TINY)
    c = synthetic.write_synthetic_mintrec(tmp_path / "c", seed=4, **synthetic.TINY)
    assert set(folder_bytes(a)) == {"train.tsv", "dev.tsv", "test.tsv", "video_feats.pkl",
                                    "audio_feats.pkl", "synthetic.json"}
    assert folder_bytes(a) == folder_bytes(b)
    differ = {k for k, v in folder_bytes(c).items() if folder_bytes(a)[k] != v}
    assert {"train.tsv", "video_feats.pkl", "audio_feats.pkl"} <= differ


def test_synthetic_mintrec2_release_is_deterministic_with_both_parts(tmp_path):
    tree = lambda root: {str(p.relative_to(root)): p.read_bytes()  # noqa: E731
                         for p in sorted(root.rglob("*")) if p.is_file() and ".mvcl-cache" not in p.parts}
    a = synthetic.write_synthetic_mintrec2(tmp_path / "a", seed=3, **synthetic.TINY2)
    b = synthetic.write_synthetic_mintrec2(tmp_path / "b", seed=3, **synthetic.TINY2)
    c = synthetic.write_synthetic_mintrec2(tmp_path / "c", seed=4, **synthetic.TINY2)
    assert tree(a) == tree(b) and tree(a)["in-scope/train.tsv"] != tree(c)["in-scope/train.tsv"]
    assert {f"{part}/{name}" for part in ("in-scope", "out-of-scope/MIntRec2.0-OOD")
            for name in ("train.tsv", "dev.tsv", "test.tsv", "synthetic.json",
                         "video_data/swin_roi_binary.pkl", "audio_data/wavlm_feats_binary.pkl")} < set(tree(a))
    in_scope = load_split(a, "mintrec2", "train")
    oos = load_split(a, "mintrec2", "test", out_of_scope=True)
    assert len(in_scope) == 60 and set(in_scope.labels.tolist()) == set(range(30))
    assert len(oos) == 10 and oos.labels.tolist() == [30] * 10
    assert not set(in_scope.keys) & set(oos.keys)    # keys unique across the two pickles
    assert in_scope.video.shape[1:] == (8, synthetic.VIDEO_DIM)


def test_synthetic_loads_in_the_mintrec_layout(tmp_path):
    tiny = dict(synthetic.TINY, n_train=200)
    folder = synthetic.write_synthetic_mintrec(tmp_path / "syn", seed=0, **tiny)
    header = (folder / "train.tsv").read_text().splitlines()[0]
    assert header == "season\tepisode\tclip\ttext\tlabel"
    splits = {s: load_split(folder, "mintrec", s) for s in ("train", "dev", "test")}
    keys = [k for s in splits.values() for k in s.keys]
    assert len(set(keys)) == len(keys) == tiny["n_train"] + tiny["n_dev"] + tiny["n_test"]
    tv, ta = tiny["video_len"], tiny["audio_len"]
    video = features.load_feature_pickle(folder / "video_feats.pkl")
    audio = features.load_feature_pickle(folder / "audio_feats.pkl")
    assert {a.ndim for a in video.values()} == {2, 3} and {a.ndim for a in audio.values()} == {2, 3}
    assert all(a.dtype == np.float32 for a in [*video.values(), *audio.values()])
    assert any(len(a) > tv for a in video.values()) and any(len(a) > ta for a in audio.values())
    for name, n in (("train", tiny["n_train"]), ("dev", tiny["n_dev"]), ("test", tiny["n_test"])):
        s = splits[name]
        assert len(s) == n
        # synthetic.json makes the short lengths the default
        assert s.video.shape == (n, tv, V) and s.audio.shape == (n, ta, A)
        assert s.video_lengths.min() >= 1 and s.video_lengths.max() <= tv
        assert s.audio_lengths.min() >= 1 and s.audio_lengths.max() <= ta
        assert (s.video_lengths < tv).any() and (s.audio_lengths < ta).any()
        assert s.label_names == DATASETS["mintrec"].labels
    train = splits["train"]
    # The ambiguous share: short replies that several intents use.
    ambiguous = [t in synthetic.AMBIGUOUS for t in train.texts]
    assert sum(ambiguous) == round(synthetic.DEFAULTS["ambiguous_fraction"] * len(train))
    by_reply = {}
    for t, y, amb in zip(train.texts, train.labels.tolist(), ambiguous):
        if amb:
            by_reply.setdefault(t, set()).add(y)
    assert max(len(v) for v in by_reply.values()) >= 3
    # Long tail: the head intent is several times as frequent as the tail one.
    counts = torch.bincount(train.labels, minlength=20)
    head = DATASETS["mintrec"].labels.index(synthetic.FREQUENCY_ORDER[0])
    tail = DATASETS["mintrec"].labels.index(synthetic.FREQUENCY_ORDER[-1])
    assert counts.min() >= 1 and counts[head] >= 5 * counts[tail]
    # Explicit lengths still win over synthetic.json.
    assert load_split(folder, "mintrec", "dev", video_len=3, audio_len=4).audio.shape[1:] == (4, A)


def test_synthetic_features_carry_the_class(tmp_path):
    """Class means of pooled video features separate the intents far better than chance."""
    folder = synthetic.write_synthetic_mintrec(tmp_path / "syn", seed=1, n_train=400, n_dev=1,
                                               n_test=200, video_len=8, audio_len=8, long_tail=False)
    tr, te = load_split(folder, split="train"), load_split(folder, split="test")

    def pooled(s):
        mask = torch.arange(s.video.shape[1])[None, :] < s.video_lengths[:, None]
        return (s.video[:] * mask[..., None]).sum(1) / s.video_lengths[:, None]

    ztr, zte = pooled(tr), pooled(te)
    means = torch.stack([ztr[tr.labels == c].mean(0) for c in range(20)])
    acc = (torch.cdist(zte, means).argmin(1) == te.labels).float().mean().item()
    assert 0.4 < acc < 0.95, acc


def test_ensure_synthetic_reuses_the_cache(tmp_path, monkeypatch):
    first = synthetic.ensure_synthetic(tmp_path / "cache", seed=2, **synthetic.TINY)
    assert (first / "synthetic.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temp folder left

    def must_not_write(*args, **kwargs):
        raise AssertionError("ensure_synthetic rewrote a cached set")

    monkeypatch.setattr(synthetic, "write_synthetic_mintrec", must_not_write)
    assert synthetic.ensure_synthetic(tmp_path / "cache", seed=2, **synthetic.TINY) == first
    monkeypatch.undo()
    other = synthetic.ensure_synthetic(tmp_path / "cache", seed=3, **synthetic.TINY)
    assert other != first and folder_bytes(other)["train.tsv"] != folder_bytes(first)["train.tsv"]
    with pytest.raises(TypeError, match="n_trian"):
        synthetic.ensure_synthetic(tmp_path / "cache", n_trian=5)


def test_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="ambiguous_fraction"):
        synthetic.write_synthetic_mintrec(tmp_path, ambiguous_fraction=1.5, **synthetic.TINY)
    with pytest.raises(ValueError, match="n_dev"):
        synthetic.write_synthetic_mintrec(tmp_path, **dict(synthetic.TINY, n_dev=0))
