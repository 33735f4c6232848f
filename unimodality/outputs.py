"""Writing embeddings to files scientists already use, and the callback that does it after predict."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from unimodality.datamodule import INDEX
from unimodality.distributed import gather

OBSM_KEY = "X_unimodality"
OUTPUT_SUFFIXES = (".h5ad", ".parquet")


def check_output_path(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {output}: unsupported extension; use .h5ad or .parquet")
    return output


def _atomic_write(output: Path, write) -> None:
    """Write through a temporary file in the same folder, renamed into place only once complete."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=output.suffix, dir=output.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_embeddings(
    input_path: Path, metadata: pd.DataFrame, rows: np.ndarray, embedding: np.ndarray, output: Path
) -> Path:
    """Write ``embedding`` (one row per entry of ``rows`` of the input file).

    ``.h5ad``: a copy of the input AnnData (its rows ``rows``; obs, var and layers preserved) with
    ``obsm["X_unimodality"]``; a table input becomes an AnnData with its metadata as ``obs``.
    ``.parquet``: the metadata columns (plus ``obs_names`` for AnnData input) and one column per
    embedding dimension, ``X_unimodality_0`` ...
    """
    output = check_output_path(output)
    if output.suffix == ".h5ad":
        import anndata as ad

        if input_path.suffix == ".h5ad":
            adata = ad.read_h5ad(input_path)
            adata = adata[rows].copy() if len(rows) != adata.n_obs else adata
        else:
            adata = ad.AnnData(obs=metadata.reset_index(drop=True).set_axis(metadata.index.astype(str)))
        adata.obsm[OBSM_KEY] = embedding
        _atomic_write(output, adata.write_h5ad)
    else:
        table = metadata.copy()
        if input_path.suffix == ".h5ad":
            table.insert(0, "obs_names", table.index.astype(str))
        table = table.reset_index(drop=True)
        columns = pd.DataFrame(embedding, columns=[f"{OBSM_KEY}_{i}" for i in range(embedding.shape[1])])
        table = pd.concat([table, columns], axis=1)
        _atomic_write(output, lambda tmp: table.to_parquet(tmp, index=False))
    return output


class EmbeddingWriter(Callback):
    """Collects ``predict_step`` outputs (``index`` + ``embedding``) and hands them, gathered from every
    process and in input order, to the datamodule's ``write_predictions``."""

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._index: list[torch.Tensor] = []
        self._embedding: list[torch.Tensor] = []

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, dict) and INDEX in outputs:
            self._index.append(outputs[INDEX].detach())
            self._embedding.append(outputs["embedding"].detach().float())

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        write = getattr(trainer.datamodule, "write_predictions", None)
        if write is None or not self._index:
            return
        index, embedding = torch.cat(self._index), torch.cat(self._embedding)
        # every process's rows; the distributed sampler pads ranks with repeats, dropped below
        index, embedding = gather(index), gather(embedding)
        if trainer.is_global_zero:
            index = index.cpu().numpy()
            unique, first = np.unique(index, return_index=True)
            write(unique, embedding.cpu().numpy()[first])
        self._index, self._embedding = [], []
