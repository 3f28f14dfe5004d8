"""Expected failures of train, predict and analyze: one error line, a hint, an exit status.

One table of cases walks all three commands: bad options (2), bad data, checkpoints, output
folders, a full disk, a diverging run (1) and interrupts (130). For each: the exit status,
exactly one ``PROG: error:`` line naming the file or option, a ``hint:`` line after it, no
traceback on stderr, and under ``--debug`` the exception itself. Then the cases that need more
than the table: a full disk at each write of a run, a second Ctrl-C while last.pt is written,
NaN weights before a checkpoint, and a user's hidden files beside a run's temporaries.
Tiny synthetic set and random BERT; one tiny trained run serves predict and analyze.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from mvcl_fast.intent import analyze, checkpoints, predict, runs
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent import trainer as trainer_lib
from test_train import argv, tiny_setup  # noqa: F401 (tiny_setup is a fixture)

COMMANDS = {"train": train_lib.main, "predict": predict.main, "analyze": analyze.main}
PROGS = {name: f"python -m mvcl_fast.{name}" for name in COMMANDS}
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def trained(tiny_setup, tmp_path_factory):
    """One finished tiny run (one step), read by the predict and analyze cases."""
    run_dir = tmp_path_factory.mktemp("trained")
    assert train_lib.main(argv(tiny_setup, run_dir, "--epochs", "1", "--max-steps", "1")) == 0
    return run_dir


@dataclass
class Ctx:
    data_dir: str
    run: Path               # the trained run (read only)
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    tiny_setup: tuple

    def train_argv(self, out_dir, *extra):
        return argv(self.tiny_setup, out_dir, *extra)

    def crafted_run(self, name: str, source: str, change: Callable[[dict], None]) -> Path:
        """A copy of the trained run's checkpoint `source`, changed, in a new folder."""
        folder = self.tmp / name
        folder.mkdir()
        state = torch.load(self.run / source, map_location="cpu", weights_only=True)
        change(state)
        torch.save(state, folder / source)
        return folder

    def prototypes_argv(self, run, *extra):
        """analyze prototypes of run with batch sizes the tiny split holds, few batches."""
        return ["prototypes", str(run), "--batch-sizes", "8", "16", "--batches", "5", *extra]


