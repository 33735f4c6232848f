"""Evaluation during ``fit``: chosen evaluators on chosen held-out files every N epochs, logged as metrics
(``eval/<evaluator>/<metric>[/<target>]``) so that checkpoints can be selected on them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch import Callback, LightningModule, Trainer

from unimodality.errors import DataError
from unimodality.evaluation.alignment import Alignment
from unimodality.evaluation.baselines import BASELINES
from unimodality.evaluation.embedding import embed_with_model, predict_datamodule
from unimodality.evaluation.evaluator import Evaluator, resolve_evaluator
from unimodality.evaluation.pipeline import evaluate

log = logging.getLogger(__name__)
#: the obsm key the held-out files' embeddings are evaluated under
KEY = "X_unimodality"


class EvaluationCallback(Callback):
    """Runs evaluators on held-out files every ``every_n_epochs`` epochs of ``fit`` and logs their scores.

    Each file is embedded by the model being trained exactly as ``unimodality predict`` would embed it (the
    file read the way the training data was read, the tower's ``predict_step``, eval mode, no gradients) and
    scored by ``unimodality.evaluate`` with the same options. Every score is logged as
    ``<prefix>/<evaluator>/<metric>`` (``/<target>`` appended when it has one, e.g. ``/Metadata_moa`` or
    ``/tx->ph``; ``<prefix>/<dataset>/...`` with several files), so ``ModelCheckpoint(monitor=
    "eval/replicate_retrieval_map/mAP", mode="max", every_n_epochs=N)`` keeps the best model by it. The
    chance level and requested baselines are logged beside it as ``<prefix>_chance/...`` and
    ``<prefix>_<baseline>/...``.

    Between evaluations the callback costs one integer test per epoch. The files are read once, at the
    first evaluation; each evaluation then costs one forward pass over them plus the evaluators. Under DDP
    the first process embeds and scores (on its copy of the model, without any collective), then broadcasts
    the scores: every process logs the same numbers, so a checkpoint monitoring them decides alike on all
    of them. An error there is raised on every process (no process is left waiting).

    Args:
        inputs: the held-out file(s) (``.h5ad`` or tables, as ``predict`` reads them); each is one dataset.
        evaluators: registered names or ``{class_path, init_args}`` configs (see ``unimodality evaluate``);
            default: those the given columns allow.
        every_n_epochs: evaluate after every this many training epochs (epochs N, 2N, ...).
        perturbation: metadata column(s) naming each row's perturbation.
        batch: metadata column naming each row's batch, for the alignment.
        control: the value of control rows in ``control_column``.
        control_column: where ``control`` is found; default the (first) perturbation column.
        labels: label columns scored by consistency mAP, kNN and the linear probe.
        alignment: centring/scaling on controls per batch, TVN, aggregation of replicates.
        baselines: baselines to score too, from the tower's input features (``raw``, ``pca``, ``random``);
            default none: they do not change during training, and each costs as much as the embedding.
        modality: which tower embeds the files (default: by file type, as ``predict``).
        source_options: settings replacing those of the tower's source, e.g. ``{"exclude": null}`` to embed
            control rows a training filter left out.
        batch_size: rows per forward pass.
        combine: score all files as one dataset (a ``file`` column tells them apart, usable as ``batch``).
        prefix: the metrics' name prefix.
        seed: seed of the PCA and random-projection baselines.
    """

    def __init__(
        self,
        inputs: str | list[str],
        evaluators: list[str | dict[str, Any]] | None = None,
        every_n_epochs: int = 1,
        perturbation: str | list[str] | None = None,
        batch: str | None = None,
        control: str | None = None,
        control_column: str | None = None,
        labels: str | list[str] | None = None,
        alignment: Alignment = Alignment(),
        baselines: list[str] = [],
        modality: str | None = None,
        source_options: dict[str, Any] | None = None,
        batch_size: int = 512,
        combine: bool = False,
        prefix: str = "eval",
        seed: int = 0,
    ) -> None:
        from unimodality.paths import resolve_path

        if every_n_epochs < 1:
            raise DataError(f"EvaluationCallback: every_n_epochs must be at least 1, got {every_n_epochs}")
        self.inputs = [inputs] if isinstance(inputs, str | Path) else list(inputs)
        if not self.inputs:
            raise DataError("EvaluationCallback: inputs names no file")
        for item in self.inputs:
            if not resolve_path(item).exists():
                raise DataError(f"EvaluationCallback: input {item}: no such file")
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise DataError(f"EvaluationCallback: unknown baseline(s) {unknown}; baselines are {', '.join(BASELINES)}")
        # resolved now: a misspelt evaluator fails when the config is read, not after N epochs of training
        self.chosen: list[Evaluator] | None = (None if evaluators is None
                                               else [resolve_evaluator(e) for e in evaluators])
        self.evaluators = evaluators
        self.every_n_epochs = int(every_n_epochs)
        self.options = dict(perturbation=perturbation, batch=batch, control=control, control_column=control_column,
                            labels=labels, alignment=alignment, combine=combine, seed=seed)
        self.baselines = list(baselines)
        self.modality = modality
        self.source_options = source_options
        self.batch_size = batch_size
        self.prefix = prefix
        #: the metrics of the latest evaluation, ``{name: value}``
        self.latest: dict[str, float] = {}
        #: epochs (0-based) at which an evaluation ran
        self.evaluated_epochs: list[int] = []
        self._prepared: list[tuple[str, Any, Any]] | None = None  # (name, datamodule context, datamodule)

    # -- when -----------------------------------------------------------------------------------------------
    def due(self, trainer: Trainer) -> bool:
        """Whether this training epoch ends with an evaluation (every N-th epoch, counting from 1)."""
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_train_epoch_end runs after the epoch's validation and before ModelCheckpoint's own hook
        # (Lightning runs checkpoint callbacks last), so a checkpoint monitoring these metrics sees them
        if trainer.sanity_checking or not self.due(trainer):
            return
        tic = time.perf_counter()
        metrics = _on_first_process(trainer, lambda: self.evaluate(trainer, pl_module))
        self.latest = metrics
        self.evaluated_epochs.append(trainer.current_epoch)
        for name, value in metrics.items():
            # the same values on every process (broadcast): no reduction needed, and none would be exact
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=False)
        log.info("evaluation at epoch %d: %d metrics in %.1f s", trainer.current_epoch, len(metrics),
                 time.perf_counter() - tic)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    # -- what ----------------------------------------------------------------------------------------------
    def evaluate(self, trainer: Trainer | None, pl_module: LightningModule) -> dict[str, float]:
        """Embed the held-out files with ``pl_module`` and score them; returns the metrics to log."""
        datasets = {}
        for name, _, datamodule in self._datamodules(pl_module):
            rows, vectors = embed_with_model(pl_module, datamodule, trainer)
            datasets[name] = self._anndata(datamodule, rows, vectors)
        # without feature vectors (molecules, images) the report notes that there are no baselines
        table = evaluate(datasets, embedding=KEY, evaluators=self.chosen, baselines=self.baselines, output=None,
                         plots=False, **self.options)
        return self.metrics(table)

    def metrics(self, table: pd.DataFrame) -> dict[str, float]:
        """A report table as ``{metric name: value}``: the embedding's, chance's and each baseline's."""
        several = table["dataset"].nunique() > 1
        out: dict[str, float] = {}
        for row in table.itertuples(index=False):
            parts = [row.dataset] if several else []
            parts += [row.evaluator, row.metric] + ([str(row.target)] if row.target else [])
            name = "/".join(parts)
            out[f"{self.prefix}/{name}"] = float(row.value)
            if not math.isnan(row.chance):
                out[f"{self.prefix}_chance/{name}"] = float(row.chance)
            for baseline in self.baselines:
                value = getattr(row, baseline)
                if not pd.isna(value):
                    out[f"{self.prefix}_{baseline}/{name}"] = float(value)
        return out

    def _datamodules(self, pl_module: LightningModule) -> list[tuple[str, Any, Any]]:
        """Each file's predict datamodule, set up once (the files are read once per fit)."""
        if self._prepared is None:
            prepared, seen = [], {}
            try:
                for item in self.inputs:
                    context = predict_datamodule(pl_module, item, self.modality, self.source_options,
                                                 self.batch_size)
                    datamodule = context.__enter__()
                    stem = Path(str(item)).name.split(".")[0]
                    seen[stem] = seen.get(stem, 0) + 1
                    prepared.append((stem if seen[stem] == 1 else f"{stem}_{seen[stem]}", context, datamodule))
            except BaseException:
                for _, context, _ in prepared:
                    context.__exit__(None, None, None)
                raise
            self._prepared = prepared
        return self._prepared

    def _anndata(self, datamodule: Any, rows: np.ndarray, vectors: np.ndarray) -> Any:
        """The embedded rows as ``predict`` writes them: the file's metadata, the embedding in ``obsm``; the
        tower's input features as ``X`` when baselines are wanted and the inputs are feature vectors."""
        import anndata as ad
        import torch

        from unimodality.batch import take_rows

        obs = datamodule.source.read_metadata().iloc[rows].reset_index(drop=True)
        obs.index = obs.index.astype(str)
        x = None
        if self.baselines:
            position = np.searchsorted(datamodule.dataset.rows, rows)  # the dataset's rows are ascending
            features = take_rows(datamodule.dataset.features, position)
            x = features.numpy() if isinstance(features, torch.Tensor) and features.ndim == 2 else None
        adata = ad.AnnData(X=x, obs=obs)
        adata.obsm[KEY] = vectors
        return adata

    def _release(self) -> None:
        for _, context, _ in self._prepared or []:
            context.__exit__(None, None, None)
        self._prepared = None


def _on_first_process(trainer: Trainer, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``compute()`` on the first process, its result broadcast to all; its error raised on all."""
    result, error, failure = None, None, None
    if trainer.is_global_zero:
        try:
            result = compute()
        except Exception as caught:  # told to every process below, then raised here as it is
            failure = caught
            error = f"{type(caught).__name__}: {caught}"
    if trainer.world_size > 1:
        result, error = trainer.strategy.broadcast((result, error), src=0)
    if failure is not None:
        raise failure
    if error is not None:
        raise RuntimeError(f"EvaluationCallback failed on the first process: {error}")
    return result
