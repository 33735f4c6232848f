"""Embedding a file with a model's tower exactly as ``predict`` does: ``EmbedDataModule`` reads it the way the
model's training data was read, and the setup's ``predict_step`` embeds each batch. From a checkpoint (read
by the one safe reader, under the trust model) for ``unimodality evaluate``, or from the model being trained
for the evaluation callback.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load_model(checkpoint: str | Path, trust_checkpoint: bool = False) -> Any:
    """The trained setup a checkpoint holds, in eval mode, read as every command reads checkpoints.

    Args:
        checkpoint: a checkpoint of a trained model.
        trust_checkpoint: unpickle any object it holds (``torch.load(weights_only=False)``), which can run
            code: only for checkpoints of a known origin. The classes it names are checked either way.
    """
    from unimodality.api import load

    return load(checkpoint, trust_checkpoint=trust_checkpoint).module


@dataclass
class _Holder:
    """What ``EmbedDataModule.setup`` asks of a trainer: the model whose schema says how to read the file."""

    lightning_module: Any


@contextmanager
def predict_datamodule(model: Any, path: str | Path, modality: str | None = None,
                       source_options: dict[str, Any] | None = None, batch_size: int = 512) -> Iterator[Any]:
    """``predict``'s datamodule (``EmbedDataModule``) for ``path``, set up for ``model``; torn down after."""
    from unimodality import trust

    datamodule_cls = trust.check_class("EmbedDataModule", "datamodule", "unimodality evaluate", "embedding")
    with tempfile.TemporaryDirectory(prefix="unimodality-embed-") as folder:
        # nothing is written there: without predict's EmbeddingWriter the embeddings stay in memory
        datamodule = datamodule_cls(path=str(path), modality=modality, output=str(Path(folder) / "unused.parquet"),
                                    source_options=source_options, batch_size=batch_size)
        datamodule.trainer = _Holder(model)
        datamodule.setup("predict")
        try:
            yield datamodule
        finally:
            datamodule.teardown("predict")


def unique_rows(rows: list[np.ndarray], vectors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each embedded row once, in row order (a distributed sampler's padding repeats dropped)."""
    found, first = np.unique(np.concatenate(rows), return_index=True)
    return found, np.concatenate(vectors)[first]


def embed_with_checkpoint(
    path: Any, checkpoint: str | Path, modality: str | None = None,
    source_options: dict[str, Any] | None = None, batch_size: int = 512, trust_checkpoint: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of ``path`` and their embeddings by the checkpoint's tower: ``unimodality.load(checkpoint)
    .embed(path, ..., return_rows=True)``, which embeds exactly as ``predict`` does.

    Args:
        path: the file to embed, or an ``AnnData``/``DataFrame`` (see `unimodality.api.Model.embed`).
        checkpoint: a checkpoint of a trained model.
        modality: which tower embeds it (default: the one whose training files had this file's type).
        source_options: settings replacing those of the tower's source recorded in the checkpoint.
        batch_size: rows per forward pass.
        trust_checkpoint: see `load_model`.
    """
    from unimodality.api import load

    return load(checkpoint, trust_checkpoint=trust_checkpoint).embed(
        path, modality, batch_size=batch_size, source_options=source_options, return_rows=True)


def embed_with_model(model: Any, datamodule: Any, trainer: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and embeddings of a set-up `predict_datamodule` by ``model`` (the module being
    trained): its ``predict_step`` in eval mode without gradients, under the trainer's precision, on the
    model's device; the model's train/eval mode is restored after. Bypasses any DDP wrapper: no collective
    is called, so one process can do it alone."""
    from contextlib import nullcontext

    from lightning.fabric.utilities.apply_func import move_data_to_device

    from unimodality.datamodule import INDEX

    precision = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    context = precision.predict_step_context() if precision is not None else nullcontext()
    rows: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), context:
            for index, batch in enumerate(datamodule.predict_dataloader()):
                outputs = model.predict_step(move_data_to_device(batch, model.device), index)
                rows.append(outputs[INDEX].detach().cpu().numpy())
                vectors.append(outputs["embedding"].detach().float().cpu().numpy())
    finally:
        model.train(training)
    return unique_rows(rows, vectors)
