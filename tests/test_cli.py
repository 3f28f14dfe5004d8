"""The trainer's command line refuses what it cannot do right: options, run folders, resume, errors.

Tiny synthetic set and random BERT; the runs that train take one or two steps.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch

from mvcl_fast.intent import checkpoints, runs
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent import trainer as trainer_lib
from mvcl_fast.intent.errors import CheckpointError, DataError
from test_train import argv, tiny_setup  # noqa: F401 (tiny_setup is a fixture)


@pytest.fixture
def no_model_loaded(monkeypatch):
    """Fail the test if the trainer starts loading anything: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Trainer was built although the options are invalid")

    monkeypatch.setattr(trainer_lib.Trainer, "__init__", refuse)


def usage_error(capsys, command) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_lib.main(command)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def fails_with(capsys, command) -> str:
    """main() exits 1 with one line and a hint on stderr (after any progress bar), no traceback."""
    assert train_lib.main(command) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message, hint = err.strip().splitlines()[-2:]
    assert message.startswith("python -m mvcl_fast.train: error: ") and hint.startswith("hint: "), err
    return err


# ------------------------------------------------------------ 1. every option checked
BAD_OPTIONS = [
    ("--epochs", "0", "an integer >= 1"), ("--epochs", "-1", "an integer >= 1"),
    ("--epochs", "two", "an integer >= 1"), ("--max-steps", "0", "an integer >= 1"),
    ("--lr", "-0.001", "a number > 0"), ("--lr", "nan", "a number > 0"),
    ("--fusion-lr", "-1", "a number > 0"), ("--lambda-proto", "-0.5", "a number >= 0"),
    ("--lambda-mv", "-1", "a number >= 0"), ("--patience", "0", "an integer >= 1"),
    ("--warmup", "2", "a number >= 0 and < 1"), ("--grad-clip", "-1", "a number >= 0"),
    ("--batch-size", "0", "an integer >= 1"), ("--eval-batch-size", "0", "an integer >= 1"),
    ("--video-width", "0", "an integer >= 4 and <= 8192, a multiple of 4"),
    ("--video-width", "10", "a multiple of 4"), ("--audio-width", "3", "a multiple of 2"),
    ("--video-layers", "0", "an integer >= 1"), ("--fusion-heads", "0", "an integer >= 1"),
    ("--tau", "0", "a number > 0"), ("--dropout", "1", "a number >= 0 and < 1"),
    ("--weight-decay", "-0.1", "a number >= 0"), ("--seed", "-1", "an integer >= 0"),
    ("--max-text-tokens", "0", "an integer >= 1"), ("--num-workers", "-1", "an integer >= 0"),
    ("--video-len", "0", "an integer >= 1"), ("--name", "../../x", "a folder name inside runs/"),
    ("--name", "/abs/path", "a folder name inside runs/"), ("--name", "..", "a folder name"),
    ("--device", "gpu", "auto, cpu, cuda or cuda:N"),
    ("--modalities", "text,smell", "a non-empty comma-separated subset of text, video, audio"),
    ("--modalities", "smell", "a non-empty comma-separated subset"),
    ("--modalities", "text,text", "subset"), ("--modalities", "", "a non-empty comma-separated subset"),
    ("--modalities", ",", "a non-empty comma-separated subset"), ("--seeds", "-1", "an integer >= 0"),
    ("--prototype-momentum", "1", "a number >= 0 and < 1"),
    ("--prototype-momentum", "-0.1", "a number >= 0 and < 1"),
    ("--batch-size", str(10**20), "an integer >= 1 and <= 65536"),
    ("--eval-batch-size", str(10**20), "an integer >= 1 and <= 65536"),
    ("--video-len", "100000000", "an integer >= 1 and <= 10000"),
    ("--audio-len", "100000000", "an integer >= 1 and <= 10000"),
    ("--video-width", str(10**20), "an integer >= 4 and <= 8192"),
    ("--audio-width", str(10**20), "an integer >= 2 and <= 8192"),
    ("--video-layers", str(10**9), "an integer >= 1 and <= 64"),
]


@pytest.mark.parametrize("option,value,rule", BAD_OPTIONS, ids=[f"{o} {v}" for o, v, _ in BAD_OPTIONS])
def test_bad_option_is_a_usage_error_naming_it_and_its_range(capsys, no_model_loaded, option, value, rule):
    err = usage_error(capsys, [option, value])
    assert f"argument {option}: must be " in err and rule in err, err


