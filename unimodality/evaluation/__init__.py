"""Evaluating embeddings the way the field does, with their baselines in the same report.

The core of ``unimodality evaluate``, of `evaluate` (the same from a notebook) and of the
`EvaluationCallback` (the same during ``fit``), one concept per module:

1. ``inputs``: ``.h5ad`` files (an ``obsm`` key, ``X``, or a checkpoint that embeds the file first, exactly as
   ``predict`` does: ``embedding``), tables (parquet/CSV with embedding columns), in-memory ``AnnData``/
   ``DataFrame``;
2. ``baselines``: what every number is read against: the raw input features, their PCA to the embedding's
   dimension, and a random projection of them;
3. ``alignment``: the same for every representation: each batch centred (and optionally scaled) on its
   control rows, optionally typical variation normalisation (TVN); replicates are aggregated per
   perturbation (mean or median, ``data``) by the evaluators that score perturbations;
4. ``evaluator``: the `Evaluator` interface (plugin group ``unimodality.evaluators``);
5. ``report`` and ``plots``: one tidy table (``evaluator, dataset, metric, target, value, raw, pca, random,
   chance, n``), written atomically as CSV + JSON with PNG plots;
6. ``pipeline``: `evaluate`, which runs them in that order; ``callback``: the same during training.

The core names evaluators only through the plugin registry; it imports none of them.
"""

from unimodality.evaluation.alignment import Alignment, align
from unimodality.evaluation.baselines import BASELINES, baseline_profiles
from unimodality.evaluation.callback import EvaluationCallback
from unimodality.evaluation.data import EMBEDDING, EvaluationData
from unimodality.evaluation.embedding import embed_with_checkpoint, embed_with_model, load_model
from unimodality.evaluation.evaluator import GROUP, Evaluator, Result, Score, default_evaluators, resolve_evaluator
from unimodality.evaluation.inputs import LoadedDataset, combine_datasets, load_dataset
from unimodality.evaluation.pipeline import evaluate
from unimodality.evaluation.plots import plot_report
from unimodality.evaluation.report import TABLE_COLUMNS, format_table, report_table, write_report

__all__ = [
    "BASELINES",
    "EMBEDDING",
    "GROUP",
    "TABLE_COLUMNS",
    "Alignment",
    "EvaluationCallback",
    "EvaluationData",
    "Evaluator",
    "LoadedDataset",
    "Result",
    "Score",
    "align",
    "baseline_profiles",
    "combine_datasets",
    "default_evaluators",
    "embed_with_checkpoint",
    "embed_with_model",
    "evaluate",
    "format_table",
    "load_dataset",
    "load_model",
    "plot_report",
    "report_table",
    "resolve_evaluator",
    "write_report",
]
