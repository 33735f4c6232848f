"""Checkpoint files: safe reading (clear errors, no arbitrary unpickling), a format version, atomic writes.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only. A pickle can
run code when it is loaded, so a checkpoint holding other objects is refused rather than trusted.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from unimodality import trust
from unimodality.errors import CheckpointError

#: the layout of what unimodality adds to a checkpoint (hyper-parameters in config form, the data schema);
#: raised when that layout changes incompatibly, so older code refuses newer files instead of misreading them
CHECKPOINT_FORMAT = 1
KEY = "unimodality"


def load_file(path: str | Path, trust: bool = False) -> Any:
    """What a checkpoint or weights file holds, read the one safe way: tensors and plain containers only.

    ``trust=True`` (``--trust_checkpoint true``) unpickles any object, which can run code: only for files of
    a known origin, and with a warning.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a checkpoint file (nor a DeepSpeed checkpoint directory)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if trust:
        warnings.warn(f"{path}: loaded with weights_only=False (--trust_checkpoint): any object it holds is "
                      "unpickled, which can run code", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[-1][:300]
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain containers, so it is refused (checkpoints are "
            f"loaded with torch.load(weights_only=True): unpickling arbitrary objects can run code). Only if you "
            f"trust its origin, pass --trust_checkpoint true, or load it yourself and re-save its state_dict. "
            f"({first_line})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}") from None


def read_checkpoint(path: str | Path, expected: type | None = None, trust: bool = False) -> dict[str, Any]:
    """The content of a checkpoint file, checked: readable, tensors and containers only (unless
    ``trust``), a format this version understands, only classes `unimodality.trust` accepts and, with
    ``expected``, a model of that class (or a subclass)."""
    checkpoint = load_file(path, trust=trust)
    check_checkpoint(checkpoint, path, expected)
    return checkpoint


def check_checkpoint(checkpoint: dict[str, Any], path: str | Path, expected: type | None = None) -> None:
    """Refuse a checkpoint of a newer format, naming classes it may not name, or of a model class other than
    ``expected``."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    written = checkpoint.get(KEY, {}).get("format", CHECKPOINT_FORMAT)
    if not isinstance(written, int) or written > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: written in checkpoint format {written} by unimodality {checkpoint[KEY].get('version', '?')}; "
            f"this version reads formats up to {CHECKPOINT_FORMAT}: upgrade unimodality"
        )
    trust.check_checkpoint_classes(checkpoint, path)
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if expected is not None and saved is not None:
        name = saved.rpartition(".")[2]
        if not issubclass(trust.check_class(saved, "setup", str(path), "hyper_parameters._class_path",
                                            imports=False), expected):
            raise TypeError(
                f"{path}: holds a {name} (model class {saved}), not a {expected.__name__}; load it with "
                f"{name}.load_from_checkpoint, or predict with --model {name}"
            )


def stamp(checkpoint: dict[str, Any]) -> None:
    """Record the format and the unimodality version in a checkpoint being saved."""
    from unimodality import __version__

    checkpoint[KEY] = {"format": CHECKPOINT_FORMAT, "version": __version__}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A run killed mid-write (preemption, out-of-memory, SIGKILL) leaves the previous checkpoint intact and
    loadable instead of a truncated file under its name; the file gets the umask's mode, a full disk is
    reported as such, and temporary files of killed runs are removed (see `unimodality.files`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        from unimodality.files import atomic_write

        path = Path(path)
        if "://" in str(path):  # remote filesystems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
