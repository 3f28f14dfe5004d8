"""--preset: the published configurations, their sources, overrides, a run that keeps its preset.

Tiny synthetic set and random BERT (the preset's hub model overridden by --text-model); the run
takes one step.
"""
from __future__ import annotations

import json

import pytest

from mvcl_fast.intent import cli
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent.presets import PRESETS, apply_preset, as_options
from test_train import argv, tiny_setup  # noqa: F401 (tiny_setup is a fixture)


def resolved(command: list[str]):
    """The options of command once its preset is applied (what resolve_args does first)."""
    parser = cli.train_parser()
    args = parser.parse_args(command)
    apply_preset(args, train_lib.given_options(parser, command))
    return args


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_value_is_one_its_option_accepts(name):
    """A preset's values, spelled as a command line, parse back to themselves: each passes its
    option's own check (type, range, choices), as --resume and predict check saved options."""
    values = PRESETS[name].values
    args = cli.train_parser().parse_args(as_options(values).split())
    assert {dest: getattr(args, dest) for dest in values} == values
    assert vars(resolved(["--preset", name])) == {**vars(args), "preset": name}


def test_the_issues_mvcl_daf_mintrec2_configuration():
    """MVCL-DAF on MIntRec2.0 as issue #27 quotes it: batch 16, up to 100 epochs, patience 8, one
    learning rate 1e-5, weight decay 0.2, warm-up 0.1, no clipping, tau 0.5, bert-large-uncased,
    selection on accuracy; text 76 pieces with [CLS] and [SEP], so 74 of the utterance."""
    args = resolved(["--preset", "mvcl-daf-mintrec2"])
    assert (args.dataset, args.batch_size, args.epochs, args.patience) == ("mintrec2", 16, 100, 8)
    assert (args.lr, args.fusion_lr, args.weight_decay, args.warmup) == (1e-5, 1e-5, 0.2, 0.1)
    assert (args.grad_clip, args.tau, args.text_model) == (0.0, 0.5, "bert-large-uncased")
    assert (args.max_text_tokens, args.select_metric, args.lambda_proto) == (74, "acc", 0.0)


def test_options_given_override_the_preset_even_at_their_default_value():
    args = resolved(["--preset", "mvcl-daf-mintrec", "--lr", "3e-5", "--tau", "0.1",
                     "--dataset", "mintrec2"])
    assert (args.lr, args.tau, args.dataset) == (3e-5, 0.1, "mintrec2")   # 0.1: the default
    assert (args.fusion_lr, args.patience, args.batch_size) == (2e-5, 10, 16)   # the preset's


def test_help_cites_each_presets_source_and_values(capsys):
    with pytest.raises(SystemExit):
        train_lib.main(["--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--preset NAME" in flat
    for name, preset in PRESETS.items():
        values = as_options(preset.values)
        assert f" {name} {preset.title}: {values}. Source: {preset.source}." in flat


def test_a_preset_run_records_its_preset_and_a_resume_keeps_it(tiny_setup, tmp_path, capsys):
    out_dir = tmp_path / "run"
    # argv sets --batch-size 16, --epochs 2 and --text-model (the tiny BERT): they override
    assert train_lib.main(argv(tiny_setup, out_dir, "--preset", "tcl-map-mintrec", "--max-steps",
                               "1", "--video-len", "8", "--audio-len", "12")) == 0
    assert "| preset tcl-map-mintrec |" in capsys.readouterr().out
    recorded = json.loads((out_dir / "metrics.json").read_text())["args"]
    assert recorded["preset"] == "tcl-map-mintrec" and recorded["epochs"] == 2
    assert (recorded["tau"], recorded["lambda_proto"], recorded["lr"], recorded["fusion_lr"],
            recorded["grad_clip"], recorded["max_text_tokens"]) == (0.5, 0.0, 2e-5, 2e-5, 0.0, 28)
    with pytest.raises(SystemExit) as exit_info:
        train_lib.main(["--resume", str(out_dir), "--preset", "mvcl-dafpp-mintrec"])
    assert exit_info.value.code == 2
    assert ("--preset mvcl-dafpp-mintrec (the run's: tcl-map-mintrec) would change the run"
            in capsys.readouterr().err)
    args, state = train_lib.prepare_args(["--resume", str(out_dir)])   # what a resume runs with
    run_options = {k: v for k, v in vars(args).items() if k not in train_lib.RUNTIME_OPTIONS}
    assert run_options.items() <= state["args"].items()
    assert (args.preset, args.tau, args.epochs) == ("tcl-map-mintrec", 0.5, 2)
