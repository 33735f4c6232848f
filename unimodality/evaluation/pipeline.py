"""The evaluation: inputs read, baselines computed, every representation aligned the same way, every
evaluator run on each, and the report assembled and written (``unimodality evaluate`` and
``unimodality.evaluate``)."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from unimodality.errors import DataError
from unimodality.evaluation.alignment import Alignment, align
from unimodality.evaluation.baselines import BASELINES, baseline_profiles
from unimodality.evaluation.data import EMBEDDING, EvaluationData
from unimodality.evaluation.evaluator import Evaluator, default_evaluators, resolve_evaluator
from unimodality.evaluation.inputs import check_columns, combine_datasets, list_inputs, load_dataset
from unimodality.evaluation.report import output_files, report_table, write_report
from unimodality.sources import Transform


def evaluate(
    data: Any,
    embedding: str = "X_unimodality",
    features: str | None = None,
    features_transform: Transform = "none",
    perturbation: str | list[str] | None = None,
    batch: str | None = None,
    control: str | None = None,
    control_column: str | None = None,
    labels: str | list[str] | None = None,
    evaluators: list[Evaluator | str] | None = None,
    baselines: list[str] = list(BASELINES),
    alignment: Alignment = Alignment(),
    combine: bool = False,
    modality: str | None = None,
    source_options: dict[str, Any] | None = None,
    batch_size: int = 512,
    trust_checkpoint: bool = False,
    seed: int = 0,
    output: str | Path | None = None,
    overwrite: bool = False,
    plots: bool = True,
) -> pd.DataFrame:
    """Score an embedding with the field's metrics, next to its baselines, and return the report table.

    Example (a notebook)::

        table = unimodality.evaluate(adata, embedding="X_unimodality", perturbation="gene", batch="plate",
                                     control="non-targeting", evaluators=["KnownRelationshipRecall"])

    Args:
        data: the input(s): an ``AnnData``, a ``DataFrame``, a file (``.h5ad``, parquet, CSV/TSV, gzipped
            too) or folder of them, a list of those, or a dict naming them. Each input is one dataset.
        embedding: what to evaluate: an ``obsm`` key (also ``obsm/KEY``, ``layers/NAME``), ``X`` (the raw
            features), a checkpoint (``.ckpt``: each file is embedded first with the right tower, as
            ``predict`` does), or for tables the prefix of embedding columns ``<prefix>_0 ...`` or a column of
            vectors.
        features: the raw features the baselines start from: ``X``, ``layers/NAME`` or ``obsm/KEY`` of an
            ``.h5ad`` (default ``X``); a regular expression of a table's feature columns (default: its numeric
            columns not starting with ``Metadata`` that are not embedding columns). Columns named as
            ``perturbation``, ``batch``, ``control_column`` or ``labels`` are never features.
        features_transform: applied to the raw features first (``log1p``, ``normalize_log1p`` for counts,
            ``clr`` for protein counts).
        perturbation: metadata column(s) naming each row's perturbation (gene, compound; several columns:
            their combination, e.g. compound and dose).
        batch: metadata column naming each row's batch (plate, experiment), for the alignment.
        control: the value of control rows (``DMSO``, ``non-targeting``) in ``control_column``.
        control_column: where ``control`` is found; default the (first) perturbation column.
        labels: label columns (MOA, target, cell type) scored by consistency mAP, kNN and the linear probe.
        evaluators: registered evaluator names (``unimodality plugins`` lists them), configs
            (``{class_path, init_args}``) or instances; default: those the given columns allow.
        baselines: scored beside the embedding: ``raw`` (the input features), ``pca`` (their PCA to the
            embedding's dimension), ``random`` (a random projection to it); ``[]`` for none.
        alignment: centring/scaling on controls per batch, TVN, and how replicates are aggregated.
        combine: stack all inputs into one dataset (with a ``file`` column, usable as ``batch``).
        modality: with a checkpoint: which tower embeds the files (default: by file type).
        source_options: with a checkpoint: settings replacing those of the tower's recorded source, e.g.
            ``{"exclude": null}`` to embed control rows a training filter left out.
        batch_size: with a checkpoint: rows per forward pass.
        trust_checkpoint: with a checkpoint: unpickle any object it holds (``torch.load(weights_only=False)``),
            which can run code: only for checkpoints of a known origin (as ``--trust_checkpoint`` of
            ``predict``). By default a checkpoint holding anything but tensors and plain containers is refused.
            The classes a checkpoint names are checked either way.
        seed: seed of the PCA and random-projection baselines.
        output: folder for ``evaluation.csv``/``.json``, ``details/`` and ``plots/``; ``None``: no files.
        overwrite: replace an existing report in ``output`` (by default it is an error, left untouched).
        plots: draw the PNG plots (needs matplotlib).

    Returns:
        The report: one row per (evaluator, dataset, metric, target) with ``value`` (the embedding), the
        baselines' values (``raw``, ``pca``, ``random``), ``chance`` and ``n``. ``table.attrs["details"]``
        holds the per-item results.
    """
    started = time.perf_counter()
    perturbation = [perturbation] if isinstance(perturbation, str) else list(perturbation or [])
    labels = [labels] if isinstance(labels, str) else list(labels or [])
    if isinstance(alignment, Mapping):
        alignment = Alignment(**alignment)
    baselines = list(baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise DataError(f"unknown baseline(s) {unknown}; baselines are {', '.join(BASELINES)}")
    files = output_files(output, overwrite) if output is not None else None

    inputs = list_inputs(data)
    # evaluators are resolved before any file is read: a misspelt name fails at once
    n_datasets = 1 if combine else len(inputs)
    specs = evaluators if evaluators is not None else default_evaluators(perturbation, control, labels, n_datasets)
    if not specs:
        raise DataError("no evaluator applies: name some (--evaluators), or give the columns they need "
                        "(--perturbation with --control, --labels)")
    chosen = [resolve_evaluator(s) for s in specs]

    named = [*perturbation, *labels, *(c for c in (batch, control_column) if c is not None)]
    loaded = [load_dataset(item, name, embedding, features, features_transform, modality, source_options, batch_size,
                           trust_checkpoint, metadata=named)
              for name, item in inputs]
    if combine and len(loaded) > 1:
        loaded = [combine_datasets(loaded)]
    seen: dict[str, int] = {}
    for dataset in loaded:  # two files of one name: both kept, told apart
        seen[dataset.name] = seen.get(dataset.name, 0) + 1
        if seen[dataset.name] > 1:
            dataset.name = f"{dataset.name}_{seen[dataset.name]}"
    for dataset in loaded:
        check_columns(dataset, perturbation, batch, control, control_column, labels)

    describe = dict(perturbation=perturbation, batch=batch, control=control, control_column=control_column,
                    labels=labels, aggregate=alignment.aggregate)
    representations: dict[str, dict[str, EvaluationData]] = {}
    notes: list[str] = []
    for dataset in loaded:
        profiles = {EMBEDDING: dataset.embedding}
        if baselines and dataset.raw is None:
            notes.append(f"{dataset.name}: no raw features found (features={features!r}): no baselines")
        elif baselines:
            wanted = [b for b in baselines if not (b == "raw" and dataset.embedding_is_raw)]
            profiles |= baseline_profiles(dataset.raw, dataset.embedding.shape[1], wanted, seed=seed)
        representations[dataset.name] = {
            rep: align(EvaluationData(x, dataset.obs, dataset.name, rep, **describe), alignment)
            for rep, x in profiles.items()
        }

    scored: list[dict[str, Any]] = []
    details: dict[tuple[str, str], pd.DataFrame] = {}
    timings: list[dict[str, Any]] = []
    said: dict[str, list[str]] = {}  # note -> the representations it was made for (one line for all of them)
    for evaluator in chosen:
        groups = ([("+".join(representations), {rep: {n: r[rep] for n, r in representations.items()}
                                               for rep in [EMBEDDING]})] if evaluator.across_datasets
                  else [(name, reps) for name, reps in representations.items()])
        for dataset_name, reps in groups:
            frames = []
            for rep, profiles in reps.items():
                tic = time.perf_counter()
                if evaluator.across_datasets:
                    result = evaluator.evaluate_datasets(profiles)
                else:
                    result = evaluator.evaluate(profiles)
                timings.append({"evaluator": evaluator.report_name, "dataset": dataset_name, "representation": rep,
                                "seconds": round(time.perf_counter() - tic, 4)})
                for note in result.notes:
                    said.setdefault(f"{evaluator.report_name} on {dataset_name}: {note}", []).append(rep)
                for score in result.scores:
                    scored.append({"evaluator": evaluator.report_name, "dataset": dataset_name, "representation": rep,
                                   **dataclasses.asdict(score)})
                if result.details is not None:
                    frames.append(result.details.assign(representation=rep))
            if frames:
                details[(evaluator.report_name, dataset_name)] = pd.concat(frames, ignore_index=True)
    table = report_table(scored, embedding_is_raw={d.name: d.embedding_is_raw and "raw" in baselines
                                                  for d in loaded})
    table.attrs["details"] = details
    all_reps = {rep for reps in representations.values() for rep in reps}
    notes += [note if set(reps) >= all_reps else f"{note} ({', '.join(reps)})" for note, reps in said.items()]
    table.attrs["notes"] = list(dict.fromkeys(notes))
    if files is not None:
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "unimodality_version": _version(),
            "datasets": [{"name": d.name, "rows": len(d.obs), "embedding_dim": int(d.embedding.shape[1]),
                          "raw_features": None if d.raw is None else int(d.raw.shape[1]), **d.origin} for d in loaded],
            "columns": {"perturbation": perturbation, "batch": batch, "control": control,
                        "control_column": control_column, "labels": labels},
            "alignment": dataclasses.asdict(alignment), "baselines": baselines, "seed": seed,
            "evaluators": [e.config() for e in chosen], "notes": table.attrs["notes"], "timings": timings,
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_report(table, details, record, files, plots=plots, evaluators=chosen)
    return table


def _version() -> str:
    from unimodality import __version__

    return __version__
