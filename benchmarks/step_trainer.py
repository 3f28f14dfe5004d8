"""A real Trainer at MIntRec's shapes on the synthetic set, for counting its training step
(benchmarks/bench_step_structure.py, tests/test_structure_step.py).

MIntRec as the TCL-MAP / MVCL-DAF release has it: 30 text word pieces + the label slots, video
230 x 1024, audio 480 x 768 frames, each clip with its own number of real frames. The synthetic
set is written in the MIntRec layout at those lengths; its 256-d video features are tiled to
1024-d, and one training utterance is lengthened so that 30 word pieces are kept (the trainer
caps the text at the longest training utterance). The text encoders are a random-init BERT
(transformers.BertConfig with the given overrides; the defaults are bert-base) with the
bert-base-uncased vocabulary of the installed all-MiniLM-L6-v2 package. The trainer's
options are its defaults but for bf16 autocast (its CUDA default, here the CPU's autocast),
the CPU and compile off.
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np

MINTREC = dict(text_tokens=30, video=(230, 1024), audio=(480, 768))


def write_mintrec_data(folder: Path, n_train: int) -> Path:
    from mvcl_fast.intent.synthetic import VIDEO_DIM, write_synthetic_mintrec

    (video_len, video_dim), (audio_len, _) = MINTREC["video"], MINTREC["audio"]
    data = write_synthetic_mintrec(folder, n_train=n_train, n_dev=4, n_test=4,
                                   video_len=video_len, audio_len=audio_len)
    path = data / "video_feats.pkl"
    with open(path, "rb") as f:
        video = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump({k: np.tile(v, video_dim // VIDEO_DIM) for k, v in video.items()}, f, protocol=4)
    tsv = data / "train.tsv"
    rows = list(csv.reader(tsv.read_text(encoding="utf-8").splitlines(), delimiter="\t",
                           quoting=csv.QUOTE_NONE))
    rows[1][3] += " really" * MINTREC["text_tokens"]
    with open(tsv, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE,
                   quotechar=None).writerows(rows)
    return data


def write_bert(folder: Path, **overrides) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mvcl_fast.intent.model import default_text_model

    AutoTokenizer.from_pretrained(default_text_model()).save_pretrained(folder)
    BertModel(BertConfig(**overrides)).save_pretrained(folder)
    return folder


def mintrec_trainer(folder: Path, batch_size: int = 16, **bert):
    """A Trainer (mvcl_fast.intent.trainer) over the synthetic MIntRec-shaped set in folder,
    two batches of training data, with a BERT of BertConfig(**bert)."""
    from mvcl_fast.intent.train import prepare_args
    from mvcl_fast.intent.trainer import Trainer

    folder = Path(folder)
    data = write_mintrec_data(folder / "data", 2 * batch_size)
    text_model = write_bert(folder / "bert", **bert)
    args, _ = prepare_args(["--data-dir", str(data), "--text-model", str(text_model),
                            "--output-dir", str(folder / "run"), "--batch-size", str(batch_size),
                            "--precision", "bf16", "--device", "cpu", "--compile", "off"])
    return Trainer(args)
