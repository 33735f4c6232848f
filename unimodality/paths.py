"""Paths of the files a command reads and writes."""

from __future__ import annotations

import os
from pathlib import Path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same real path (symbolic links, relative paths) or the same inode
    (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False
