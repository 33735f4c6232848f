"""Builders shared by tests."""

from __future__ import annotations

from lightning.pytorch import Trainer

from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource


def example_datamodule(batch_size: int = 32, **kwargs) -> PairedDataModule:
    return PairedDataModule(
        modalities={
            "tx": AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"),
            "ph": TableSource("example://phenomics.parquet", feature_prefix="feat_"),
        },
        keys=["smiles", "concentration"],
        split_column="split",
        batch_size=batch_size,
        **kwargs,
    )


def quiet_trainer(**kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=1,
    )
    return Trainer(**{**defaults, **kwargs})
