"""The errors a user can fix: every command prints them as one line plus a hint.

The exit status is the error's: 1, or 130 for an interrupt. Everything else (a bug) keeps its
traceback; ``--debug`` keeps it for these too.
"""
from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path

# "No space left" and "quota exceeded" both mean: the disk took no more.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What writing into a folder one may not write to raises.
UNWRITABLE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class MVCLError(Exception):
    """An error with a message naming what is wrong and a hint saying what to do."""

    exit_status = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint)   # both in args: the error pickles (sent between ranks)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class DataError(MVCLError):
    """A data folder, split file or feature file that cannot be read as the data set."""


class ConfigError(MVCLError):
    """A configuration that cannot run: a text model that is missing or not a BERT-family
    encoder, a device that is not there."""


class CheckpointError(MVCLError):
    """A checkpoint that is missing, unreadable, unsafe, or from another kind of run."""


class RunFolderError(MVCLError):
    """An output folder that is locked by another run, already holds one, or cannot be made or
    written."""


class DiskError(MVCLError):
    """The disk is full (or the quota reached) while writing an output."""


class Interrupted(MVCLError):
    """Ctrl-C (or SIGTERM) ended the command before it was done."""

    exit_status = 130


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def disk_full(folder: Path | str, what: str,
              hint: str = "free space there, or write the outputs to another disk") -> DiskError:
    return DiskError(f"no space left on the device of {folder} (writing {what})", hint)


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@contextlib.contextmanager
def reraised_as(kind: type[MVCLError], prefix: str, hint: str, unwritable_hint: str = ""):
    """What a reader raises about its input (OSError, ValueError) as kind: one line, the file named.

    A full disk (the synthetic set and caches are written on first use) is a DiskError; a
    permission refused or a read-only file system gets unwritable_hint (if given) instead of hint.
    """
    try:
        yield
    except OSError as err:
        if is_disk_full(err):
            where = Path(err.filename) if err.filename else Path.cwd() / "?"
            raise disk_full(where.parent, where.name, "free space on that disk") from err
        if unwritable_hint and (isinstance(err, PermissionError) or err.errno in UNWRITABLE_ERRNOS):
            hint = unwritable_hint
        raise kind(prefix + first_line(err), hint) from err
    except ValueError as err:
        raise kind(prefix + first_line(err), hint) from err


def print_error(prog: str, err: MVCLError) -> None:
    """The one line and the hint a command prints for an error the user can fix."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)
