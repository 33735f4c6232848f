"""One run at a time in a run directory: an OS-level lock held while ``fit`` runs.

Two ``fit`` processes writing one run directory would mix their config, checkpoints and metrics. The lock
is a POSIX record lock (``fcntl.lockf``, which NFS and Lustre support) on ``.<run dir name>.lock`` beside the
run directory (inside it, loggers would take it for an earlier run's files): the operating system releases it
when the process ends, however it ends, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from unimodality.errors import DataError

_held: dict[Path, IO[str]] = {}


class RunDirectoryInUse(DataError):
    """Another running process holds the run directory."""


def lock_run_directory(run_dir: str | Path, hint: str = "") -> Path:
    """Lock ``run_dir`` for this process, or fail at once if another process holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir.parent / f".{run_dir.name}.lock", "a+")  # noqa: SIM115 - held open until the fit ends
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirectoryInUse(
            f"run directory {run_dir} is in use by {holder}: wait for that run to end{hint}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"fit pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held[run_dir] = handle
    return run_dir


def release_run_directory(run_dir: str | Path) -> None:
    """Let ``run_dir`` go once its fit has ended, so a later fit (in this process or another) may take it and
    a process running many fits (a sweep, a notebook) does not keep a file open for each. The lock file
    stays: a process that has it open then locks the same file."""
    handle = _held.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()


def claim_new_directory(parent: Path, name: str) -> bool:
    """Create ``parent/name``, which must not exist yet; ``False`` when another process created it first."""
    parent.mkdir(parents=True, exist_ok=True)
    try:
        (parent / name).mkdir()
    except FileExistsError:
        return False
    return True


def remove_failed_run(created: str | Path, run_dir: str | Path) -> bool:
    """Remove what a fit created (``created``: its run directory, or the outermost folder made for it) when
    the fit failed before saving any checkpoint (a bad config or bad data): no empty ``version_<n>`` is left
    behind. Keeps everything when ``created`` holds a checkpoint."""
    created, run_dir = Path(created).absolute(), Path(run_dir).resolve()
    if not created.exists() or any(created.glob("**/*.ckpt")):
        return False
    import shutil

    handle = _held.pop(run_dir, None)
    if handle is not None:
        handle.close()
        (run_dir.parent / f".{run_dir.name}.lock").unlink(missing_ok=True)
    shutil.rmtree(created, ignore_errors=True)
    return True
