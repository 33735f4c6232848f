"""Checkpoint files: safe reading (clear errors, no arbitrary unpickling), a format version, atomic writes.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only. A pickle can
run code when it is loaded, so a checkpoint holding other objects is refused rather than trusted.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from unimodality.sources import DataError

#: the layout of what unimodality adds to a checkpoint (hyper-parameters in config form, the data schema);
#: raised when that layout changes incompatibly, so older code refuses newer files instead of misreading them
CHECKPOINT_FORMAT = 1
KEY = "unimodality"


class CheckpointError(DataError):
    """A checkpoint that cannot be used: missing, unreadable, of another setup or a newer format."""


def read_checkpoint(path: str | Path, expected: type | None = None) -> dict[str, Any]:
    """The content of a checkpoint file, checked: readable, tensors and containers only, a format this
    version understands and, with ``expected``, a model of that class (or a subclass)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a checkpoint file (nor a DeepSpeed checkpoint directory)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[-1][:300]
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain containers, so it is refused (checkpoints are "
            f"loaded with torch.load(weights_only=True): unpickling arbitrary objects can run code). Only if you "
            f"trust its origin, load it yourself with weights_only=False and re-save its state_dict. ({first_line})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {err}") from None
    check_checkpoint(checkpoint, path, expected)
    return checkpoint


def check_checkpoint(checkpoint: dict[str, Any], path: str | Path, expected: type | None = None) -> None:
    """Refuse a checkpoint of a newer format, or of a model class other than ``expected``."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    written = checkpoint.get(KEY, {}).get("format", CHECKPOINT_FORMAT)
    if written > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: written in checkpoint format {written} by unimodality {checkpoint[KEY].get('version', '?')}; "
            f"this version reads formats up to {CHECKPOINT_FORMAT}: upgrade unimodality"
        )
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if expected is not None and saved is not None:
        module, _, name = saved.rpartition(".")
        classes = {f"{c.__module__}.{c.__qualname__}" for c in expected.__mro__}
        if saved not in classes and not _is_subclass(saved, expected):
            raise TypeError(
                f"{path}: holds a {name} (model class {saved}), not a {expected.__name__}; load it with "
                f"{name}.load_from_checkpoint, or predict with --model {name}"
            )


def _is_subclass(class_path: str, expected: type) -> bool:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        saved = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(saved, type) and issubclass(saved, expected)


def stamp(checkpoint: dict[str, Any]) -> None:
    """Record the format and the unimodality version in a checkpoint being saved."""
    from unimodality import __version__

    checkpoint[KEY] = {"format": CHECKPOINT_FORMAT, "version": __version__}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A run killed mid-write (preemption, out-of-memory, SIGKILL) leaves the previous checkpoint intact and
    loadable instead of a truncated file under its name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        if "://" in str(path):  # remote filesystems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