class Payload:
    """Unpickling this would run os.system."""

    def __reduce__(self):
        return os.system, ("touch payload-ran",)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _refuse_writes_in(folder: Path, monkeypatch) -> None:
    """What a folder without write permission does (the tests run as root, who may write)."""
    real_mkstemp, real_open = runs.tempfile.mkstemp, runs._open_not_through_link

    def mkstemp(dir=None, **kwargs):
        if Path(dir) == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real_mkstemp(dir=dir, **kwargs)

    def open_not_through_link(path, flags):
        if path.parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags)

    monkeypatch.setattr(runs.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(runs, "_open_not_through_link", open_not_through_link)


def _fill_disk_at(name: str, monkeypatch) -> None:
    """Every write of the output `name` (through runs.replace_file) fails with ENOSPC."""
    real_mkstemp = runs.tempfile.mkstemp

    def mkstemp(dir=None, prefix=None, **kwargs):
        fd, path = real_mkstemp(dir=dir, prefix=prefix, **kwargs)
        if prefix.startswith(f".{name}{runs.TEMPORARY_MARK}"):
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
        return fd, path

    monkeypatch.setattr(runs.tempfile, "mkstemp", mkstemp)


def _empty_hub_cache(ctx) -> None:
    """A Hugging Face cache of the test's own, empty (the suite runs with HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    ctx.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(ctx.tmp / "hub"))


def _no_cuda(ctx):
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _file_in_the_way(ctx) -> Path:
    path = ctx.tmp / "a-file"
    path.write_text("mine\n")
    return path


def _unwritable_data(ctx) -> str:
    """A copy of the data folder without its feature cache, where no folder can be made."""
    copy = shutil.copytree(ctx.data_dir, ctx.tmp / "data",
                           ignore=shutil.ignore_patterns(".mvcl-cache"))
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(copy)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    ctx.monkeypatch.setattr(Path, "mkdir", mkdir)
    return str(copy)


def _second_signal_while_saving(ctx) -> None:
    """Ctrl-C after the first step, and again while last.pt is being written."""
    real_step, real_save = trainer_lib.Trainer.train_step, checkpoints.torch.save

    def step_then_ctrl_c(self, batch):
        stats = real_step(self, batch)
        signal.raise_signal(signal.SIGINT)
        return stats

    def save_during_ctrl_c(obj, file, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_save(obj, file, *args, **kwargs)

    ctx.monkeypatch.setattr(trainer_lib.Trainer, "train_step", step_then_ctrl_c)
    ctx.monkeypatch.setattr(checkpoints.torch, "save", save_during_ctrl_c)


def _drop(field):
    return lambda state: state.pop(field)


def _set(field, value):
    return lambda state: state.__setitem__(field, value)


def _set_in(field, key, value):
    return lambda state: state[field].__setitem__(key, value)


def _shrink_a_weight(state):
    name = next(k for k, v in state["model"].items() if k.startswith("classifier") and v.ndim == 2)
    state["model"][name] = state["model"][name][:-1]


def _mintrec2_with_unk(state):
    """What a mintrec2 run wrote while the in-scope task had a 31st label, UNK."""
    from mvcl_fast.intent.data import DATASETS

    state["label_names"] = [*DATASETS["mintrec2"].labels, "UNK"]
    state["model_config"]["num_labels"] = 31
    for name in ("classifier.weight", "classifier.bias"):
        weight = state["model"][name]
        state["model"][name] = torch.cat([weight, weight[:31 - len(weight)]])


@dataclass
class Case:
    id: str
    command: str
    argv: Callable[[Ctx], list]     # also sets the case up
    status: int
    names: str                      # what the error line must name (the file or the option)
    hint: str = ""                  # what the hint must say


T, P, A = "train", "predict", "analyze"
BIG = str(10**20)
CASES = [
    # ------------------------------------------------------------- options (2)
    Case("train: an abbreviated option", T, lambda c: c.train_argv(c.tmp / "o", "--epoch", "1"),
         2, "unrecognized arguments: --epoch 1"),
    Case("train: --batch-size 10**20", T, lambda c: c.train_argv(c.tmp / "o", "--batch-size", BIG),
         2, "--batch-size"),
    Case("train: --eval-batch-size 10**20", T,
         lambda c: c.train_argv(c.tmp / "o", "--eval-batch-size", BIG), 2, "--eval-batch-size"),
    Case("train: --video-len 1e8", T, lambda c: c.train_argv(c.tmp / "o", "--video-len", "100000000"),
         2, "--video-len"),
    Case("train: an unknown --preset", T, lambda c: c.train_argv(c.tmp / "o", "--preset", "bert"),
         2, "argument --preset: invalid choice: 'bert'"),
    Case("predict: --output, not --output-dir", P,
         lambda c: [str(c.run), "--data-dir", c.data_dir, "--output", str(c.tmp / "pred.tsv")],
         2, "unrecognized arguments: --output"),
    Case("train: --open-intent on MIntRec", T, lambda c: c.train_argv(c.tmp / "o", "--open-intent"),
         2, "--open-intent: the open-intent protocol is MIntRec2.0's"),
    Case("train: --ood-weight without --open-intent", T,
         lambda c: c.train_argv(c.tmp / "o", "--ood-weight", "2"), 2, "--ood-weight"),
    Case("predict: an unknown option", P,
         lambda c: [str(c.run), "--data-dir", c.data_dir, "--no-such-option"], 2, "--no-such-option"),
    Case("predict: --batch-size 10**20", P,
         lambda c: [str(c.run), "--data-dir", c.data_dir, "--batch-size", BIG], 2, "--batch-size"),
    Case("analyze: --batches 10**20", A, lambda c: ["prototypes", str(c.run), "--batches", BIG],
         2, "--batches"),
    Case("analyze: --batch-size 10**20", A, lambda c: ["prototypes", str(c.run), "--batch-size", BIG],
         2, "--batch-size"),
    Case("analyze: an abbreviated option", A,
         lambda c: ["embeddings", str(c.run), "--out", str(c.tmp / "x.png")], 2, "--out"),
    # --------------------------------------------------------------- device (1)
    Case("train: --device cuda without CUDA", T,
         lambda c: _no_cuda(c) or c.train_argv(c.tmp / "o", "--device", "cuda"), 1, "--device cuda",
         "--device cpu"),
    Case("train: --compile step on the CPU", T,
         lambda c: c.train_argv(c.tmp / "o", "--compile", "step", "--device", "cpu"), 1,
         "--compile step", "--device cuda"),
    Case("predict: --device cuda without CUDA", P,
         lambda c: _no_cuda(c) or [str(c.run), "--data-dir", c.data_dir, "--device", "cuda"],
         1, "--device cuda", "--device cpu"),
    # ------------------------------------------------------------- text model (1)
    Case("train: a hub id not in the cache, downloads off", T,
         lambda c: _empty_hub_cache(c) or c.train_argv(c.tmp / "o", "--text-model", "org/absent"),
         1, "--text-model org/absent: no such folder", "hf download org/absent"),
    # ------------------------------------------------------------------- data (1)
    Case("train: no data folder", T,
         lambda c: c.train_argv(c.tmp / "o", "--data-dir", str(c.tmp / "none")), 1, "none"),
    Case("train: a data folder where the cache cannot be written", T,
         lambda c: c.train_argv(c.tmp / "o", "--data-dir", _unwritable_data(c)), 1, "data",
         "--cache-dir"),
    Case("predict: a data folder where the cache cannot be written", P,
         lambda c: [str(c.run), "--data-dir", _unwritable_data(c), "--output-dir", str(c.tmp / "o")],
         1, "--data-dir", "--cache-dir"),
    # ------------------------------------------------------------ checkpoints (1)
    Case("train: --resume of best.pt", T, lambda c: ["--resume", str(c.run / "best.pt")], 1, "best.pt"),
    Case("train: --resume of a last.pt without a field", T,
         lambda c: ["--resume", str(c.crafted_run("no-rng", "last.pt", _drop("rng")))], 1, "'rng'"),
    Case("train: --resume of a last.pt with a field of the wrong type", T,
         lambda c: ["--resume", str(c.crafted_run("epoch-str", "last.pt", _set("epoch", "1")))],
         1, "'epoch'"),
    Case("train: --resume of a last.pt with an option of the wrong type", T,
         lambda c: ["--resume", str(c.crafted_run("args", "last.pt", _set_in("args", "batch_size", "16")))],
         1, "'batch_size'"),
    Case("train: --resume of a last.pt whose widths are not the data's", T,
         lambda c: ["--resume", str(c.crafted_run("widths", "last.pt",
                                                  _set_in("model_config", "video_dim", 48)))],
         1, "video_dim"),
    Case("train: --resume of a last.pt whose weights do not fit", T,
         lambda c: ["--resume", str(c.crafted_run("weights", "last.pt", _shrink_a_weight))],
         1, "'model'"),
    Case("train: --resume of a checkpoint with a payload", T,
         lambda c: ["--resume", str(c.crafted_run("payload", "last.pt", _set("args", Payload())))],
         1, "posix.system"),
    Case("predict: an unknown model_config field", P,
         lambda c: [str(c.crafted_run("cfg", "best.pt", _set_in("model_config", "depth", 3))),
                    "--data-dir", c.data_dir], 1, "'depth'"),
    Case("predict: a model_config field of the wrong type", P,
         lambda c: [str(c.crafted_run("cfg-type", "best.pt", _set_in("model_config", "video_dim", "32"))),
                    "--data-dir", c.data_dir], 1, "'video_dim'"),
    Case("predict: a checkpoint without label_names", P,
         lambda c: [str(c.crafted_run("labels", "best.pt", _drop("label_names"))),
                    "--data-dir", c.data_dir], 1, "'label_names'"),
    Case("predict: a MIntRec2.0 checkpoint with the former UNK logit", P,
         lambda c: [str(c.crafted_run("unk-logit", "best.pt", _mintrec2_with_unk)),
                    "--data-dir", c.data_dir], 1, "a logit for UNK besides its 30 intents",
         "train it again"),
    Case("predict: a best.pt with DOC thresholds of another length", P,
         lambda c: [str(c.crafted_run("doc", "best.pt", _set("open_intent", {"thresholds": [0.6]}))),
                    "--data-dir", c.data_dir], 1, "'open_intent'"),
    Case("analyze: a best.pt with a payload", A,
         lambda c: c.prototypes_argv(c.crafted_run("payload", "best.pt", _set("model", Payload()))),
         1, "posix.system"),
    Case("analyze: a best.pt whose options lack data_dir", A,
         lambda c: c.prototypes_argv(c.crafted_run("no-data-dir", "best.pt",
                                                     lambda s: s["args"].pop("data_dir"))),
         1, "'data_dir'"),
    # ------------------------------------------------------ output folders (1)
    Case("train: --output-dir is a file", T, lambda c: c.train_argv(_file_in_the_way(c)), 1, "a-file"),
    Case("train: a read-only output folder", T,
         lambda c: _refuse_writes_in(c.tmp / "o", c.monkeypatch) or c.train_argv(c.tmp / "o"),
         1, ".lock"),
    Case("predict: --output-dir is a file", P,
         lambda c: [str(c.run), "--data-dir", c.data_dir, "--output-dir", str(_file_in_the_way(c))],
         1, "a-file"),
    Case("predict: a read-only output folder", P,
         lambda c: _refuse_writes_in(c.tmp / "o", c.monkeypatch) or [
             str(c.run), "--data-dir", c.data_dir, "--output-dir", str(c.tmp / "o")],
         1, "predictions.tsv"),
    Case("analyze: --output in a file's place", A,
         lambda c: c.prototypes_argv(c.run, "--output", str(_file_in_the_way(c) / "p.png")),
         1, "a-file"),
    Case("analyze: a read-only output folder", A,
         lambda c: _refuse_writes_in(c.tmp, c.monkeypatch) or [
             *c.prototypes_argv(c.run, "--output", str(c.tmp / "p.png"))], 1, "p.png"),
    # ------------------------------------------------------------ full disk (1)
    Case("train: a full disk at best.pt", T,
         lambda c: _fill_disk_at("best.pt", c.monkeypatch) or c.train_argv(
             c.tmp / "o", "--epochs", "1", "--max-steps", "1"), 1, "best.pt"),
    Case("predict: a full disk at predictions.tsv", P,
         lambda c: _fill_disk_at("predictions.tsv", c.monkeypatch) or [
             str(c.run), "--data-dir", c.data_dir, "--output-dir", str(c.tmp / "o")],
         1, "predictions.tsv"),
    Case("analyze: a full disk at the JSON", A,
         lambda c: _fill_disk_at("p.json", c.monkeypatch) or [
             *c.prototypes_argv(c.run, "--output", str(c.tmp / "p.png"))], 1, "p.json"),
    # ------------------------------------------------------------- divergence (1)
    Case("train: a diverging run", T,
         lambda c: c.train_argv(c.tmp / "o", "--epochs", "1", "--lr", "1e6", "--fusion-lr", "1e6",
                                "--grad-clip", "0"), 1, "stopping at epoch 1"),
    # ------------------------------------------------------------- interrupts (130)
    Case("train: a second Ctrl-C while last.pt is written", T,
         lambda c: _second_signal_while_saving(c) or c.train_argv(c.tmp / "o", "--max-steps", "3"),
         130, "last.pt"),
    Case("predict: Ctrl-C", P,
         lambda c: c.monkeypatch.setattr(predict, "loaded_model_outputs", _interrupt) or [
             str(c.run), "--data-dir", c.data_dir, "--output-dir", str(c.tmp / "o")],
         130, "interrupted before the outputs in"),
    Case("analyze: Ctrl-C", A,
         lambda c: c.monkeypatch.setattr(analyze, "loaded_model_outputs", _interrupt) or [
             *c.prototypes_argv(c.run, "--output", str(c.tmp / "p.png"))],
         130, "interrupted before the outputs in"),
]


def run_case(command: str, argv_: list) -> int:
    try:
        return COMMANDS[command](argv_)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_an_expected_failure_is_one_line_and_a_hint(case, trained, tiny_setup, tmp_path, monkeypatch,
                                                   capsys):
    ctx = Ctx(data_dir=tiny_setup[0], run=trained, tmp=tmp_path, monkeypatch=monkeypatch,
              tiny_setup=tiny_setup)
    command_argv = case.argv(ctx)
    status = run_case(case.command, command_argv)
    err = capsys.readouterr().err
    assert status == case.status, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if ": error: " in line]
    assert len(errors) == 1, err
    error_line = lines[errors[0]]
    assert error_line.startswith(f"{PROGS[case.command]}"), err
    assert case.names in error_line, err
    assert "weights_only" not in err, err       # never torch's advice to load a file unsafely
    assert errors[0] + 1 < len(lines) and lines[errors[0] + 1].startswith("hint: "), err
    assert case.hint in lines[errors[0] + 1], err
    assert not (tmp_path / "payload-ran").exists() and not Path("payload-ran").exists()
    if case.status != 2:
        # the same case, set up again, under --debug: the exception itself
        monkeypatch.undo()
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        with pytest.raises(BaseException) as raised:
            COMMANDS[case.command](case.argv(ctx) + ["--debug"])
        assert not isinstance(raised.value, SystemExit)


# ------------------------------------------------------- a full disk at every write
RUN_WRITES = [runs.LOCK_NAME, runs.LOG_NAME, "best.pt", runs.LAST_CHECKPOINT,
              "confusion_matrix.png", "metrics.json"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fill a disk")
@pytest.mark.parametrize("target", RUN_WRITES)
def test_a_full_disk_at_each_write_of_a_run(target, tiny_setup, tmp_path, monkeypatch, capsys):
    """ENOSPC at the first write of each file the run writes: one line naming the file and the
    folder; last.pt absent or whole; a hint that promises --resume only with a last.pt."""
    out_dir = tmp_path / "run"
    if target == runs.LOCK_NAME:
        def pwrite(*args):
            raise ENOSPC
        monkeypatch.setattr(runs.os, "pwrite", pwrite)
    elif target == runs.LOG_NAME:
        real_open = runs._open_not_through_link

        def open_log_on_a_full_disk(path, flags):
            fd = real_open(path, flags)
            if path.name == runs.LOG_NAME:
                full = os.open("/dev/full", os.O_WRONLY)
                os.dup2(full, fd)
                os.close(full)
            return fd
        monkeypatch.setattr(runs, "_open_not_through_link", open_log_on_a_full_disk)
    else:
        _fill_disk_at(target, monkeypatch)
    status = train_lib.main(argv(tiny_setup, out_dir, "--epochs", "1", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err, err
    message, hint = [line for line in err.splitlines() if line.strip()][-2:]
    assert message.startswith("python -m mvcl_fast.train: error: no space left on the device of "
                              f"{out_dir} (writing {target})"), err
    assert hint.startswith("hint: ")
    last = out_dir / runs.LAST_CHECKPOINT
    assert ("--resume" in hint) == last.exists(), err
    if last.exists():
        assert checkpoints.load_checkpoint(last)["format"] == checkpoints.CHECKPOINT_FORMAT
    assert not [p for p in out_dir.iterdir() if runs.TEMPORARY_NAME.fullmatch(p.name)]


# ----------------------------------------------------------------- interrupts
def test_a_second_ctrl_c_while_last_pt_is_written_leaves_it_whole(tiny_setup, tmp_path, monkeypatch,
                                                                 capsys):
    ctx = Ctx(tiny_setup[0], tmp_path, tmp_path, monkeypatch, tiny_setup)
    _second_signal_while_saving(ctx)
    out_dir = tmp_path / "run"
    assert train_lib.main(argv(tiny_setup, out_dir, "--max-steps", "3")) == 130
    err = capsys.readouterr().err
    assert f"the last good checkpoint is {out_dir / 'last.pt'}" in err
    assert f"--resume {out_dir} continues from it" in err
    state = checkpoints.load_checkpoint(out_dir / "last.pt")
    assert state["global_step"] == 1 and not state["finished"]     # the save the signal hit
    assert "error: interrupted" in (out_dir / "train.log").read_text()


def test_a_ctrl_c_inside_torch_save_keeps_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"the earlier file")

    def interrupted_save(file):
        torch.save({"a": torch.zeros(10000)}, _Interrupting(file))

    with pytest.raises(KeyboardInterrupt):
        runs.replace_file(tmp_path, "x.pt", interrupted_save)
    assert (tmp_path / "x.pt").read_bytes() == b"the earlier file"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


class _Interrupting:
    """A file whose second write is interrupted (torch.save turns that into a RuntimeError)."""

    def __init__(self, file):
        self.file, self.writes = file, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 2:
            raise KeyboardInterrupt
        return self.file.write(data)

    def flush(self):
        self.file.flush()


# ------------------------------------------------------------------ divergence
def test_nan_weights_stop_the_run_before_a_checkpoint_holds_them(tiny_setup, tmp_path, monkeypatch,
                                                                 capsys):
    """An update that leaves NaN weights on an epoch's last step (its loss was finite): the
    run stops before the dev evaluation and last.pt keeps the epoch before."""
    real_step = trainer_lib.Trainer.train_step

    def step_poisoning_a_weight(self, batch):
        stats = real_step(self, batch)
        if self.progress.global_step + 1 == 8:        # epoch 2's last step (4 per epoch)
            with torch.no_grad():
                next(self.model.classifier.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(trainer_lib.Trainer, "train_step", step_poisoning_a_weight)
    out_dir = tmp_path / "run"
    assert train_lib.main(argv(tiny_setup, out_dir)) == 1
    err = capsys.readouterr().err
    assert "stopping after global step 8: the weights are NaN/Inf" in err
    assert f"the last good checkpoint is {out_dir / 'last.pt'} (epoch 1)" in err
    state = checkpoints.load_checkpoint(out_dir / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    best = checkpoints.load_checkpoint(out_dir / "best.pt")
    assert all(torch.isfinite(v).all() for v in best["model"].values())


def test_nan_activations_are_the_trainers_to_report(tiny_setup, tmp_path, monkeypatch, capsys):
    """Inf video frames make the activations NaN before the loss: the model's fused ops run
    without value checks, so the trainer's loss check names the step (no op's ValueError)."""
    real_inputs = trainer_lib.model_inputs

    def inf_video(*args, **kwargs):
        inputs = real_inputs(*args, **kwargs)
        inputs["video"] = torch.full_like(inputs["video"], float("inf"))
        return inputs

    monkeypatch.setattr(trainer_lib, "model_inputs", inf_video)
    assert train_lib.main(argv(tiny_setup, tmp_path / "run", "--epochs", "1")) == 1
    err = capsys.readouterr().err
    assert "error: stopping at epoch 1, step 1 (global step 1): the training loss is nan" in err, err
    assert "contains NaN or Inf" not in err and "Traceback" not in err
    assert "no checkpoint had been written yet" in err and "--resume" not in err


# ------------------------------------------------------------ run folders
def test_starting_a_run_keeps_the_users_hidden_files(tiny_setup, tmp_path):
    """Only the temporaries the package writes (.NAME.mvcl_fast-tmp-XXXXXXXX) are removed."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    mine = [".thesis.tmp.bak", ".notes.tmp", ".last.pt.tmp-12345", f".x{runs.TEMPORARY_MARK}toolong99"]
    for name in mine:
        (out_dir / name).write_text("mine\n")
    stale = out_dir / f".best.pt{runs.TEMPORARY_MARK}ab_cd123"
    stale.write_bytes(b"\0" * 16)
    assert train_lib.main(argv(tiny_setup, out_dir, "--epochs", "1", "--max-steps", "1")) == 0
    assert all((out_dir / name).read_text() == "mine\n" for name in mine)
    assert not stale.exists()


