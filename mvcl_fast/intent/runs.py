"""Run folders: one run per folder, locked while it runs, outputs replaced and never written through.

A run claims its folder (:meth:`RunFolder.claim`) before it loads anything:
the lock file ``.lock`` is held (``flock``) for the life of the process, so a
second run into the folder is refused, naming the first; a folder that
already holds results is refused unless the run resumes it or overwrites it;
temporary files that a killed run left behind are removed. Every output is
written to a new temporary file in the folder and renamed over its name
(:meth:`RunFolder.replace`), so a reader never sees half a file and a symlink
planted in the folder is replaced, not followed. A temporary file's name is
``.NAME.mvcl_fast-tmp-XXXXXXXX`` (eight characters of :func:`tempfile.mkstemp`):
only names of that pattern are ever removed, so a user's own hidden files stay.

A folder that cannot be made or written (a file in its place, no permission, a
read-only file system) is a :class:`RunFolderError`, a full disk a
:class:`DiskError`, each naming the file and the option that chose the folder.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Optional, TextIO

from mvcl_fast.intent.errors import (CheckpointError, MVCLError, RunFolderError, disk_full,
                                     is_disk_full)

RUNS_ROOT = Path("runs")
LOCK_NAME = ".lock"
LAST_CHECKPOINT = "last.pt"
LOG_NAME = "train.log"
# A folder holding one of these holds a run; --overwrite removes all the outputs.
RESULTS = (LAST_CHECKPOINT, "best.pt", "metrics.json")
OUTPUTS = (*RESULTS, "confusion_matrix.png", LOG_NAME)
# replace() writes ".NAME" + TEMPORARY_MARK + mkstemp's eight random characters, then renames it
TEMPORARY_MARK = ".mvcl_fast-tmp-"
TEMPORARY_NAME = re.compile(r"\..+" + re.escape(TEMPORARY_MARK) + r"[a-z0-9_]{8}")
OUTPUT_MODE = 0o644               # mkstemp makes 0600 files; outputs are as readable as before


def default_output_dir(name: Optional[str]) -> Path:
    return RUNS_ROOT / (name or time.strftime("%Y%m%d-%H%M%S"))


def resume_checkpoint(resume: str, output_dir: Optional[str], name: Optional[str]) -> Path:
    """The last.pt that --resume [PATH] means: of PATH, of --output-dir, of runs/NAME or the newest run."""
    if resume:
        path = Path(resume)
        path = path / LAST_CHECKPOINT if path.is_dir() else path
    elif output_dir or name:
        path = Path(output_dir) if output_dir else default_output_dir(name)
        path = path / LAST_CHECKPOINT
    else:
        candidates = sorted(RUNS_ROOT.glob(f"*/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise CheckpointError(f"--resume: no {RUNS_ROOT}/*/{LAST_CHECKPOINT} to continue",
                                  hint="pass the run folder: --resume runs/NAME")
        path = candidates[-1]
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} does not exist",
                              hint="pass a run folder holding last.pt, or the checkpoint file")
    return path


def claim_on_every_rank(path: Path | str, dist, *, resume: bool,
                        overwrite: bool) -> Optional["RunFolder"]:
    """Rank 0's claim of the folder (None on the other ranks). Every rank gets rank 0's verdict
    (dist: mvcl_fast.intent.distributed.Distributed), so all of them stop on a refusal."""
    folder, refusal = None, None
    if dist.is_main:
        try:
            folder = RunFolder.claim(path, resume=resume, overwrite=overwrite)
        except MVCLError as err:
            refusal = err
    refusal = dist.gather(refusal)[0]
    if refusal is not None:
        raise refusal
    return folder


def _open_not_through_link(path: Path, flags: int) -> int:
    """os.open that replaces a symlink at path by a new file instead of opening its target."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, OUTPUT_MODE)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
    path.unlink()
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, OUTPUT_MODE)


def output_error(err: OSError, folder: Path, name: str, option: str) -> MVCLError:
    """An OSError of writing folder/name as the error the user reads: a full disk, or a folder
    that cannot be written (option: the option that chose the folder, for the hint)."""
    if is_disk_full(err):
        return disk_full(folder, name)
    return RunFolderError(f"cannot write {folder / name} ({err.strerror or err})",
                          hint=f"pass an {option} you can write to")


