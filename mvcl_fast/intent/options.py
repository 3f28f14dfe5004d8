"""The command lines' building blocks: option types (each names its rule, which --help shows
and a usage error states), their upper bounds, the parser and help formatter of every CLI."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from mvcl_fast.intent import runs
from mvcl_fast.intent.checkpoints import BEST_CHECKPOINT

# Upper bounds of the options whose value sizes an allocation or a loop: far above any use (a
# batch of more utterances than a split holds is the whole split; the data sets' clips are cut
# at 230 video and 480 audio frames), and refused before a value sets off an allocation of
# hundreds of GiB or a loop that does not end.
MAX_BATCH_SIZE = 65536
MAX_WIDTH = 8192
MAX_LAYERS = 64
MAX_SAMPLED_BATCHES = 100_000

# what analyze prototypes reports per intent (its --help and its JSON)
PROTOTYPE_DISTANCE = ("cosine distance 1 - cos(batch prototype, the intent's mean over the whole "
                      "training split), in [0, 2], averaged over the batches that hold the intent")


# ------------------------------------------------------------------- option types
def number(kind: type, *, at_least=None, above=None, below=None, at_most=None, multiple_of=None):
    """An argparse type: a finite int or float in a range. Its __name__ is the rule, which
    --help shows (%(type)s) and the error states: "argument --epochs: must be an integer >= 1"."""
    bounds = [f"{op} {v}" for op, v in ((">=", at_least), (">", above), ("<", below),
                                        ("<=", at_most)) if v is not None]
    rule = f"{'an integer' if kind is int else 'a number'} {' and '.join(bounds)}"
    if multiple_of is not None:
        rule += f", a multiple of {multiple_of}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value)
                or (at_least is not None and value < at_least)
                or (above is not None and value <= above)
                or (below is not None and value >= below)
                or (at_most is not None and value > at_most)
                or (multiple_of is not None and value % multiple_of)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = rule
    return parse


def run_name(text: str) -> str:
    """--name is one folder name, so the run stays inside runs/."""
    if text in ("", "..") or Path(text).name != text:
        raise argparse.ArgumentTypeError(f"must be {run_name.__name__} (no '/', not '..'), "
                                         f"got {text!r}")
    return text


run_name.__name__ = f"a folder name inside {runs.RUNS_ROOT}/"


def device_name(text: str) -> str:
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"must be {device_name.__name__}, got {text!r}") from None
    return text


device_name.__name__ = "auto, cpu, cuda or cuda:N"


def modality_set(text: str) -> str:
    """--modalities: a non-empty comma-separated subset of text, video, audio in any order,
    returned in the model's order ('audio,text' -> 'text,audio'), so runs and resumes compare
    equal."""
    from mvcl_fast.intent.model import MODALITIES

    names = [name.strip() for name in text.split(",")]
    if not all(name in MODALITIES for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be {modality_set.__name__}, got {text!r}")
    return ",".join(name for name in MODALITIES if name in names)


modality_set.__name__ = "a non-empty comma-separated subset of text, video, audio"


class CommandParser(argparse.ArgumentParser):
    """The parser of a command and of its subcommands: options are taken only as spelled out
    (argparse's prefix matching would read predict's --output as --output-dir), and a usage
    error is the one error line and a hint, exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nhint: {self.prog} --help states every "
                     "option and its rule\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; the description and the examples kept as written,
    one example per line."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" / "(default: [])" say nothing: those helps state what happens then
        if action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def per_dataset(option: str) -> str:
    """'30 for mintrec, 76 for mintrec2': a data-set default, for --help."""
    from mvcl_fast.intent.data import DATASETS

    return ", ".join(f"{getattr(info, option)} for {name}" for name, info in DATASETS.items())


# ------------------------------------------------------------------- arguments
def run_folder(text: str) -> Path:
    """RUN_DIR: a folder that holds a best checkpoint."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    if not (path / BEST_CHECKPOINT).is_file():
        raise argparse.ArgumentTypeError(f"{path / BEST_CHECKPOINT} does not exist (a run folder "
                                         "holds it once the run's first epoch is done)")
    return path


run_folder.__name__ = f"a run folder holding {BEST_CHECKPOINT}"


def png_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png" or path.name == ".png":
        raise argparse.ArgumentTypeError(f"must be {png_path.__name__}, got {text!r}")
    return path


png_path.__name__ = "a file name ending in .png"


# ---------------------------------------------------------------------- parsers
