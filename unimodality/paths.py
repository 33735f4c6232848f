"""Paths of the files a command reads and writes, and the ``example://`` scheme of the bundled example data."""

from __future__ import annotations

import os
from pathlib import Path

#: the prefix naming a file of the bundled example data in a config, e.g. ``example://phenomics.parquet``
SCHEME = "example://"


def resolve_path(path: str | os.PathLike) -> Path:
    """Map ``example://<file>`` to the generated file (creating it on first use); other paths unchanged."""
    text = str(path)
    if not text.startswith(SCHEME):
        return Path(text).expanduser()
    from unimodality.example_data import example_file  # numpy-heavy generation, only when asked for

    return example_file(text[len(SCHEME):])


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same real path (symbolic links, relative paths) or the same inode
    (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def disk_size(path: str | Path) -> int:
    """Bytes a file takes, or all the files under a folder (a ``.zarr`` store, a sharded table)."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