def make_output_folder(path: Path, option: str) -> None:
    """mkdir -p path: a file in its place, or a parent one may not write to, is a
    RunFolderError naming option."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunFolderError(f"cannot make the folder {path}: a file is in its place",
                             hint=f"pass an {option} that is a folder, or a new name") from None
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path.parent, path.name) from err
        raise RunFolderError(f"cannot make the folder {path} ({err.strerror or err})",
                             hint=f"pass an {option} you can write to") from err


def _write_failure(err: RuntimeError) -> BaseException:
    """What made a write fail: torch.save reports an exception of the file's write (a full
    disk, a Ctrl-C) as RuntimeError("... unexpected pos ..."), with the original as its context."""
    cause = err.__context__
    return cause if isinstance(cause, (OSError, KeyboardInterrupt)) else err


def replace_file(folder: Path, name: str, write: Callable[[BinaryIO], None],
                 option: str = "--output-dir") -> Path:
    """Write folder/name through a new temporary file renamed over it (atomic; never through a
    link). An error leaves the earlier folder/name as it was and no temporary file."""
    target = folder / name
    tmp = None
    try:
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}{TEMPORARY_MARK}")
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), OUTPUT_MODE)
                write(file)
            os.replace(tmp, target)
        except RuntimeError as err:
            failure = _write_failure(err)
            if failure is err:
                raise
            raise failure from None
    except OSError as err:
        raise output_error(err, folder, name, option) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return target


class RunFolder:
    """A claimed output folder: the lock is held until :meth:`release`."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd: Optional[int] = lock_fd

    @classmethod
    def claim(cls, path: Path | str, *, resume: bool, overwrite: bool) -> "RunFolder":
        path = Path(path)
        make_output_folder(path, "--output-dir")
        folder = cls(path, cls._lock(path))
        try:
            folder._remove_stale_temporaries()
            held = [name for name in RESULTS if os.path.lexists(path / name)]
            if held and not (resume or overwrite):
                raise RunFolderError(
                    f"{path} already holds a run ({', '.join(held)})",
                    hint=f"continue it with --resume {path}, start it over with --overwrite, "
                         "or pass another --output-dir / --name")
            if overwrite:
                for name in OUTPUTS:
                    (path / name).unlink(missing_ok=True)
        except BaseException:
            folder.release()
            raise
        return folder

    @staticmethod
    def _lock(path: Path) -> int:
        try:
            fd = _open_not_through_link(path / LOCK_NAME, os.O_RDWR)
        except OSError as err:
            raise output_error(err, path, LOCK_NAME, "--output-dir") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{path} is in use by {holder}",
                                 hint="wait until that run ends, or pass another --output-dir / "
                                      "--name") from None
        # The lock goes with the process (flock), so a killed run leaves no stale lock; the
        # text only names the holder for whoever is refused.
        holder = (f"process {os.getpid()} on {socket.gethostname()} "
                  f"(since {time.strftime('%Y-%m-%d %H:%M:%S %Z')})")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode(), 0)
        except OSError as err:
            os.close(fd)
            raise output_error(err, path, LOCK_NAME, "--output-dir") from err
        return fd

    def _remove_stale_temporaries(self) -> None:
        # Under the lock no other run writes here: any temporary is from a killed run.
        for tmp in self.path.iterdir():
            if TEMPORARY_NAME.fullmatch(tmp.name) and (tmp.is_symlink() or tmp.is_file()):
                tmp.unlink()

    def replace(self, name: str, write: Callable[[BinaryIO], None]) -> Path:
        """Write name through a new temporary file renamed over it (atomic; never through a link)."""
        return replace_file(self.path, name, write)

    def open_log(self) -> TextIO:
        """train.log for appending (a resumed run continues it); a symlink there is replaced."""
        try:
            fd = _open_not_through_link(self.path / LOG_NAME, os.O_WRONLY | os.O_APPEND)
        except OSError as err:
            raise output_error(err, self.path, LOG_NAME, "--output-dir") from err
        return os.fdopen(fd, "a", encoding="utf-8")

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # closing the descriptor drops the flock
            self._lock_fd = None
