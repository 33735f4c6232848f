"""unimodality: plugin-based multimodal contrastive learning for biology.

The names below are imported on first use (PEP 562 ``__getattr__``): ``import unimodality`` and the command's
``--help`` do not pay for torch, Lightning, the evaluation stack or any plugin until something needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it; built-in plugins keep their names from before they moved
#: under unimodality.plugins (the core imports no plugin)
_LAZY = {
    "Augmentation": "unimodality.augmentation",
    "DataModule": "unimodality.datamodule",
    "Encoder": "unimodality.encoder",
    "Evaluator": "unimodality.evaluation",
    "evaluate": "unimodality.evaluation",
    "ContrastiveLoss": "unimodality.loss",
    "Setup": "unimodality.setup",
    "ModalitySource": "unimodality.sources",
    "Tower": "unimodality.tower",
    "AnnDataSource": "unimodality.plugins.sources.anndata",
    "TableSource": "unimodality.plugins.sources.table",
    "load": "unimodality.api",
    "fit": "unimodality.api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'unimodality' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AnnDataSource",
    "Augmentation",
    "ContrastiveLoss",
    "DataModule",
    "Encoder",
    "Evaluator",
    "ModalitySource",
    "Setup",
    "TableSource",
    "Tower",
    "evaluate",
    "fit",
    "load",
]