def test_fusion_heads_must_divide_the_text_width(tiny_setup, tmp_path, capsys, no_model_loaded):
    err = usage_error(capsys, argv(tiny_setup, tmp_path / "run", "--fusion-heads", "3"))
    assert "argument --fusion-heads: must divide the text encoder's width 32, got 3" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,message", [
    (["--resume", "runs/x", "--overwrite"], "--overwrite starts a run over and --resume continues it"),
    (["--name", "a", "--output-dir", "b"], "--name picks the folder runs/NAME and --output-dir"),
    (["--resume", "runs/x", "--output-dir", "b"], "--resume PATH already names the run folder"),
    (["--seeds", "1", "1"], "argument --seeds: must be at least two different seeds, got 1 1"),
    (["--seeds", "3"], "argument --seeds: must be at least two different seeds"),
    (["--seeds", "0", "1", "--resume", "runs/x"], "resume a seed's run on its own"),
    (["--prototypes", "ema", "--lambda-proto", "0"],
     "--prototypes ema keeps a bank for the prototype InfoNCE term, which --lambda-proto 0 turns off"),
    (["--modalities", "text,audio", "--eval-drop-modality", "video"],
     "argument --eval-drop-modality: video is not one of the model's modalities (text,audio)"),
    (["--modalities", "video,audio", "--eval-drop-modality", "text"],
     "argument --eval-drop-modality: text is not one of the model's modalities (video,audio)"),
])
def test_contradicting_options_are_usage_errors(capsys, no_model_loaded, extra, message):
    assert message in usage_error(capsys, extra)


def test_help_states_the_rules(capsys):
    with pytest.raises(SystemExit):
        train_lib.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("maximum number of epochs, an integer >= 1", "a number >= 0 and < 1",
                     "AdamW weight decay, a number >= 0", "a folder name inside runs/",
                     "--overwrite", "--debug", ".lock", "exit status: 0 done, 1 error"):
        assert expected in text, expected


# ------------------------------------------------------------------- 2. run folders
def test_a_locked_folder_is_refused_naming_the_process(tiny_setup, tmp_path, capsys):
    out_dir = tmp_path / "run"
    holder = runs.RunFolder.claim(out_dir, resume=False, overwrite=False)
    try:
        err = fails_with(capsys, argv(tiny_setup, out_dir))
    finally:
        holder.release()
    assert f"{out_dir} is in use by process {os.getpid()} on " in err
    assert not (out_dir / "train.log").exists()


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tiny_setup, tmp_path, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "metrics.json").write_text('{"earlier": "run"}')
    err = fails_with(capsys, argv(tiny_setup, out_dir))
    assert f"{out_dir} already holds a run (metrics.json)" in err and "--overwrite" in err
    assert (out_dir / "metrics.json").read_text() == '{"earlier": "run"}'


def test_overwrite_starts_over_and_stale_temporaries_are_removed(tiny_setup, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "metrics.json").write_text('{"earlier": "run"}')
    (out_dir / "train.log").write_text("the earlier run's log\n")
    # what a SIGKILL during a checkpoint write leaves
    stale = out_dir / f".last.pt{runs.TEMPORARY_MARK}k3j_x9q2"
    stale.write_bytes(b"\0" * 1024)
    assert train_lib.main(argv(tiny_setup, out_dir, "--epochs", "1", "--max-steps", "1",
                               "--overwrite")) == 0
    assert json.loads((out_dir / "metrics.json").read_text())["steps"] == 1
    assert "the earlier run's log" not in (out_dir / "train.log").read_text()
    assert not stale.exists() and not list(out_dir.glob(".*.tmp*"))


def test_outputs_replace_planted_symlinks_instead_of_writing_through_them(tmp_path):
    """Every trainer output goes through RunFolder.replace (checkpoints, metrics, the PNG) or
    RunFolder.open_log: neither writes through a symlink planted in the folder."""
    out_dir, outside = tmp_path / "run", tmp_path / "outside"
    out_dir.mkdir()
    outside.mkdir()
    targets = {name: outside / name for name in ("train.log", "confusion_matrix.png", ".lock")}
    for name, target in targets.items():
        target.write_text("not yours")
        (out_dir / name).symlink_to(target)
    folder = runs.RunFolder.claim(out_dir, resume=False, overwrite=False)
    try:
        folder.replace("confusion_matrix.png", lambda file: file.write(b"png"))
        with folder.open_log() as log:
            log.write("epoch 1\n")
    finally:
        folder.release()
    assert all(t.read_text() == "not yours" for t in targets.values()), "an output went through a link"
    assert not any((out_dir / name).is_symlink() for name in targets)
    assert (out_dir / "confusion_matrix.png").read_bytes() == b"png"
    assert (out_dir / "train.log").read_text() == "epoch 1\n"


