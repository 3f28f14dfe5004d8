"""The published training configurations, one ``--preset`` each.

A preset sets every hyperparameter its source states, mapped onto the trainer's options;
options given on the command line override it. What a source states that the options cannot
express, and values a source does not state that a preset takes from elsewhere, are in its
notes (``--help`` and docs/training.md print them).

How the sources' settings map (the same code base, MIntRec's, behind TCL-MAP and MVCL-DAF):

- ``lr``: one AdamW learning rate for every parameter, so ``--fusion-lr`` equals ``--lr``;
  linear warm-up over ``warmup_proportion`` of the steps, then linear decay (``--warmup``).
- ``grad_clip`` -1.0: no clipping (``--grad-clip 0``).
- ``max_seq_lengths['text']`` counts [CLS] and [SEP]: the utterance keeps 2 word pieces fewer
  (``--max-text-tokens``, which counts the utterance's word pieces alone).
- ``eval_monitor`` -> ``--select-metric``; ``wait_patience`` -> ``--patience``;
  ``num_train_epochs`` -> ``--epochs``; ``temperature`` -> ``--tau``; the loss is
  classification + one contrastive term (``--lambda-mv 1``, no prototype term:
  ``--lambda-proto 0``) unless the source adds the prototype term (MVCL-DAF++).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

TCL_MAP = "thuiar/TCL-MAP@37095a591c9eb8d93f71190a78ee07bd8e78a6ea"
# The MVCL-DAF authors' repository is not reachable here; DSA-Net's first upload holds a copy of
# its code (configs/, data/, methods/MVCL_DAF/, run.py), from which the values are read.
MVCL_DAF = "Sodalvzaccc/DSA-Net@1f3194e4958ccbb94d57a241bd56075ec0bb1552"
MVCL_DAF_PP = "chr1s623/MVCL-DAF-PlusPlus@0f8db425aeffc2c949be7e506ed90deb909e5a7d"

# What the MIntRec code base's configs state alike: dev/test batches of 8, up to 100 epochs,
# warm-up 0.1, no clipping; one learning rate for all parameters.
_MINTREC_CODE = {"eval_batch_size": 8, "epochs": 100, "warmup": 0.1, "grad_clip": 0.0}
# The data sets' frame lengths (data/__init__.py's max_seq_lengths), equal to this package's
# defaults for the released data, set so that a preset states them.
_FRAMES = {"mintrec": {"video_len": 230, "audio_len": 480},
           "mintrec2": {"video_len": 180, "audio_len": 400}}

_MVCL_DAF_NOTES = (
    "Its learning_rate_method 'decay' halves every learning rate after 4 epochs without a "
    "better dev score, but writes the halved rate into the optimiser, which the per-step "
    "linear schedule overwrites at the next step: only one step runs at the halved rate, so the "
    "preset keeps the linear schedule alone. Its dropout_prob 0.5 is read by no layer of "
    "methods/MVCL_DAF/model.py (its fusion output's dropout is 0.0, its head's BERT's 0.1): "
    "--dropout keeps 0.1. Its model is MVCL-DAF (no coarse context layer); the preset trains "
    "this package's model with MVCL-DAF's training configuration.")


# The options a preset sets, in the order --help lists them.
_ORDER = ("dataset", "video_len", "audio_len", "max_text_tokens", "text_model", "lambda_proto",
          "lambda_mv", "tau", "epochs", "batch_size", "eval_batch_size", "lr", "fusion_lr",
          "weight_decay", "warmup", "grad_clip", "select_metric", "patience")


def _spelled(dests) -> list[str]:
    return [f"--{dest.replace('_', '-')}" for dest in dests]


@dataclass(frozen=True)
class Preset:
    """A published configuration: the option values (by dest) and where they come from."""

    title: str
    source: str      # repository@commit and the files the values are read from
    values: dict
    notes: str = ""  # what the options do not express, and values the source does not state


def _mvcl_daf(dataset: str, config: str, **values) -> Preset:
    return Preset(
        title=f"MVCL-DAF on {'MIntRec2.0' if dataset == 'mintrec2' else 'MIntRec'}",
        source=f"{MVCL_DAF}: configs/{config}, data/__init__.py (text length), run.py "
               "(text_backbone)",
        values={"dataset": dataset, **_MINTREC_CODE, **_FRAMES[dataset], "batch_size": 16,
                "weight_decay": 0.2, "tau": 0.5, "text_model": "bert-large-uncased",
                "lambda_proto": 0.0, "lambda_mv": 1.0, **values},
        notes=_MVCL_DAF_NOTES)


def _mvcl_dafpp(daf_name: str) -> Preset:
    """MVCL-DAF++'s README states the optimiser, batch, epochs, early stop, tau and the loss;
    the rest is MVCL-DAF's for the same data set (the code base MVCL-DAF++ extends)."""
    daf = PRESETS[daf_name]
    stated = {"batch_size": 32, "epochs": 100, "patience": 10, "lr": 2e-5, "fusion_lr": 2e-5,
              "weight_decay": 0.2, "tau": 0.1, "lambda_proto": 1.0, "lambda_mv": 1.0}
    taken = [dest for dest in _ORDER if dest in daf.values and dest not in {*stated, "dataset"}]
    return Preset(
        title=daf.title.replace("MVCL-DAF", "MVCL-DAF++"),
        source=f"{MVCL_DAF_PP}: README.md (Training Setup)",
        values={**daf.values, **stated},
        notes=f"The README does not state {', '.join(_spelled(taken))}: these are {daf_name}'s.")


