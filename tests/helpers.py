"""Builders shared by tests."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer

from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.losses.clip import ClipLoss
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


class PoisonedLoss(ClipLoss):
    """CLIP, until it returns NaN from its ``after``-th training call on (a diverging run, on cue)."""

    def __init__(self, after: int = 15) -> None:
        super().__init__()
        self.after = after
        self.calls = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        loss = super().forward(a, b, group)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.after:
                return loss * float("nan")
        return loss
