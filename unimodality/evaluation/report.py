"""The report: one tidy table (``evaluator, dataset, metric, target, value, raw, pca, random, chance, n``),
written atomically as CSV + JSON with per-item details and plots, and printed as a short text table."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from unimodality.errors import DataError
from unimodality.evaluation.baselines import BASELINES
from unimodality.evaluation.data import EMBEDDING
from unimodality.evaluation.evaluator import Evaluator
from unimodality.evaluation.plots import plot_report, safe_name
from unimodality.files import atomic_write

TABLE_COLUMNS = ["evaluator", "dataset", "metric", "target", "value", *BASELINES, "chance", "n"]


def report_table(scored: list[dict[str, Any]], embedding_is_raw: Mapping[str, bool] | None = None) -> pd.DataFrame:
    """The scores of every representation as one row per (evaluator, dataset, metric, target): the embedding's
    value, each baseline's beside it, and the embedding's ``chance`` and ``n``."""
    if not scored:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    long = pd.DataFrame(scored)
    keys = ["evaluator", "dataset", "metric", "target"]
    order = long[keys].drop_duplicates()
    wide = long.pivot_table(index=keys, columns="representation", values="value", aggfunc="first", dropna=False)
    wide = wide.reindex(pd.MultiIndex.from_frame(order)).reset_index()
    ours = long[long["representation"] == EMBEDDING].set_index(keys)[["chance", "n"]]
    wide = wide.join(ours, on=keys)
    wide = wide.rename(columns={EMBEDDING: "value"})
    for column in TABLE_COLUMNS:
        if column not in wide.columns:
            wide[column] = math.nan
    for dataset, is_raw in (embedding_is_raw or {}).items():
        if is_raw:  # the embedding is the raw features: its own values are the raw baseline's
            rows = wide["dataset"] == dataset
            wide.loc[rows, "raw"] = wide.loc[rows, "value"]
    wide = wide[TABLE_COLUMNS]
    wide.columns.name = None
    return wide


def output_files(output: str | Path, overwrite: bool) -> dict[str, Path]:
    folder = Path(output)
    files = {"csv": folder / "evaluation.csv", "json": folder / "evaluation.json", "folder": folder}
    existing = [str(p) for key, p in files.items() if key != "folder" and p.exists()]
    if existing and not overwrite:
        raise DataError(f"output {folder}: a report is there already ({', '.join(existing)}); pass --overwrite true "
                        "to replace it, or choose another --output")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"output {folder}: is a file, not a folder")
    return files


def write_report(table: pd.DataFrame, details: Mapping[tuple[str, str], pd.DataFrame], record: dict[str, Any],
                 files: Mapping[str, Path], plots: bool = True,
                 evaluators: list[Evaluator] | None = None) -> list[Path]:
    """Write the table (CSV, and JSON with the run's record), the details and the plots; each file atomically."""
    folder = files["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (evaluator, dataset), frame in details.items():
        path = folder / "details" / f"{safe_name(evaluator)}__{safe_name(dataset)}.csv"
        written.append(atomic_write(path, lambda tmp, f=frame: f.to_csv(tmp, index=False)))
    if plots:
        written += plot_report(table, details, folder / "plots", evaluators or [])
    document = {**record, "table": json.loads(table.to_json(orient="records"))}
    written.append(atomic_write(files["csv"], lambda tmp: table.to_csv(tmp, index=False)))
    written.append(atomic_write(files["json"], lambda tmp: tmp.write_text(json.dumps(document, indent=2,
                                                                                      default=str) + "\n")))
    return written


def format_table(table: pd.DataFrame, digits: int = 3) -> str:
    """The report as a short text table (what ``unimodality evaluate`` prints)."""
    if table.empty:
        return "(no scores)"
    shown = table.copy()
    shown["n"] = shown["n"].map(lambda v: "" if pd.isna(v) else f"{int(v)}")
    for column in ["value", *BASELINES, "chance"]:
        if shown[column].isna().all():
            shown = shown.drop(columns=column)
        else:
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.{digits}f}")
    if shown["dataset"].nunique() == 1:
        shown = shown.drop(columns="dataset")
    return shown.to_string(index=False)
