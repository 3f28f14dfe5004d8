"""The errors a user can fix: the trainer's CLI prints them as one line plus a hint (exit 1).

Everything else (a bug) keeps its traceback; ``--debug`` keeps it for these too.
"""
from __future__ import annotations

import errno
from pathlib import Path

# "No space left" and "quota exceeded" both mean: the disk took no more.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class MVCLError(Exception):
    """An error with a message naming what is wrong and a hint saying what to do."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint)   # both in args: the error pickles (sent between ranks)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class DataError(MVCLError):
    """A data folder, split file or feature file that cannot be read as the data set."""


class ConfigError(MVCLError):
    """A configuration that cannot run: a text model that is missing or not a BERT-family encoder."""


class CheckpointError(MVCLError):
    """A checkpoint that is missing, unreadable, unsafe, or from another kind of run."""


class RunFolderError(MVCLError):
    """An output folder that is locked by another run, already holds one, or cannot be made."""


class DiskError(MVCLError):
    """The disk is full (or the quota reached) while writing an output."""


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def disk_full(folder: Path | str, what: str,
              hint: str = "free space there, or pass an --output-dir on another disk (--resume "
                          "continues from the last complete checkpoint)") -> DiskError:
    return DiskError(f"no space left on the device of {folder} (writing {what})", hint)
