"""--text-model as a hub id: taken from the local Hugging Face cache (the tests run with
HF_HUB_OFFLINE=1 and never download), its snapshot's commit recorded in the checkpoint and the
same snapshot loaded by load_model, predict and --resume after the cache's main has moved on. (A hub
id that is not cached is a case of test_failures.py.)

The cache is a fake one in a temporary folder: models--ORG--NAME/snapshots/<commit>/ holding a
tiny BERT as save_pretrained writes it, and refs/main naming the commit.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from mvcl_fast.intent import predict as predict_lib
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent.errors import ConfigError
from mvcl_fast.intent.loading import load_model
from mvcl_fast.intent.model import hub_revision
from test_train import argv, tiny_setup  # noqa: F401 (tiny_setup is a fixture)

HUB_ID = "test-org/tiny-bert"
FIRST, SECOND = "1" * 40, "2" * 40


def add_snapshot(cache: Path, folder: str, commit: str) -> Path:
    """The model folder as HUB_ID's snapshot commit in the cache, and main pointing at it."""
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache of the test's own (transformers reads the constant per call)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_hub_id_trains_and_predict_loads_the_recorded_snapshot(tiny_setup, hub_cache,
                                                                        tmp_path, capsys):
    data_dir, bert = tiny_setup
    add_snapshot(hub_cache, bert, FIRST)
    assert hub_revision(HUB_ID) == FIRST and hub_revision(bert) is None
    run = tmp_path / "run"
    command = argv(tiny_setup, run, "--epochs", "1", "--max-steps", "1")
    command[command.index(bert)] = HUB_ID
    assert train_lib.main(command) == 0
    config = json.loads((run / "metrics.json").read_text())["model_config"]
    assert (config["text_model"], config["text_revision"]) == (HUB_ID, FIRST)

    # main moves to a snapshot of another width: loading it would not fit the weights
    second = add_snapshot(hub_cache, bert, SECOND)
    settings = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps({**settings, "hidden_size": 64}))
    assert hub_revision(HUB_ID) == SECOND
    loaded = load_model(run)
    assert loaded.config.text_revision == FIRST
    assert loaded.model.text_encoder.config.hidden_size == 32
    assert predict_lib.main([str(run), "--data-dir", data_dir, "--output-dir",
                             str(tmp_path / "pred")]) == 0
    assert train_lib.main(["--resume", str(run)]) == 0     # the run's snapshot, not main's
    assert "the run had finished" in capsys.readouterr().out

    # the recorded snapshot gone: one line saying how to get it back
    shutil.rmtree(hub_cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / FIRST)
    with pytest.raises(ConfigError, match=f"text model {HUB_ID} at revision {FIRST} of ") as error:
        load_model(run)
    assert f"hf download {HUB_ID} --revision {FIRST}" in error.value.hint
