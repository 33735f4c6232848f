"""Compare runs: their best and last metrics and the config keys in which they differ, in one table.

``unimodality compare runs/clip_lr`` finds every run directory below the paths it is given (a folder with
the ``metrics.csv`` of Lightning's CSV logger), reads its metrics and its ``config.yaml``, and prints and
writes one row per run: the config keys whose values differ between the runs, then for every chosen metric
its best value over the epochs (lowest for a loss, highest otherwise), the epoch of that best value for the
first metric, and its last value.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from unimodality.errors import DataError

#: the metrics a comparison shows by default, where the runs logged them (patterns as in fnmatch)
DEFAULT_METRICS = ("val/pert/mrr", "val/pert/recall@1", "val/pert/recall@10", "val/loss", "eval/*")
#: config keys that differ between any two runs by construction, not by choice
IGNORED_KEYS = ("trainer.logger.init_args.version", "trainer.logger.init_args.name",
                "trainer.logger.init_args.save_dir", "trainer.default_root_dir", "ckpt_path")


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories at or below ``paths`` (each holding a ``metrics.csv``), in name order."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such run directory or folder of runs")
        found = [path] if (path / "metrics.csv").is_file() else sorted(p.parent for p in path.rglob("metrics.csv"))
        if not found:
            raise DataError(f"{path}: holds no run (no metrics.csv below it: runs logged with CSVLogger have one)")
        runs += [run for run in found if run not in runs]
    return runs


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.init_args.embed_dim": 128, ...}``: nested mappings as dotted keys, lists as JSON text."""
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    value = json.dumps(config) if isinstance(config, list) else config
    return {prefix[:-1]: value}


def higher_is_better(metric: str) -> bool:
    return "loss" not in metric.rsplit("/", 1)[-1]


def read_run(run: Path, patterns: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame]:
    """A run's flattened config, its metric summary, and its per-epoch table of the chosen metrics."""
    config_path = run / "config.yaml"
    config = flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    try:
        metrics = pd.read_csv(run / "metrics.csv")
    except (OSError, ValueError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{run / 'metrics.csv'}: not a readable metrics table ({error})") from None
    chosen = [c for c in metrics.columns if any(fnmatch.fnmatchcase(c, p) for p in patterns)]
    chosen.sort(key=lambda c: next(i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(c, p)))
    by_epoch = (metrics[["epoch", *chosen]].dropna(subset=chosen, how="all").groupby("epoch").last()
                if "epoch" in metrics and chosen else pd.DataFrame())
    summary: dict[str, Any] = {"epochs": int(metrics["epoch"].max()) + 1 if "epoch" in metrics and len(metrics) else 0}
    for i, metric in enumerate(chosen):
        values = by_epoch[metric].dropna()
        if values.empty:
            continue
        best_epoch = values.idxmax() if higher_is_better(metric) else values.idxmin()
        summary[f"best {metric}"] = float(values[best_epoch])
        if i == 0:
            summary[f"best epoch ({metric})"] = int(best_epoch)
        summary[f"last {metric}"] = float(values.iloc[-1])
    return config, summary, by_epoch


def compare(paths: list[str | Path], metrics: tuple[str, ...] = DEFAULT_METRICS) -> pd.DataFrame:
    """One row per run below ``paths``: the differing config keys, then best/last of every chosen metric,
    sorted by the best value of the first metric present."""
    runs = find_runs(paths)
    rows = []
    configs = []
    for run in runs:
        config, summary, _ = read_run(run, tuple(metrics))
        status = _status(run)
        rows.append({"run": str(run), **({"status": status} if status else {}), **summary})
        configs.append(config)
    keys = sorted({k for c in configs for k in c} - set(IGNORED_KEYS))
    differing = [k for k in keys if len({_hashable(c.get(k)) for c in configs}) > 1]
    table = pd.DataFrame([{"run": r["run"], **{k: c.get(k) for k in differing}, **r} for r, c in zip(rows, configs)])
    first = next((c for c in table.columns if c.startswith("best ") and not c.startswith("best epoch")), None)
    if first is not None:
        table = table.sort_values(first, ascending=not higher_is_better(first[5:]), na_position="last")
    return table.reset_index(drop=True)


def _status(run: Path) -> str | None:
    from unimodality.sweep import read_record

    return read_record(run).get("status")


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str)


def format_table(table: pd.DataFrame) -> str:
    """The table as printed: config keys shortened to their last part, numbers to 4 significant digits."""
    shown = table.rename(columns={c: c.rsplit(".", 1)[-1] for c in table.columns if "." in c and "/" not in c})
    return shown.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-", max_colwidth=60)


def plot(paths: list[str | Path], metric: str, output: Path) -> Path:
    """``metric`` against the epoch, one line per run, as a PNG."""
    from unimodality import plots

    if not plots.have_matplotlib():
        raise DataError("--plot needs matplotlib: pip install 'unimodality[plots]'")
    plt = plots._pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for run in find_runs(paths):
        _, _, by_epoch = read_run(run, (metric,))
        if metric in by_epoch:
            values = by_epoch[metric].dropna()
            axes.plot(values.index, values.values, marker="o", markersize=3, label=run.name)
            drawn += 1
    if not drawn:
        plt.close(figure)
        raise DataError(f"metric {metric!r} is in none of the runs' metrics.csv")
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    if drawn <= 20:
        axes.legend(fontsize=7)
    plots._save(figure, output)
    return output


def main(args: list[str]) -> None:
    """``unimodality compare``."""
    import argparse

    from unimodality.files import atomic_write

    parser = argparse.ArgumentParser(
        prog="unimodality compare",
        description="Tabulate the best and last metrics of runs, with the config keys in which they differ.",
    )
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding runs (e.g. a sweep's)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                        help="metrics to show (patterns, e.g. 'val/pert/*'); the first one sorts the table")
    parser.add_argument("--output", help="the CSV to write (default: comparison.csv in the runs' common folder)")
    parser.add_argument("--plot", metavar="METRIC", help="also draw METRIC against the epoch for every run (PNG)")
    options = parser.parse_args(args)
    table = compare(options.runs, tuple(options.metrics))
    runs = [str(r) for r in table["run"]]
    common = Path(os.path.commonpath(runs))
    if str(common) in runs:  # a single run (or runs inside another): beside it, not inside it
        common = common.parent
    output = Path(options.output) if options.output else common / "comparison.csv"
    atomic_write(output, lambda tmp: table.to_csv(tmp, index=False))
    print(format_table(table))
    print(f"\nComparison of {len(table)} runs written to {output}", flush=True)
    if options.plot:
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in options.plot)
        picture = plot(options.runs, options.plot, output.with_name(f"{output.stem}_{name}.png"))
        print(f"Plot of {options.plot} written to {picture}", flush=True)
