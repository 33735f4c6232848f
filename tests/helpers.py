"""Builders shared by tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def copy_of_clip_run(clip_run_dir: Path, folder: Path) -> Path:
    """last.ckpt of a private copy of the session's 1-epoch CLIP run (the ``clip_run_dir`` fixture) under
    ``folder/runs/clip/version_0``: a test may write next to it without touching what other tests read."""
    copy = folder / "runs" / "clip" / "version_0"
    shutil.copytree(clip_run_dir, copy)
    return copy / "checkpoints" / "last.ckpt"


def fork(target: Callable[..., object], *args: object) -> int:
    """Run ``target(*args)`` in a child process forked from this one; returns the child's pid.

    For the tests that need *another process* to die in the middle of something (a write, a held lock): a
    forked child has everything imported already, where a new interpreter would spend ~10 s importing torch
    and Lightning first. The child leaves with ``os._exit`` (status 0, or 1 if ``target`` raised): it never
    returns into pytest. Reap it with ``os.waitpid``.
    """
    pid = os.fork()
    if pid == 0:  # the child
        try:
            torch.set_num_threads(1)  # as DataLoader workers do: no intra-op thread pool across a fork
            target(*args)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    return pid
