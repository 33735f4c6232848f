"""Embedding a file with a model's tower exactly as ``predict`` does: ``EmbedDataModule`` reads it the way the
model's training data was read, and the setup's ``predict_step`` embeds each batch. From a checkpoint (read
by the one safe reader, under the trust model) for ``unimodality evaluate``, or from the model being trained
for the evaluation callback.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from unimodality.errors import DataError

log = logging.getLogger(__name__)


def embed_input(item: Any, path: Path | None, checkpoint: str, modality: str | None,
                source_options: dict[str, Any] | None, batch_size: int,
                trust_checkpoint: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and embeddings of an input (a file, or an in-memory ``AnnData``/``DataFrame``, written to
    a temporary file first: the datamodule reads files) by a checkpoint's tower."""
    with tempfile.TemporaryDirectory(prefix="unimodality-evaluate-") as folder:
        if path is None:
            path = Path(folder) / ("input.h5ad" if not isinstance(item, pd.DataFrame) else "input.parquet")
            if isinstance(item, pd.DataFrame):
                item.to_parquet(path)
            else:
                item.write_h5ad(path)
        return embed_with_checkpoint(path, checkpoint, modality=modality, source_options=source_options,
                                     batch_size=batch_size, trust_checkpoint=trust_checkpoint)


def load_model(checkpoint: str | Path, trust_checkpoint: bool = False) -> Any:
    """The trained setup a checkpoint holds, in eval mode, read as every command reads checkpoints.

    Args:
        checkpoint: a checkpoint of a trained model.
        trust_checkpoint: unpickle any object it holds (``torch.load(weights_only=False)``), which can run
            code: only for checkpoints of a known origin. The classes it names are checked either way.
    """
    from unimodality import trust
    from unimodality.checkpoint import read_checkpoint

    # readable, tensors only (unless trusted), a known format, known classes: before anything is built
    content = read_checkpoint(checkpoint, trust=trust_checkpoint)
    saved = trust.upgrade_class_paths(content.get("hyper_parameters") or {}).get("_class_path")
    if not saved:
        raise DataError(f"{checkpoint}: holds no model config (hyper_parameters._class_path); is it a unimodality "
                        "checkpoint?")
    setup = trust.check_class(saved, "setup", str(checkpoint), "hyper_parameters._class_path", imports=False)
    if not trust_checkpoint:
        return setup.load_from_checkpoint(str(checkpoint)).eval()
    # a trusted file is unpickled once, here: Setup.load_from_checkpoint would read it again, safely, and
    # refuse it; Lightning's own loader builds the model from what was read (and checked) above
    from lightning.pytorch.core.saving import _load_state

    return _load_state(setup, content).eval()


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
    path: str | Path, checkpoint: str | Path, modality: str | None = None,
    source_options: dict[str, Any] | None = None, batch_size: int = 512, trust_checkpoint: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of ``path`` and their embeddings by the checkpoint's tower, through ``Trainer.predict``.

    Args:
        path: the file to embed.
        checkpoint: a checkpoint of a trained model.
        modality: which tower embeds it (default: the one whose training files had this file's type).
        source_options: settings replacing those of the tower's source recorded in the checkpoint.
        batch_size: rows per forward pass.
        trust_checkpoint: see `load_model`.
    """
    from lightning.pytorch import Callback, Trainer

    from unimodality.datamodule import INDEX

    model = load_model(checkpoint, trust_checkpoint=trust_checkpoint)

    class Collect(Callback):
        def __init__(self) -> None:
            self.rows: list[np.ndarray] = []
            self.vectors: list[np.ndarray] = []

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.rows.append(outputs[INDEX].detach().cpu().numpy())
            self.vectors.append(outputs["embedding"].detach().float().cpu().numpy())

    with predict_datamodule(model, path, modality, source_options, batch_size) as datamodule:
        collect = Collect()
        quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # "GPU available: ..." lines would bury the report
        try:
            trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, callbacks=[collect], devices=1)
            # the datamodule is set up already (for this model): the trainer only iterates its dataloader
            trainer.predict(model, dataloaders=datamodule.predict_dataloader(), return_predictions=False)
        finally:
            quiet.setLevel(level)
    return unique_rows(collect.rows, collect.vectors)


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
