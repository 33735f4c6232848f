"""Writing a file whole or not at all: a temporary file beside it, renamed into place once complete.

Every file unimodality creates (checkpoints, predict outputs and shards, test results, the streaming cache)
is written through `atomic_path`. The temporary file is named ``.<name>.<host>-<pid>.unimodality-tmp``
(plus the name's suffix where a writer needs it), so a leftover says which run on which machine left it;
before a target is written, the leftovers of the same target by processes of this host that are no longer
alive are removed. A full disk is reported as such, with the previous file left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unimodality.errors import DataError

TEMP_MARK = ".unimodality-tmp"
#: below this much free space a failed write is taken as the disk being full (torch reports a full disk
#: as "unexpected pos ..." or "PytorchStreamWriter failed writing file", without an errno)
FULL_BELOW = 16 * 2**20
#: temporary files this process is writing now (a leftover of a dead process may carry our recycled pid)
_WRITING: set[Path] = set()


def temp_path(target: Path, suffix: str = "") -> Path:
    """The temporary name of ``target`` for this process: ``.<name>.<host>-<pid>.unimodality-tmp<suffix>``."""
    return target.parent / f".{target.name}.{_host()}-{os.getpid()}{TEMP_MARK}{suffix}"


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary files of ``target`` left by dead processes of this host; the removed paths.

    Those of live processes (a concurrent writer) and of other hosts (a shared filesystem, whose
    processes cannot be checked from here) are left alone.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{re.escape(_host())}-(\d+){re.escape(TEMP_MARK)}")
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or entry.name[match.end():] not in ("", target.suffix):
            continue
        path, pid = Path(entry.path), int(match.group(1))
        if pid == os.getpid() and path in _WRITING:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process may clean up at the same time
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``target``'s content to; on success it is synced and renamed to ``target``.

    The temporary file is created before it is yielded, with mode ``0o666`` less the umask (what the
    kernel gives any new file, unlike ``mkstemp``'s ``0o600``); a writer that truncates it keeps that
    mode. On any error it is removed and ``target`` is left as it was; a full disk raises a
    `DataError` saying so.

    Args:
        target: the file to write.
        suffix: appended to the temporary name, for writers that add their own otherwise (``np.savez``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = temp_path(target, suffix)
    if tmp in _WRITING:
        raise RuntimeError(f"{target} is already being written by this process")
    _WRITING.add(tmp)
    try:
        # O_EXCL: a stale file of a dead process that had our pid was removed above
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode & 0o7777
        yield tmp
        if os.stat(tmp).st_mode & 0o7777 != mode:  # a writer that recreated the file
            os.chmod(tmp, mode)
        _sync(tmp)
        os.replace(tmp, target)
        _sync_folder(target.parent)
    except BaseException as error:
        full = _no_space(error, target.parent)  # measured while the temporary file still holds its space
        tmp.unlink(missing_ok=True)
        if full:
            raise DataError(
                f"{target}: {full} while writing it; free space or choose another folder "
                f"(the previous {target.name}, if any, is unchanged)"
            ) from None
        raise
    finally:
        _WRITING.discard(tmp)


def atomic_write(target: str | Path, write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Write ``target`` whole or not at all: ``write(tmp)`` writes the content to a temporary path."""
    target = Path(target)
    with atomic_path(target, suffix) as tmp:
        write(tmp)
    return target


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable; some filesystems cannot sync a folder (the file is synced anyway)."""
    with contextlib.suppress(OSError):
        _sync(folder)


def _no_space(error: BaseException, folder: Path) -> str:
    """What ran out (``no space left on device``, ``disk quota exceeded``) if that made ``error``; else ``""``."""
    if not isinstance(error, OSError | RuntimeError):
        return ""
    code = getattr(error, "errno", None)
    if code == errno.EDQUOT or "Disk quota exceeded" in str(error):
        return "disk quota exceeded"
    if code == errno.ENOSPC or "No space left on device" in str(error):
        return "no space left on device"
    # torch and HDF5 report a failed write without an errno: a full filesystem explains it
    if code is None and _free(folder) < FULL_BELOW:
        return "no space left on device"
    return ""


def _free(folder: Path) -> int:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return 2**62
    return stat.f_bavail * stat.f_frsize
