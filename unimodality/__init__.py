"""unimodality: plugin-based multimodal contrastive learning for biology."""

from unimodality.augmentation import Augmentation
from unimodality.datamodule import DataModule
from unimodality.encoder import Encoder
from unimodality.evaluation import Evaluator, evaluate
from unimodality.loss import ContrastiveLoss
from unimodality.setup import Setup
from unimodality.sources import ModalitySource
from unimodality.tower import Tower

__version__ = "0.1.0"

#: built-in plugins importable from the package, as before they moved under unimodality.plugins (loaded on
#: first use: the core imports no plugin)
_PLUGINS = {"AnnDataSource": "unimodality.plugins.sources.anndata", "TableSource": "unimodality.plugins.sources.table"}


def __getattr__(name: str):
    if name in _PLUGINS:
        import importlib

        return getattr(importlib.import_module(_PLUGINS[name]), name)
    raise AttributeError(f"module 'unimodality' has no attribute {name!r}")

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
]
