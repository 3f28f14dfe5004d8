"""python -m mvcl_fast.analyze: embeddings and prototypes of tiny trained runs (CPU, seconds)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from mvcl_fast.intent import analyze
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent.synthetic import TINY, ensure_synthetic
from test_model import make_tiny_bert

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_UTTERANCES = 60


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of one epoch, two steps on a tiny set (40 test utterances: the silhouette needs
    fewer intents than utterances), and a copy of its folder (a second run to map beside it)."""
    root = tmp_path_factory.mktemp("analyze")
    data_dir = ensure_synthetic(root / "data", **{**TINY, "n_test": 40})
    bert = make_tiny_bert(tmp_path_factory.mktemp("bert"))
    run = root / "run"
    assert train_lib.main([
        "--data-dir", str(data_dir), "--text-model", bert, "--output-dir", str(run),
        "--batch-size", "16", "--epochs", "1", "--max-steps", "2", "--video-width", "16",
        "--video-layers", "1", "--audio-width", "16", "--fusion-heads", "4", "--compile", "off"]) == 0
    copy = shutil.copytree(run, root / "copy", ignore=shutil.ignore_patterns(".lock"))
    return [run, copy]


def usage_error(capsys, command) -> str:
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(command)
    assert exit_info.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def fails_with(capsys, command) -> str:
    assert analyze.main(command) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "hint: " in err, err
    return err


def test_embeddings_of_two_runs_side_by_side(runs, tmp_path, capsys):
    png = tmp_path / "figures" / "embeddings.png"
    assert analyze.main(["embeddings", *map(str, runs), "--perplexity", "5", "--output",
                         str(png), "--device", "cpu"]) == 0
    assert "nearest-prototype accuracy" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC
    results = json.loads(png.with_suffix(".json").read_text())
    assert results["split"] == "test" and results["perplexity"] == 5.0
    assert [r["run"] for r in results["runs"]] == [str(r) for r in runs]
    for run in results["runs"]:
        assert set(run) == {"run", "utterances", "intents", "silhouette",
                            "nearest_prototype_accuracy", "classifier_accuracy",
                            "intents_without_training_utterances"}
        assert run["utterances"] == 40 and 2 <= run["intents"] <= 20
        assert -1 <= run["silhouette"] <= 1
        for key in ("nearest_prototype_accuracy", "classifier_accuracy"):
            assert math.isfinite(run[key]) and 0 <= run[key] <= 100


def test_prototypes_by_batch_size_and_frequency_group(runs, capsys):
    png = runs[0] / "prototypes.png"      # the default output: in the run folder
    sizes = [4, 16, 8, TRAIN_UTTERANCES]
    assert analyze.main(["prototypes", str(runs[0]), "--batch-sizes", *map(str, sizes),
                         "--batches", "20"]) == 0
    assert "share of batches without the intent" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC
    results = json.loads(png.with_suffix(".json").read_text())
    assert results["batch_sizes"] == sorted(sizes) and results["batches"] == 20
    assert "1 - cos" in results["distance"] and results["utterances"] == TRAIN_UTTERANCES
    groups = results["groups"]
    assert list(groups) == ["head", "middle", "tail"]
    assert sum(g["utterances"] for g in groups.values()) == TRAIN_UTTERANCES
    assert sorted(sum((g["intents"] for g in groups.values()), [])) == sorted(results["per_intent"])
    for group in [*groups.values(), *results["per_intent"].values()]:
        assert len(group["distance"]) == len(group["absent_share"]) == len(sizes)
        assert all(d is None or (math.isfinite(d) and 0 <= d <= 2) for d in group["distance"])
        assert all(0 <= a <= 1 for a in group["absent_share"])
    # a batch of the whole split: every intent present, its prototype the split mean
    for group in groups.values():
        assert group["absent_share"][-1] == 0 and group["distance"][-1] < 1e-5
    # the rarer the intents, the more batches miss them
    assert groups["head"]["absent_share"][0] < groups["tail"]["absent_share"][0]


def test_help_names_the_commands_and_the_distance(capsys):
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m mvcl_fast.analyze" in text and "embeddings" in text
    assert "\n  python -m mvcl_fast.analyze prototypes runs/batch --batch-sizes 8 16 32 64\n" in text
    with pytest.raises(SystemExit):
        analyze.main(["prototypes", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1 - cos(batch prototype, the intent's mean over the whole training split)" in text
    assert "--batch-sizes N [N ...]" in text and "(default: [8, 16, 32, 64])" in text


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mvcl_fast.analyze", "embeddings", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--perplexity" in out.stdout, out.stderr


@pytest.mark.parametrize("extra,message", [
    (["--perplexity", "0"], "argument --perplexity: must be a number > 0, got '0'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--output", "map.svg"], "argument --output: must be a file name ending in .png"),
    (["--split", "val"], "argument --split: invalid choice: 'val'"),
])
def test_bad_embeddings_options_are_usage_errors(runs, capsys, extra, message):
    assert message in usage_error(capsys, ["embeddings", str(runs[0]), *extra])


@pytest.mark.parametrize("extra,message", [
    (["--batch-sizes", "0"], "argument --batch-sizes: must be an integer >= 1"),
    (["--batches", "-3"], "argument --batches: must be an integer >= 1"),
])
def test_bad_prototypes_options_are_usage_errors(runs, capsys, extra, message):
    assert message in usage_error(capsys, ["prototypes", str(runs[0]), *extra])


def test_a_missing_run_folder_or_best_checkpoint_is_a_usage_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    err = usage_error(capsys, ["embeddings", str(missing)])
    assert f"argument RUN_DIR: no such folder: {missing}" in err
    err = usage_error(capsys, ["prototypes", str(tmp_path)])
    assert f"argument RUN_DIR: {tmp_path / 'best.pt'} does not exist" in err
    assert "usage: python -m mvcl_fast.analyze" in err


def test_sizes_beyond_the_split_are_errors_with_a_hint(runs, capsys):
    err = fails_with(capsys, ["prototypes", str(runs[0]), "--batch-sizes", "8", "61"])
    assert f"--batch-sizes 61: the training split of {runs[0]} holds 60 utterances" in err
    err = fails_with(capsys, ["embeddings", str(runs[0]), "--perplexity", "40"])
    assert "--perplexity 40: the test split" in err and "holds 40 utterances" in err


def test_another_data_folder_is_read_with_the_run_options(runs, tmp_path, capsys):
    err = fails_with(capsys, ["prototypes", str(runs[0]), "--data-dir", str(tmp_path / "none")])
    assert f"data folder {tmp_path / 'none'} does not exist" in err
    err = fails_with(capsys, ["prototypes", str(runs[0]), "--dataset", "mintrec2"])
    assert "is a model of mintrec (its 20 intents)" in err
