"""The trainer end to end on a tiny synthetic set and a tiny random BERT (CPU, seconds)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import exit_spawned_rank
from mvcl_fast.intent import cli, distributed
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent import trainer as trainer_lib
from mvcl_fast.intent.model import MVCLDAFPlusPlus, MVCLLoss, load_text_encoder
from mvcl_fast.intent.synthetic import TINY, ensure_synthetic
from test_model import make_tiny_bert


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    data_dir = ensure_synthetic(tmp_path_factory.mktemp("data"), **TINY)
    bert = make_tiny_bert(tmp_path_factory.mktemp("bert"))
    return str(data_dir), bert


def argv(tiny_setup, out_dir, *extra):
    data_dir, bert = tiny_setup
    return ["--data-dir", data_dir, "--text-model", bert, "--output-dir", str(out_dir),
            "--batch-size", "16", "--epochs", "2", "--video-width", "16", "--video-layers", "1",
            "--audio-width", "16", "--fusion-heads", "4", "--compile", "off", *extra]


def last_state(out_dir):
    return torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_lib.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("usage: python -m mvcl_fast.train", "examples:", "--lambda-proto",
                     "(default: 5e-05)", "--resume", "metrics.json", "--modalities text",
                     "--video-feats", "--audio-feats", "--cache-dir", "--select-metric"):
        assert expected in text, expected
    # Per-dataset defaults are spelled out (argparse wraps the lines).
    flat = " ".join(text.split())
    assert "default: 30 for mintrec, 76 for mintrec2" in flat
    assert "default: f1 for mintrec, acc for mintrec2" in flat


def test_help_keeps_one_example_per_line_and_spells_out_the_modalities(capsys):
    with pytest.raises(SystemExit):
        train_lib.main(["--help"])
    text = capsys.readouterr().out
    for line in ("  python -m mvcl_fast.train --modalities text --name text-only\n",
                 "  python -m mvcl_fast.train --lambda-proto 0 --name no-proto\n",
                 "  python -m mvcl_fast.train --seeds 0 1 2 3 4 --name paper\n",
                 "  python -m mvcl_fast.predict runs/my-run --data-dir data/MIntRec --split test\n"):
        assert line in text, line
    assert "{text,text" not in text
    flat = " ".join(text.split())
    assert "a non-empty comma- separated subset of text, video, audio" in flat   # wrapped at the hyphen
    assert "without text the encoder reads [CLS] [MASK]*label_len [SEP]" in flat
    assert "--precision {auto,bf16,fp16,fp32}" in flat and "--eval-drop-modality MODALITY" in flat


@pytest.mark.parametrize("given,stored", [("audio,text", "text,audio"), ("video, text", "text,video"),
                                          ("text,audio,video", "text,video,audio"), ("text", "text"),
                                          ("audio,video", "video,audio"), ("audio", "audio")])
def test_modalities_in_any_order_are_stored_in_the_models_order(given, stored):
    assert cli.train_parser().parse_args(["--modalities", given]).modalities == stored


@pytest.mark.parametrize("dataset,tokens,metric", [("mintrec", 30, "f1"), ("mintrec2", 76, "acc")])
def test_dataset_defaults_and_their_overrides(dataset, tokens, metric):
    args = cli.train_parser().parse_args(["--dataset", dataset])
    train_lib.apply_dataset_defaults(args)
    assert (args.max_text_tokens, args.select_metric) == (tokens, metric)
    args = cli.train_parser().parse_args(["--dataset", dataset, "--max-text-tokens", "12",
                                                "--select-metric", "weighted_f1"])
    train_lib.apply_dataset_defaults(args)
    assert (args.max_text_tokens, args.select_metric) == (12, "weighted_f1")


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mvcl_fast.train", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--fusion-lr" in out.stdout, out.stderr


def test_training_writes_metrics_checkpoint_and_confusion_matrix(tiny_setup, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert train_lib.main(argv(tiny_setup, out_dir)) == 0
    printed = capsys.readouterr().out
    assert "ACC" in printed and "weighted P" in printed and "epoch 2:" in printed
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"acc", "f1", "precision", "recall", "weighted_f1", "weighted_precision"}
    assert all(0.0 <= v <= 100.0 for v in metrics["test"].values())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and len(metrics["epoch_seconds"]) == 2
    assert metrics["steps"] == 2 * 4          # 60 training utterances, batches of 16
    assert (out_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] in (1, 2) and not any(k.startswith("anchor_encoder.") for k in best["model"])
    state = last_state(out_dir)
    assert state["finished"] and state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert not list(out_dir.glob(".*tmp*")), "a temporary checkpoint file was left behind"


def test_trains_on_a_mintrec2_release_with_named_features(tiny_setup, tmp_path, capsys):
    """in-scope/ layout, a 1024-d video pickle under another name (--video-feats), the cache in
    --cache-dir, DataLoader workers reading the map; MIntRec2.0's defaults apply."""
    import pickle

    import numpy as np

    from mvcl_fast.intent.data import DATASETS

    labels = DATASETS["mintrec2"].labels
    rng = np.random.default_rng(0)
    root = tmp_path / "MIntRec2.0"
    video, audio = {}, {}
    for split, n in (("train", 16), ("dev", 8), ("test", 8)):
        lines = ["Dialogue_id\tUtterance_id\tText\tLabel\tStart\tEnd\tSeason\tSpeaker"]
        for u in range(n):
            key = f"dia{split}_utt{u}"
            lines.append(f"{split}\t{u}\t\"Really?\" said {u}.\t{labels[u % len(labels)]}\t0\t1\tS1\tAmy")
            video[key] = rng.standard_normal((3, 1, 1024)).astype(np.float32)
            audio[key] = rng.standard_normal((5, 768)).astype(np.float32)
        (root / "in-scope").mkdir(parents=True, exist_ok=True)
        (root / "in-scope" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, feats in (("video_data/swin_full.pkl", video), ("audio_data/wavlm_feats_binary.pkl", audio)):
        (root / "in-scope" / name).parent.mkdir(exist_ok=True)
        (root / "in-scope" / name).write_bytes(pickle.dumps(feats))
    _, bert = tiny_setup
    out_dir = tmp_path / "run"
    assert train_lib.main(["--dataset", "mintrec2", "--data-dir", str(root), "--text-model", bert,
                           "--output-dir", str(out_dir), "--batch-size", "8", "--epochs", "1",
                           "--video-width", "16", "--video-layers", "1", "--audio-width", "16",
                           "--fusion-heads", "4", "--compile", "off", "--video-len", "4",
                           "--audio-len", "4", "--video-feats", "video_data/swin_full.pkl",
                           "--cache-dir", str(tmp_path / "cache"), "--num-workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "converted once into the cache" in printed and "dev acc" in printed
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["args"]["select_metric"] == "acc" and metrics["args"]["max_text_tokens"] == 76
    # in scope: 30 intents, no UNK logit, class or group member; no open-intent figures
    assert metrics["labels"] == list(labels) and len(labels) == 30 and "UNK" not in labels
    assert metrics["model_config"]["num_labels"] == 30 and list(metrics["test_per_class"]) == list(labels)
    assert sorted(sum(metrics["test_group_intents"].values(), [])) == sorted(labels)
    assert "test_open" not in metrics and "open intent" not in printed
    assert metrics["model_config"]["video_dim"] == 1024 and metrics["model_config"]["audio_dim"] == 768
    assert not list(root.rglob("*.npy"))     # the cache went to --cache-dir


@pytest.fixture(scope="module")
def uninterrupted(tiny_setup, tmp_path_factory):
    full_dir = tmp_path_factory.mktemp("full")
    assert train_lib.main(argv(tiny_setup, full_dir, "--max-steps", "6")) == 0
    return full_dir


@pytest.mark.parametrize("stop_at_step", [2, 4], ids=["mid-epoch", "epoch-boundary"])
def test_resume_after_interrupt_equals_uninterrupted(tiny_setup, uninterrupted, tmp_path, monkeypatch,
                                                     stop_at_step):
    full_dir, cut_dir = uninterrupted, tmp_path / "cut"

    real_step = trainer_lib.Trainer.train_step
    calls = {"n": 0}

    def step_then_ctrl_c(self, batch):
        stats = real_step(self, batch)
        calls["n"] += 1
        if calls["n"] == stop_at_step:
            signal.raise_signal(signal.SIGINT)    # what Ctrl-C sends; the trainer's handler catches it
        return stats

    monkeypatch.setattr(trainer_lib.Trainer, "train_step", step_then_ctrl_c)
    assert train_lib.main(argv(tiny_setup, cut_dir, "--max-steps", "6")) == 130
    cut = last_state(cut_dir)
    assert cut["global_step"] == stop_at_step and not cut["finished"]
    assert (cut["epoch"], cut["step_in_epoch"]) == divmod(stop_at_step, 4)

    monkeypatch.setattr(trainer_lib.Trainer, "train_step", real_step)
    assert train_lib.main(["--resume", str(cut_dir)]) == 0
    full, resumed = last_state(full_dir), last_state(cut_dir)
    assert resumed["global_step"] == full["global_step"] == 6
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), f"{name} differs after resume"
    full_metrics = json.loads((full_dir / "metrics.json").read_text())
    resumed_metrics = json.loads((cut_dir / "metrics.json").read_text())
    assert resumed_metrics["test"] == full_metrics["test"]
    # the whole per-epoch record: the train losses of the interrupted epoch too
    assert resumed_metrics["history"] == full_metrics["history"]


def test_ema_prototype_bank_resumes_bitwise_from_a_weights_only_checkpoint(tiny_setup, tmp_path,
                                                                             monkeypatch):
    """Batches of 30: every intent of the split is in epoch 1's two batches, so the loss reads the
    bank from step 3, the first after the cut (at step 2) and the resume."""
    from mvcl_fast.intent import checkpoints

    options = ("--prototypes", "ema", "--prototype-momentum", "0.8", "--batch-size", "30",
               "--max-steps", "3")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    assert train_lib.main(argv(tiny_setup, full_dir, *options)) == 0

    real_step = trainer_lib.Trainer.train_step
    bank_read = []

    def step_then_ctrl_c(self, batch):
        bank_read.append(self.criterion.bank_ready())
        stats = real_step(self, batch)
        if self.progress.global_step + 1 == 2:
            signal.raise_signal(signal.SIGINT)
        return stats

    monkeypatch.setattr(trainer_lib.Trainer, "train_step", step_then_ctrl_c)
    assert train_lib.main(argv(tiny_setup, cut_dir, *options)) == 130
    cut = last_state(cut_dir)
    assert cut["global_step"] == 2 and cut["criterion"]["prototype_seen"].all()

    loads = []
    real_load = checkpoints.torch.load
    monkeypatch.setattr(checkpoints.torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    assert train_lib.main(["--resume", str(cut_dir)]) == 0
    assert bank_read == [False, False, True]    # the resumed step read the restored bank
    assert loads and all(k.get("weights_only") is True for k in loads)   # last.pt, then best.pt
    full, resumed = last_state(full_dir), last_state(cut_dir)
    assert resumed["global_step"] == full["global_step"] == 3
    assert set(full["criterion"]) == {"prototype_bank", "prototype_seen", "bank_in_use"}
    for name, value in full["criterion"].items():
        assert torch.equal(value, resumed["criterion"][name]), f"{name} differs after resume"
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), f"{name} differs after resume"
    assert resumed["args"]["prototypes"] == "ema" and resumed["args"]["prototype_momentum"] == 0.8


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_setup, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "nan"
    real_loss = MVCLLoss.forward
    calls = {"n": 0}

    def loss_turning_nan(self, out, labels):
        calls["n"] += 1
        total, parts = real_loss(self, out, labels)
        return (total * float("nan") if calls["n"] == 6 else total), parts   # epoch 2, step 2

    monkeypatch.setattr(MVCLLoss, "forward", loss_turning_nan)
    assert train_lib.main(argv(tiny_setup, out_dir)) == 1
    printed = capsys.readouterr().err
    assert "stopping at epoch 2, step 2 (global step 6): the training loss is nan" in printed
    assert f"the last good checkpoint is {out_dir / 'last.pt'} (epoch 1)" in printed
    assert "stopping at epoch 2, step 2" in (out_dir / "train.log").read_text()
    state = last_state(out_dir)
    assert state["epoch"] == 1 and state["global_step"] == 4 and not state["finished"]
    assert not (out_dir / "metrics.json").exists()


def test_report_has_per_class_figures_groups_and_blanked_modalities(tiny_setup, tmp_path, capsys):
    out_dir = tmp_path / "drop"
    assert train_lib.main(argv(tiny_setup, out_dir, "--epochs", "1", "--max-steps", "2",
                               "--eval-drop-modality", "text", "video")) == 0
    printed = capsys.readouterr().out
    assert "test without text" in printed and "test without video" in printed and "tail" in printed
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for key in ("test", "test_without_text", "test_without_video"):
        assert set(metrics[key]) == {"acc", "f1", "precision", "recall", "weighted_f1",
                                     "weighted_precision"}, key
    assert "test_without_audio" not in metrics
    per_class = metrics["test_per_class"]
    assert list(per_class) == metrics["labels"]
    assert sum(row["support"] for row in per_class.values()) == 20
    groups = metrics["test_groups"]
    assert sum(row["support"] for row in groups.values()) == 20
    intents = metrics["test_group_intents"]
    assert sorted(sum(intents.values(), [])) == sorted(metrics["labels"])
    assert [len(intents[g]) for g in ("head", "middle", "tail")] == [7, 7, 6]


def test_seeds_train_one_run_each_and_summarise_them(tiny_setup, tmp_path, capsys):
    out_dir = tmp_path / "seeds"
    assert train_lib.main(argv(tiny_setup, out_dir, "--epochs", "1", "--max-steps", "1",
                               "--seeds", "3", "5")) == 0
    assert "2 seeds (3 5), mean +- standard deviation" in capsys.readouterr().out
    runs = {seed: json.loads((out_dir / f"seed-{seed}" / "metrics.json").read_text()) for seed in (3, 5)}
    assert [r["args"]["seed"] for r in runs.values()] == [3, 5]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["seeds"] == [3, 5]
    acc = summary["metrics"]["test"]["acc"]
    assert acc["values"] == [runs[3]["test"]["acc"], runs[5]["test"]["acc"]]
    assert acc["mean"] == round((acc["values"][0] + acc["values"][1]) / 2, 2)
    assert "+-" in (out_dir / "summary.txt").read_text()


def test_text_only_ablation_runs_without_audio_video_layers(tiny_setup, tmp_path):
    out_dir = tmp_path / "text"
    assert train_lib.main(argv(tiny_setup, out_dir, "--modalities", "text", "--lambda-mv", "0",
                               "--max-steps", "2")) == 0
    state = last_state(out_dir)
    assert not any(k.startswith("streams.") for k in state["model"])
    assert tuple(state["model_config"]["modalities"]) == ("text",)
    assert os.path.exists(out_dir / "metrics.json")


@pytest.mark.parametrize("modalities", ["video,audio", "audio"])
def test_runs_without_text_keep_the_label_prompt(tiny_setup, tmp_path, monkeypatch, modalities):
    seen = []   # the encoder's inputs: the label prompt alone, [CLS] [MASK]*label_len [SEP]
    real_forward = MVCLDAFPlusPlus.forward

    def recording_forward(self, input_ids, attention_mask, label_start, **rest):
        seen.append((input_ids, attention_mask, label_start))
        return real_forward(self, input_ids, attention_mask, label_start, **rest)

    monkeypatch.setattr(MVCLDAFPlusPlus, "forward", recording_forward)
    out_dir = tmp_path / modalities.replace(",", "-")
    assert train_lib.main(argv(tiny_setup, out_dir, "--modalities", modalities, "--epochs", "1",
                               "--max-steps", "2")) == 0
    state = last_state(out_dir)
    assert tuple(state["model_config"]["modalities"]) == tuple(modalities.split(","))
    assert {k.split(".")[1] for k in state["model"] if k.startswith("streams.")} == set(modalities.split(","))
    tokenizer = load_text_encoder(tiny_setup[1])[0]
    label_len = state["model_config"]["label_len"]
    prompt = [tokenizer.cls_token_id, *[tokenizer.mask_token_id] * label_len, tokenizer.sep_token_id]
    for input_ids, attention_mask, label_start in seen:
        assert all(row == prompt for row in input_ids.tolist())
        assert bool(attention_mask.all()) and bool((label_start == 1).all())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["args"]["modalities"] == modalities and "acc" in metrics["test"]


# ------------------------------------------------------------- DDP (2 gloo ranks)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, world, port, args_list, out_dir, signal_at=None):
    """One torchrun-like worker: the environment torchrun sets, then the trainer.

    signal_at=(rank, step): that rank alone gets a SIGINT after that step.
    """
    import time

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if signal_at is not None and signal_at[0] == rank:
        real_step = trainer_lib.Trainer.train_step

        def step_then_signal(self, batch):
            stats = real_step(self, batch)
            if self.progress.global_step + 1 == signal_at[1]:
                signal.raise_signal(signal.SIGINT)
            return stats

        trainer_lib.Trainer.train_step = step_then_signal
    args, state = train_lib.prepare_args(args_list)
    dist_ctx = distributed.from_env(args.device)
    trainer = trainer_lib.Trainer(args, resume_state=state, dist_ctx=dist_ctx)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    try:
        code = train_lib.run(trainer, state is not None, time.perf_counter())
        torch.save({"code": code, "initial": initial, "final": trainer.model.state_dict(),
                    "steps": trainer.progress.global_step}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        trainer.close()
    exit_spawned_rank()


def _spawn_ddp(args_list, out_dir, signal_at=None):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, _free_port(), args_list, str(out_dir), signal_at), nprocs=2,
             join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_setup(tiny_setup, tmp_path_factory):
    """The data (21 test items: the sampler repeats one so both ranks have 11) and one
    uninterrupted 2-process run of 3 steps (60 items / 2 ranks / 16 per batch: 2 per epoch)."""
    root = tmp_path_factory.mktemp("ddp")
    odd_data = ensure_synthetic(root / "data", **{**TINY, "n_test": 21})

    def args_for(out_dir):
        return argv(tiny_setup, out_dir, "--device", "cpu", "--max-steps", "3",
                    "--data-dir", str(odd_data))

    out_dir = root / "full"
    return args_for, out_dir, _spawn_ddp(args_for(out_dir), root)


def test_two_process_ddp_training_keeps_the_ranks_equal(ddp_setup):
    _, out_dir, ranks = ddp_setup
    assert [r["code"] for r in ranks] == [0, 0]
    assert [r["steps"] for r in ranks] == [3, 3]
    for name, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][name]), f"{name} differs between the ranks"
    changed = [k for k, v in ranks[0]["final"].items()
               if v.is_floating_point() and not torch.equal(v, ranks[0]["initial"][k])]
    assert any(k.startswith("daf.") for k in changed) and any(k.startswith("text_encoder.") for k in changed)
    # rank 0 alone writes: one log line per epoch, the metrics of the whole test split
    log = (out_dir / "train.log").read_text()
    assert log.count("epoch 1:") == 1 and "x 2 processes" in log
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["environment"]["world_size"] == 2 and metrics["steps"] == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == 21   # every test item once, no repeats
    state = last_state(out_dir)
    assert len(state["rng"]) == 2 and state["global_step"] == 3 and state["world_size"] == 2


