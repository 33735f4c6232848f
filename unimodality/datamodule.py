"""The datamodule interface and the batch convention.

A batch is a dict keyed by modality name (``"tx"``, ``"ph"``, ...) holding float tensors of shape
``(batch, features)``, plus ``"group"``: the integer id of each sample's pairing key (perturbation), so a
loss can treat samples of the same perturbation as positives. Prediction batches hold one modality and
``"index"``, the row of each sample in the input file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningDataModule

from unimodality.config import ConfigHyperparameters

GROUP = "group"
INDEX = "index"


class DataModule(ConfigHyperparameters, LightningDataModule):
    """Base class of datamodules (plugin group ``unimodality.datamodules``).

    Subclasses read files in ``setup(stage)`` for the stages that need them and free them in ``teardown``.
    ``schema`` tells a setup what it needs to build towers, and is stored in checkpoints so new files can
    be embedded later: ``{modality: {"class_path", "init_args", "features"}}``.
    """

    @property
    def schema(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError


def take_rows(matrix: np.ndarray | sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    """Rows of an in-memory feature matrix as a dense float32 tensor."""
    block = matrix[rows]
    if sp.issparse(block):
        block = block.toarray()
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Datasets here fetch whole batches (``__getitems__``), so collation has nothing left to do."""
    return batch
