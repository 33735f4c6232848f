"""PNG plots of a report: each metric beside its baselines and chance, and the distribution of per-item
scores (e.g. per-perturbation mAP) per representation. A plot never fails the report."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unimodality.evaluation.data import EMBEDDING
from unimodality.evaluation.evaluator import Evaluator
from unimodality.files import atomic_write

log = logging.getLogger(__name__)


def safe_name(text: str) -> str:
    """``text`` as a file name: letters, digits and ``_.+-`` only."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")[:100] or "x"


def plot_report(table: pd.DataFrame, details: Mapping[tuple[str, str], pd.DataFrame], folder: Path,
                evaluators: list[Evaluator]) -> list[Path]:
    """PNGs: per evaluator and dataset, each metric's value beside its baselines (and chance); and where an
    evaluator has per-item scores (mAP per perturbation), their distribution per representation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots (pip install \"unimodality[plots]\")")
        return []
    written = []
    colours = {"value": "#1f77b4", "raw": "#7f7f7f", "pca": "#ff7f0e", "random": "#bcbd22"}
    for (evaluator, dataset), rows in table.groupby(["evaluator", "dataset"], sort=False):
        try:
            names = [f"{m}\n{t}" if t else m for m, t in zip(rows["metric"], rows["target"])]
            series = [c for c in colours if rows[c].notna().any()]
            fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) * max(1, len(series)) / 2 + 2), 3.6))
            width = 0.8 / max(1, len(series))
            positions = np.arange(len(rows))
            for i, column in enumerate(series):
                label = EMBEDDING if column == "value" else column
                ax.bar(positions + (i - (len(series) - 1) / 2) * width, rows[column].to_numpy(float), width,
                       label=label, color=colours[column])
            if rows["chance"].notna().any():
                ax.scatter(positions, rows["chance"].to_numpy(float), marker="_", s=400, color="black", zorder=3,
                           label="chance")
            crowded = len(rows) > 4
            ax.set_xticks(positions, names, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                          fontsize=8)
            ax.set_title(f"{evaluator} - {dataset}", fontsize=9)
            ax.legend(fontsize=7, frameon=False)
            fig.tight_layout()
            path = folder / f"{safe_name(evaluator)}__{safe_name(dataset)}.png"
            written.append(save_png(fig, path))
        except Exception as error:  # a plot is a convenience: it never fails the report
            log.warning("plot of %s on %s failed: %s", evaluator, dataset, error)
    distributions = {e.report_name: e.distribution for e in evaluators if e.distribution}
    for (evaluator, dataset), frame in details.items():
        column = distributions.get(evaluator)
        if column is None or column not in frame.columns:
            continue
        try:
            fig, ax = plt.subplots(figsize=(4.8, 3.4))
            for rep, values in frame.groupby("representation", sort=False)[column]:
                values = np.sort(values.dropna().to_numpy(float))
                if len(values):
                    ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=rep,
                            color=colours.get("value" if rep == EMBEDDING else rep))
            ax.set_xlabel(column)
            ax.set_ylabel("fraction of items")
            ax.set_title(f"{evaluator} - {dataset}", fontsize=9)
            ax.legend(fontsize=7, frameon=False)
            fig.tight_layout()
            path = folder / f"{safe_name(evaluator)}__{safe_name(dataset)}_distribution.png"
            written.append(save_png(fig, path))
        except Exception as error:
            log.warning("distribution plot of %s on %s failed: %s", evaluator, dataset, error)
    return written


def save_png(fig: Any, path: Path) -> Path:
    """A figure written atomically as PNG, then closed."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")
    finally:
        plt.close(fig)