# ---------------------------------------------------------------- 3. resume, no drift
@pytest.fixture(scope="module")
def finished_run(tiny_setup, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("finished")
    assert train_lib.main(argv(tiny_setup, out_dir, "--epochs", "1", "--max-steps", "2")) == 0
    return out_dir


def test_resume_refuses_options_that_change_the_run(finished_run, capsys):
    before = (finished_run / "metrics.json").read_text()
    err = usage_error(capsys, ["--resume", str(finished_run), "--epochs", "4", "--lr", "1e-3",
                               "--batch-size", "16"])     # the run's own batch size is no change
    message, = (line for line in err.splitlines() if ": error: " in line)
    assert "--epochs 4 (the run's: 1), --lr 0.001 (the run's: 5e-05) would change the run" in message
    assert "--batch-size" not in message
    assert (finished_run / "metrics.json").read_text() == before


@pytest.mark.parametrize("extra,message", [
    (["--prototypes", "ema"], "--prototypes ema (the run's: batch) would change the run"),
    (["--prototype-momentum", "0.5"], "--prototype-momentum 0.5 (the run's: 0.9) would change the run"),
])
def test_resume_refuses_another_prototype_mode(finished_run, capsys, extra, message):
    assert message in usage_error(capsys, ["--resume", str(finished_run), *extra])


def test_resume_takes_runtime_options_and_says_a_finished_run_is_reported_again(finished_run, capsys):
    first = json.loads((finished_run / "metrics.json").read_text())
    assert train_lib.main(["--resume", str(finished_run), "--num-workers", "0", "--device", "cpu",
                           "--compile", "off"]) == 0
    assert "the run had finished: its result again" in capsys.readouterr().out
    again = json.loads((finished_run / "metrics.json").read_text())
    assert again["test"] == first["test"] and again["history"] == first["history"]


class Payload:
    """Unpickling this calls Path.touch(marker): the proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_a_crafted_checkpoint_never_runs_its_payload(tmp_path, capsys):
    out_dir, marker = tmp_path / "crafted", tmp_path / "payload-ran"
    out_dir.mkdir()
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "args": Payload(str(marker))},
               out_dir / "last.pt")
    with pytest.raises(pickle.UnpicklingError):    # the file is real: the default load would run it
        torch.load(out_dir / "last.pt", weights_only=True)
    err = fails_with(capsys, ["--resume", str(out_dir)])
    assert "holds Python objects other than tensors and plain values; refused" in err
    with pytest.raises(CheckpointError, match="refused"):
        checkpoints.load_checkpoint(out_dir / "last.pt")   # what best.pt is read with, too
    assert not marker.exists()


def test_checkpoints_load_with_weights_only(finished_run):
    for name in ("last.pt", "best.pt"):
        state = torch.load(finished_run / name, map_location="cpu", weights_only=True)
        assert state["format"] == checkpoints.CHECKPOINT_FORMAT


def test_an_unreadable_checkpoint_is_a_checkpoint_error(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    assert f"{tmp_path / 'last.pt'} is not a readable checkpoint" in fails_with(
        capsys, ["--resume", str(tmp_path)])
    assert "--resume: " in fails_with(capsys, ["--resume", str(tmp_path / "missing")])


# ------------------------------------------------------------ 4. errors a person can read
def test_data_error_is_one_line_and_debug_keeps_the_traceback(tiny_setup, tmp_path, capsys):
    command = argv(tiny_setup, tmp_path / "run", "--data-dir", str(tmp_path / "no-data"))
    err = fails_with(capsys, command)
    assert f"data folder {tmp_path / 'no-data'} does not exist" in err and "--data-dir" in err
    with pytest.raises(DataError, match="does not exist"):
        train_lib.main(command + ["--debug"])


def _gpt2_folder(folder):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(folder)
    for name in ("vocab.json", "model.safetensors"):     # present, so the model type is what fails
        (folder / name).write_text("{}")
    return folder


@pytest.mark.parametrize("case,message", [
    ("missing", "no such folder"),
    ("empty", "the folder has no config.json and no tokenizer files and no weights"),
    ("config only", "the folder has no tokenizer files and no weights"),
    ("gpt2", "a 'gpt2' model is not an encoder-only BERT-family model"),
])
def test_text_model_is_checked_before_anything_loads(tiny_setup, tmp_path, capsys, no_model_loaded,
                                                     case, message):
    folder = tmp_path / "text-model"
    if case != "missing":
        folder.mkdir()
    if case == "config only":
        (folder / "config.json").write_text(Path(tiny_setup[1], "config.json").read_text())
    if case == "gpt2":
        _gpt2_folder(folder)
    command = argv(tiny_setup, tmp_path / "run") + ["--text-model", str(folder)]
    assert f"--text-model {folder}: {message}" in fails_with(capsys, command)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fill a disk")
def test_a_full_disk_is_reported_as_such_naming_the_folder(tiny_setup, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "run"
    real_mkstemp = tempfile.mkstemp

    def on_a_full_disk(dir=None, prefix=None, **kwargs):
        fd, path = real_mkstemp(dir=dir, prefix=prefix, **kwargs)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)     # every write to the temporary file: ENOSPC
        os.close(full)
        return fd, path

    monkeypatch.setattr(runs.tempfile, "mkstemp", on_a_full_disk)
    err = fails_with(capsys, argv(tiny_setup, out_dir, "--epochs", "1", "--max-steps", "1"))
    assert f"no space left on the device of {out_dir} (writing best.pt)" in err
    assert not list(out_dir.glob(".*.tmp*")) and not (out_dir / "best.pt").exists()
