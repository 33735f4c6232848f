"""The batch convention, and the helpers that build batches.

A batch is a dict keyed by modality name (``"tx"``, ``"ph"``, ...) holding each modality's input (float
tensors of shape ``(batch, features)`` for vectors, ``(batch, channels, height, width)`` for images, a
``torch_geometric`` batch for molecules), plus ``"group"``: the integer id of each sample's pairing key
(perturbation), so a loss can treat samples of the same perturbation as positives. Prediction batches hold
one modality and ``"index"``, the row of each sample in the input file. Batches of data read into memory
by `PairedDataModule` also carry ``"rows/<modality>"`` (`rows_key`): the source row of each sample's input
(a row of the modality's file(s)), by which a setup may cache what a frozen tower makes of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

GROUP = "group"
INDEX = "index"
ROWS = "rows/"


def rows_key(modality: str) -> str:
    """The batch key of ``modality``'s source rows (``"rows/<modality>"``)."""
    return f"{ROWS}{modality}"


def check_sizes(owner: str, **sizes: int | None) -> None:
    """Sizes (batch sizes, counts) must be at least 1; ``None`` means unset."""
    bad = {name: value for name, value in sizes.items() if value is not None and value < 1}
    if bad:
        raise ValueError(f"{owner}: {', '.join(f'{n}={v}' for n, v in bad.items())}: must be at least 1")


def take_rows(matrix: Any, rows: np.ndarray) -> Any:
    """A batch of ``rows`` of what a source read: rows of a feature matrix as a dense float32 tensor, or
    whatever the source's own store makes of them (``store.take(rows)``: a graph batch, an image tensor)."""
    if hasattr(matrix, "take") and not isinstance(matrix, np.ndarray | sp.spmatrix):
        return matrix.take(rows)
    block = matrix[rows]
    if sp.issparse(block):
        block = block.toarray()
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Datasets here fetch whole batches (``__getitems__``), so collation has nothing left to do."""
    return batch