# ------------------------------------------------------------------ checkpoints
def test_a_damaged_pickle_inside_a_checkpoint_is_a_checkpoint_error(trained, tmp_path):
    """The zip intact, its data.pkl cut short: what torch's unpickler raises then (struct.error,
    IndexError, ...) is one CheckpointError naming the file."""
    import io
    import zipfile

    with zipfile.ZipFile(trained / "best.pt") as src:
        members = [(info.filename, src.read(info)) for info in src.infolist()]
    damaged = io.BytesIO()
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as dst:
        for name, data in members:
            dst.writestr(name, data[:len(data) // 2] if name.endswith("data.pkl") else data)
    path = tmp_path / "best.pt"
    path.write_bytes(damaged.getvalue())
    with pytest.raises(checkpoints.CheckpointError, match=f"{path} is not a readable checkpoint"):
        checkpoints.load_checkpoint(path)


def test_a_flipped_byte_in_a_checkpoints_weights_is_a_checkpoint_error(tmp_path):
    """torch.load does not check the archive's CRCs: a flipped byte in a tensor's data would load
    as other weights. load_checkpoint checks them and refuses the file."""
    path = tmp_path / "last.pt"
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT,
                "weights": torch.full((256,), 1.2345, dtype=torch.float32)}, path)
    assert checkpoints.load_checkpoint(path)["weights"][0] == torch.tensor(1.2345)
    data = bytearray(path.read_bytes())
    at = data.find(torch.tensor([1.2345] * 4).numpy().tobytes())
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoints.CheckpointError, match=r"is damaged \(.*data/0 fails its CRC check\)"):
        checkpoints.load_checkpoint(path)