def test_ddp_signal_on_one_rank_stops_both_and_resumes_exactly(ddp_setup, tmp_path, capsys):
    args_for, full_dir, full = ddp_setup
    cut_dir = tmp_path / "cut"
    # Ctrl-C on rank 1 only; the ranks agree on it at the loss readings, here after every step
    ranks = _spawn_ddp(args_for(cut_dir) + ["--log-every", "1"], tmp_path, signal_at=(1, 1))
    assert [r["code"] for r in ranks] == [130, 130] and [r["steps"] for r in ranks] == [1, 1]
    cut = last_state(cut_dir)
    assert (cut["epoch"], cut["step_in_epoch"], cut["finished"]) == (0, 1, False)
    assert train_lib.main(["--resume", str(cut_dir)]) == 1      # one process cannot continue it
    assert "written by 2 process(es); resume it with the same number" in capsys.readouterr().err
    resumed = _spawn_ddp(["--resume", str(cut_dir), "--device", "cpu"], tmp_path)
    assert [r["code"] for r in resumed] == [0, 0] and [r["steps"] for r in resumed] == [3, 3]
    for name, value in full[0]["final"].items():
        assert torch.equal(value, resumed[0]["final"][name]), f"{name} differs after the resume"
        assert torch.equal(value, resumed[1]["final"][name]), f"{name} differs on rank 1"
    full_metrics = json.loads((full_dir / "metrics.json").read_text())
    assert json.loads((cut_dir / "metrics.json").read_text())["test"] == full_metrics["test"]


def test_torchrun_entry_point(tiny_setup, tmp_path):
    out_dir = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "mvcl_fast.train", *argv(tiny_setup, out_dir, "--max-steps", "2", "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["environment"]["world_size"] == 2 and metrics["steps"] == 2