PRESETS: dict[str, Preset] = {
    "tcl-map-mintrec": Preset(
        title="TCL-MAP on MIntRec",
        source=f"{TCL_MAP}: configs/TCL_MAP_MIntRec.py, data/__init__.py (text length), "
               "examples/run_TCL_MAP_MIntRec.sh (text_backbone)",
        values={"dataset": "mintrec", **_MINTREC_CODE, **_FRAMES["mintrec"], "batch_size": 16,
                "patience": 8, "lr": 2e-5, "fusion_lr": 2e-5, "weight_decay": 0.1, "tau": 0.5,
                "text_model": "bert-base-uncased", "max_text_tokens": 28, "select_metric": "f1",
                "lambda_proto": 0.0, "lambda_mv": 1.0},
        notes="Its contrastive term is SupCon between the [MASK] view and the label-token view; "
              "here the multi-view InfoNCE term against the label anchor. Its dropout_prob 0.5 "
              "and the other dropouts belong to its MAG and prompt modules, which this model "
              "does not have: --dropout keeps 0.1."),
    "mvcl-daf-mintrec": _mvcl_daf("mintrec", "MVCL_DAF_MIntRec.py", patience=10, lr=2e-5,
                                  fusion_lr=2e-5, max_text_tokens=35, select_metric="f1"),
    "mvcl-daf-mintrec2": _mvcl_daf("mintrec2", "MVCL_DAF_MIntRec2.py", patience=8, lr=1e-5,
                                   fusion_lr=1e-5, max_text_tokens=74, select_metric="acc"),
}
PRESETS["mvcl-dafpp-mintrec"] = _mvcl_dafpp("mvcl-daf-mintrec")
PRESETS["mvcl-dafpp-mintrec2"] = _mvcl_dafpp("mvcl-daf-mintrec2")


def apply_preset(args: argparse.Namespace, given: set[str]) -> None:
    """Set args.preset's values on the options that the command line did not give (given)."""
    if args.preset is None:
        return
    for dest, value in PRESETS[args.preset].values.items():
        if dest not in given:
            setattr(args, dest, value)


def as_options(values: dict) -> str:
    """'--dataset mintrec ... --patience 8': a preset's values as a command line spells them."""
    ordered = sorted(values, key=_ORDER.index)
    return " ".join(f"{option} {values[dest]}" for option, dest in zip(_spelled(ordered), ordered))


def presets_help() -> str:
    """The presets section of the trainer's --help: each preset, its values and its source."""
    import textwrap

    blocks, noted = [], {}
    for name, preset in PRESETS.items():
        notes = f"Notes as for {noted[preset.notes]}." if preset.notes in noted else preset.notes
        noted.setdefault(preset.notes, name)
        text = f"{preset.title}: {as_options(preset.values)}. Source: {preset.source}. {notes}"
        blocks.append(f"  {name}\n" + textwrap.fill(text, 79, initial_indent="    ",
                                                    subsequent_indent="    ",
                                                    break_on_hyphens=False, break_long_words=False))
    return ("presets (--preset NAME; options given on the command line override its values):\n"
            + "\n".join(blocks) + "\n")
