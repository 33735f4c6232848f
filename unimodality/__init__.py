"""unimodality: plugin-based multimodal contrastive learning for biology."""

from unimodality.augmentation import Augmentation
from unimodality.datamodule import DataModule
from unimodality.encoder import Encoder
from unimodality.loss import ContrastiveLoss
from unimodality.setup import Setup
from unimodality.sources import AnnDataSource, ModalitySource, TableSource
from unimodality.tower import Tower

__version__ = "0.1.0"
__all__ = [
    "AnnDataSource",
    "Augmentation",
    "ContrastiveLoss",
    "DataModule",
    "Encoder",
    "ModalitySource",
    "Setup",
    "TableSource",
    "Tower",
]
