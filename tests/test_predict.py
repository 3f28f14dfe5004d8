"""python -m mvcl_fast.predict and load_model: a tiny trained run labels its test split again."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from mvcl_fast.intent import predict as predict_lib
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent.errors import ConfigError
from mvcl_fast.intent.loading import load_model
from test_train import argv, tiny_setup  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def trained(tiny_setup, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    assert train_lib.main(argv(tiny_setup, run_dir, "--epochs", "1", "--max-steps", "2")) == 0
    return run_dir


def fails_with(capsys, command) -> str:
    assert predict_lib.main(command) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "hint: " in err, err
    return err


def test_load_model_returns_the_model_its_intents_and_tokenizer(trained, tiny_setup):
    loaded = load_model(trained)
    assert loaded.dataset == "mintrec" and len(loaded.label_names) == 20
    assert loaded.label_names[0] == "Complain" and loaded.tokenizer.mask_token == "[MASK]"
    assert not loaded.model.training and loaded.model.anchor_encoder is None
    assert sum(loaded.train_label_counts) == 60
    best = torch.load(trained / "best.pt", map_location="cpu", weights_only=True)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, best["model"][name]), name


def test_predict_writes_the_tsv_and_the_metrics_the_run_reported(trained, tiny_setup, tmp_path, capsys):
    data_dir, _ = tiny_setup
    out_dir = tmp_path / "out"
    assert predict_lib.main([str(trained), "--data-dir", data_dir, "--output-dir", str(out_dir)]) == 0
    assert "macro F1" in capsys.readouterr().out
    with open(out_dir / "predictions.tsv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    assert len(rows) == 20 and set(rows[0]) == {"key", "text", "predicted", "probability", "true"}
    names = set(load_model(trained).label_names)
    assert all(r["predicted"] in names and r["true"] in names and 0 < float(r["probability"]) <= 1
               for r in rows)
    got = json.loads((out_dir / "prediction_metrics.json").read_text())
    reported = json.loads((trained / "metrics.json").read_text())
    # one loading path: the trainer's final evaluation and predict give the same figures
    assert got["metrics"] == reported["test"]
    assert got["per_class"] == reported["test_per_class"] and got["groups"] == reported["test_groups"]
    acc = 100 * sum(r["predicted"] == r["true"] for r in rows) / len(rows)
    assert round(acc, 2) == got["metrics"]["acc"]


def test_help_keeps_one_example_per_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_lib.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m mvcl_fast.predict" in text and "RUN_DIR_OR_CHECKPOINT" in text
    assert "\n  python -m mvcl_fast.predict runs/my-run --data-dir data/MIntRec\n" in text


def test_a_model_of_another_dataset_is_refused(trained, tiny_setup, capsys):
    data_dir, _ = tiny_setup
    err = fails_with(capsys, [str(trained), "--data-dir", data_dir, "--dataset", "mintrec2"])
    assert "is a model of mintrec (its 20 intents)" in err


def test_data_of_another_label_set_is_refused(trained, tiny_setup, tmp_path, capsys):
    data_dir, _ = tiny_setup
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    tsv = other / "test.tsv"
    lines = tsv.read_text(encoding="utf-8").splitlines()
    fields = lines[1].split("\t")
    fields[-1] = "Out of scope"
    tsv.write_text("\n".join([lines[0], "\t".join(fields), *lines[2:]]) + "\n", encoding="utf-8")
    err = fails_with(capsys, [str(trained), "--data-dir", str(other)])
    assert "unknown mintrec label 'Out of scope'" in err and "predicts the intents of mintrec" in err


def test_another_text_model_is_refused(trained, tiny_setup, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    data_dir, bert = tiny_setup
    wider = tmp_path / "wider-bert"
    shutil.copytree(bert, wider)
    config = BertConfig.from_pretrained(bert)
    config.hidden_size, config.intermediate_size = 48, 96
    BertModel(config).save_pretrained(wider)
    err = fails_with(capsys, [str(trained), "--data-dir", data_dir, "--text-model", str(wider)])
    assert "was trained with another text model than" in err and "size mismatch" in err
    with pytest.raises(ConfigError, match="another text model"):
        load_model(trained, text_model=str(wider))


def test_a_missing_checkpoint_is_refused(tmp_path, tiny_setup, capsys):
    data_dir, _ = tiny_setup
    err = fails_with(capsys, [str(tmp_path), "--data-dir", data_dir])
    assert f"{tmp_path / 'best.pt'} does not exist" in err


def write_clips(data_dir, folder, label_column: str):
    """The test split as new clips in folder: clips.tsv (label column absent or empty) and the
    feature pickles under other names in feats/."""
    (folder / "feats").mkdir(parents=True)
    for name in ("video_feats.pkl", "audio_feats.pkl"):
        shutil.copy(f"{data_dir}/{name}", folder / "feats" / f"clips_{name}")
    shutil.copy(f"{data_dir}/synthetic.json", folder)   # the frame lengths the run was trained on
    rows = [line.split("\t") for line in open(f"{data_dir}/test.tsv", encoding="utf-8").read().splitlines()]
    if label_column == "absent":
        rows = [r[:-1] for r in rows]
    else:
        rows = [rows[0], *[[*r[:-1], ""] for r in rows[1:]]]
    (folder / "clips.tsv").write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return ["--input", str(folder / "clips.tsv"), "--video-feats", "feats/clips_video_feats.pkl",
            "--audio-feats", "feats/clips_audio_feats.pkl"]


def read_predictions(folder):
    with open(folder / "predictions.tsv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file, delimiter="\t"))


@pytest.mark.parametrize("label_column", ["absent", "empty"])
def test_new_clips_without_labels_are_labelled_without_metrics(trained, tiny_setup, tmp_path, capsys,
                                                               label_column):
    data_dir, _ = tiny_setup
    scored, new = tmp_path / "scored", tmp_path / "new"
    assert predict_lib.main([str(trained), "--data-dir", data_dir, "--output-dir", str(scored)]) == 0
    clips = write_clips(data_dir, tmp_path / "clips", label_column)
    new.mkdir()
    (new / "prediction_metrics.json").write_text("{}")  # an earlier labelled run's, now stale
    assert predict_lib.main([str(trained), *clips, "--output-dir", str(new)]) == 0
    assert "20 clips of" in capsys.readouterr().out
    assert not (new / "prediction_metrics.json").exists()
    got, expected = read_predictions(new), read_predictions(scored)
    assert all(row["true"] == "" for row in got)
    # the same clips and features as the test split: the same predictions
    assert [{**row, "true": ""} for row in expected] == got


def test_a_clip_missing_from_a_feature_pickle_is_named(trained, tiny_setup, tmp_path, capsys):
    data_dir, _ = tiny_setup
    clips = write_clips(data_dir, tmp_path / "clips", "absent")
    tsv = tmp_path / "clips" / "clips.tsv"
    tsv.write_text(tsv.read_text(encoding="utf-8") + "S09\tE99\t999\tWho are you?\n", encoding="utf-8")
    err = fails_with(capsys, [str(trained), *clips, "--output-dir", str(tmp_path / "out")])
    assert f"--input {tsv}: " in err and "clips_video_feats.pkl: no features for key 'S09_E99_999'" in err
    assert "clips.tsv, line 22" in err
    assert not (tmp_path / "out" / "predictions.tsv").exists()


def test_clips_without_a_text_column_are_refused_naming_it(trained, tiny_setup, tmp_path, capsys):
    data_dir, _ = tiny_setup
    clips = write_clips(data_dir, tmp_path / "clips", "absent")
    tsv = tmp_path / "clips" / "clips.tsv"
    tsv.write_text("".join("\t".join(line.split("\t")[:3]) + "\n"
                           for line in tsv.read_text(encoding="utf-8").splitlines()), encoding="utf-8")
    err = fails_with(capsys, [str(trained), *clips])
    assert f"{tsv}: header row ['season', 'episode', 'clip'] lacks the column(s) ['text']" in err


def test_split_with_input_is_a_usage_error(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_lib.main([str(trained), "--input", "clips.tsv", "--split", "dev"])
    assert exit_info.value.code == 2
    assert "--split picks a TSV of --data-dir; --input names the TSV itself" in capsys.readouterr().err


def test_a_run_trained_without_text_predicts_from_the_label_prompt_and_its_features(
        tiny_setup, tmp_path, capsys):
    data_dir, _ = tiny_setup
    run_dir = tmp_path / "no-text"
    assert train_lib.main(argv(tiny_setup, run_dir, "--modalities", "video,audio", "--epochs", "1",
                               "--max-steps", "2")) == 0
    assert predict_lib.main([str(run_dir), "--data-dir", data_dir]) == 0
    assert "(trained without text: the texts are not read)" in capsys.readouterr().out
    got = json.loads((run_dir / "prediction_metrics.json").read_text())
    assert got["metrics"] == json.loads((run_dir / "metrics.json").read_text())["test"]
