"""Sweeps: one config, a grid or a list of overrides, one run directory per point.

A sweep is a YAML file::

    name: clip_lr                      # runs/<name>/<point>/ for every point
    config: configs/clip.yaml          # or a list of --config files, composed in order
    args: [--trainer.max_epochs, "20"] # options every point gets (optional)
    grid:                              # every combination, in this order ...
      model.init_args.optimizer.init_args.lr: [0.0003, 0.001]
      model.init_args.embed_dim: [64, 128]
    # points: [{model.init_args.embed_dim: 64}, ...]   # ... or a list of points

``unimodality sweep FILE`` trains the points one after the other, each in its own process and run
directory, skips the points already completed and prints the comparison table; ``--index I`` trains one
point in this process (what each task of the Slurm job array ``slurm/sweep.sh`` does). A point's run
directory has a fixed name, so a point that is stopped or preempted resumes from its newest checkpoint when
it is started again, exactly as ``fit`` does in a run directory with checkpoints.

An optional ``search:`` section replaces the grid by an Optuna study (the ``sweeps`` extra), pruning
trials on a logged metric; see [`search`][unimodality.sweep.search].
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback

from unimodality.errors import DataError

#: the keys a sweep file may have
KEYS = ("name", "config", "save_dir", "args", "grid", "points", "search")
#: the keys of a sweep file's search section
SEARCH_KEYS = ("n_trials", "metric", "direction", "pruner", "seed", "params", "storage")
#: the file each point's run directory holds once the sweep ran it: its overrides and how it ended
RECORD = "sweep.json"


@dataclass
class Point:
    """One run of a sweep: its position, its run directory's name and the options it sets."""

    index: int
    name: str
    overrides: dict[str, Any]


@dataclass
class Sweep:
    """A parsed sweep file (see the module's documentation)."""

    path: Path
    name: str
    configs: list[str]
    save_dir: str = "runs"
    args: list[str] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    search: dict[str, Any] | None = None

    @property
    def directory(self) -> Path:
        """Where the points' run directories are: ``<save_dir>/<name>``."""
        return Path(self.save_dir) / self.name

    def run_directory(self, point: Point) -> Path:
        return self.directory / point.name


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; a mistake is one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sweep file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: a sweep file is a mapping with the keys {', '.join(KEYS)}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise DataError(f"{path}: unknown key {unknown[0]!r}; a sweep file has the keys {', '.join(KEYS)}")
    name = spec.get("name") or path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise DataError(f"{path}: 'name' must be a plain directory name (letters, digits, . _ -), got {name!r}")
    configs = spec.get("config")
    configs = [configs] if isinstance(configs, str) else configs
    if not configs or not all(isinstance(c, str) for c in configs):
        raise DataError(f"{path}: 'config' must name a config file (or a list of them)")
    # relative to the working directory, like `fit --config`; a file next to the sweep file is found too
    configs = [c if Path(c).is_file() or not (path.parent / c).is_file() else str(path.parent / c) for c in configs]
    for config in configs:
        if not Path(config).is_file():
            raise DataError(f"{path}: config file {config!r} not found")
    args = spec.get("args") or []
    if not isinstance(args, list):
        raise DataError(f"{path}: 'args' must be a list of command-line options, e.g. [--trainer.max_epochs, '5']")
    sweep = Sweep(path, name, configs, str(spec.get("save_dir") or "runs"), [str(a) for a in args])
    has = [key for key in ("grid", "points", "search") if spec.get(key) is not None]
    if len(has) != 1:
        raise DataError(f"{path}: give exactly one of 'grid', 'points' or 'search' (found {', '.join(has) or 'none'})")
    if "search" in has:
        if not isinstance(spec["search"], dict):
            raise DataError(f"{path}: 'search' must be a mapping (n_trials, metric, direction, params)")
        sweep.search = spec["search"]
        return sweep
    overrides = _grid(path, spec["grid"]) if "grid" in has else _points(path, spec["points"])
    sweep.points = [Point(i, point_name(i, o), o) for i, o in enumerate(overrides)]
    return sweep


def _grid(path: Path, grid: Any) -> list[dict[str, Any]]:
    if not isinstance(grid, dict) or not grid:
        raise DataError(f"{path}: 'grid' must map options to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise DataError(f"{path}: grid option {key!r} needs a non-empty list of values, got {values!r}")
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _points(path: Path, points: Any) -> list[dict[str, Any]]:
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise DataError(f"{path}: 'points' must be a non-empty list of mappings from options to values")
    return [dict(p) for p in points]


def point_name(index: int, overrides: dict[str, Any]) -> str:
    """A stable, readable run directory name: ``003-lr=0.001-embed_dim=64``.

    Each option is shortened to its last part (two parts where two options would share it); the index keeps
    names unique and in order.
    """
    words = [[w for w in key.split(".") if w != "init_args"] for key in overrides]
    last = [w[-1] for w in words]
    parts = []
    for key, short, w in zip(overrides, last, words):
        if last.count(short) > 1:
            short = ".".join(w[-2:])
        parts.append(f"{short}={_text(overrides[key])}")
    name = "-".join([f"{index:03d}", *parts])
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name)
    return name[:120]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def fit_arguments(sweep: Sweep, name: str, overrides: dict[str, Any], extra: list[str] = ()) -> list[str]:
    """The ``unimodality fit`` arguments of one point: the configs, the sweep's options, the point's
    overrides, then ``extra`` (e.g. Slurm's node and device counts), and its run directory."""
    args = ["fit"]
    for config in sweep.configs:
        args += ["--config", config]
    args += sweep.args
    args += [f"--{key}={_text(value)}" for key, value in overrides.items()]
    args += list(extra)
    args += [
        "--trainer.logger.init_args.save_dir", sweep.save_dir,
        "--trainer.logger.init_args.name", sweep.name,
        "--trainer.logger.init_args.version", name,
    ]
    return args


def record(run_dir: Path, **fields: Any) -> None:
    """Write (or update) the run directory's ``sweep.json``."""
    from unimodality.files import atomic_write

    path = run_dir / RECORD
    content = {**read_record(run_dir), **fields}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=1, default=str) + "\n"))


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_point(sweep: Sweep, point: Point, extra: list[str] = (), callbacks: list[Any] | None = None) -> Path:
    """Train one point in this process; its ``sweep.json`` says ``completed`` or ``failed``."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from unimodality import cli
    from unimodality.resume import Requeued

    run_dir = sweep.run_directory(point)
    first = rank_zero_only.rank == 0
    base = {"sweep": sweep.name, "index": point.index, "overrides": point.overrides}
    try:
        with warnings.catch_warnings():
            # LightningCLI warns when given arguments while sys.argv has others: here they are meant
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
            cli.main(fit_arguments(sweep, point.name, point.overrides, extra), callbacks=callbacks)
    except BaseException as error:
        if first and run_dir.is_dir():
            # SIGTERM (exit 143), Ctrl-C and a Slurm requeue stop a point, to be resumed; anything else failed it
            stopped = isinstance(error, KeyboardInterrupt | Requeued) or (
                isinstance(error, SystemExit) and error.code == cli.SIGTERM_STATUS)
            status = "stopped" if stopped else "failed"
            record(run_dir, **base, status=status)
        raise
    if first:
        record(run_dir, **base, status="completed")
    return run_dir


def run_all(sweep: Sweep, indices: list[int] | None = None, rerun: bool = False, extra: list[str] = ()) -> int:
    """Train the points one after the other, each in a fresh process; the number that failed."""
    failed = []
    for point in sweep.points if indices is None else [sweep.points[i] for i in indices]:
        run_dir = sweep.run_directory(point)
        if not rerun and read_record(run_dir).get("status") == "completed":
            print(f"[{point.index + 1}/{len(sweep.points)}] {run_dir}: completed before, skipped", flush=True)
            continue
        print(f"[{point.index + 1}/{len(sweep.points)}] {run_dir}", flush=True)
        command = [sys.executable, "-m", "unimodality", "sweep", str(sweep.path), "--index", str(point.index)]
        if extra:
            command += ["--", *extra]
        if subprocess.run(command).returncode != 0:
            failed.append(point)
            print(f"[{point.index + 1}/{len(sweep.points)}] {run_dir}: failed (see above)", flush=True)
    return len(failed)


def search(sweep: Sweep, n_trials: int | None = None, extra: list[str] = ()) -> Any:
    """Run an Optuna study over the ``search`` section and return it.

    ```yaml
    search:
      n_trials: 20                # trials this call runs (each array task of slurm/sweep.sh runs its own)
      metric: val/pert/mrr        # the value of a trial: its best epoch's value of this logged metric
      direction: maximize
      pruner: median              # or none: stop trials whose metric trails the others' at the same epoch
      seed: 0                     # of the sampler (TPE)
      # storage: postgresql://...  # default: sqlite in the sweep's folder (fine for a few parallel tasks)
      params:
        model.init_args.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
        model.init_args.embed_dim: {choices: [64, 128, 256]}
        model.init_args.encoders.tx.init_args.dropout: {low: 0.0, high: 0.3}
        trainer.accumulate_grad_batches: {low: 1, high: 4, type: int}
    ```

    The study is kept in ``<save_dir>/<name>/optuna.db`` (SQLite), so calls made later, or by several array
    tasks, continue it; trial ``n`` trains in ``<save_dir>/<name>/trial-<n>``.
    """
    try:
        import optuna
    except ImportError:
        raise DataError("a sweep with 'search' needs Optuna: pip install 'unimodality[sweeps]'") from None
    spec = sweep.search or {}
    unknown = sorted(set(spec) - set(SEARCH_KEYS))
    if unknown:
        raise DataError(f"{sweep.path}: unknown key 'search.{unknown[0]}'; search has {', '.join(SEARCH_KEYS)}")
    metric = spec.get("metric", "val/pert/mrr")
    direction = spec.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise DataError(f"{sweep.path}: search.direction must be maximize or minimize, got {direction!r}")
    params = spec.get("params")
    if not isinstance(params, dict) or not params:
        raise DataError(f"{sweep.path}: search.params must map options to ranges, e.g. {{low: 1.0e-4, high: 0.01}}")
    for key, space in params.items():
        _check_space(sweep.path, key, space)
    pruner = {"median": optuna.pruners.MedianPruner(n_warmup_steps=1), "none": optuna.pruners.NopPruner()}.get(
        str(spec.get("pruner", "median")))
    if pruner is None:
        raise DataError(f"{sweep.path}: search.pruner must be median or none, got {spec.get('pruner')!r}")
    sweep.directory.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=sweep.name, storage=spec.get("storage") or f"sqlite:///{(sweep.directory / 'optuna.db').resolve()}",
        load_if_exists=True, direction=direction, pruner=pruner,
        sampler=optuna.samplers.TPESampler(seed=spec.get("seed")),
    )

    def objective(trial: Any) -> float:
        overrides = {key: _suggest(trial, key, space) for key, space in params.items()}
        point = Point(trial.number, f"trial-{trial.number}", overrides)
        pruning = PruneOnMetric(trial, metric, direction)
        run_point(sweep, point, extra, callbacks=[pruning])
        if pruning.best is None:
            raise DataError(f"trial {trial.number}: metric {metric!r} was never logged; search.metric must be a "
                            "validation metric of the setup (see metrics.csv of a run)")
        if pruning.pruned:
            record(sweep.run_directory(point), status="pruned")
            raise optuna.TrialPruned(f"{metric} = {pruning.last:.4g} at epoch {pruning.epoch}")
        record(sweep.run_directory(point), value=pruning.best, metric=metric)
        return pruning.best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=n_trials or int(spec.get("n_trials", 10)))
    return study


def _check_space(path: Path, key: str, space: Any) -> None:
    ok = isinstance(space, dict) and (
        isinstance(space.get("choices"), list) and space["choices"]
        or {"low", "high"} <= set(space) and space.get("type", "float") in ("float", "int")
    )
    if not ok:
        raise DataError(f"{path}: search.params.{key} must be {{low: ..., high: ...}} (optionally log: true, type: "
                        f"int) or {{choices: [...]}}, got {space!r}")


def _suggest(trial: Any, key: str, space: dict[str, Any]) -> Any:
    if "choices" in space:
        return trial.suggest_categorical(key, space["choices"])
    if space.get("type") == "int":
        return trial.suggest_int(key, int(space["low"]), int(space["high"]), log=bool(space.get("log", False)))
    return trial.suggest_float(key, float(space["low"]), float(space["high"]), log=bool(space.get("log", False)))


class PruneOnMetric(Callback):
    """Report a metric to an Optuna trial after every validation and stop the fit when the pruner says so.

    Args:
        trial: the Optuna trial.
        metric: the logged metric, e.g. ``val/pert/mrr``.
        direction: ``maximize`` or ``minimize``: which value is the best.
    """

    def __init__(self, trial: Any, metric: str, direction: str = "maximize") -> None:
        self.trial, self.metric, self.direction = trial, metric, direction
        self.best: float | None = None
        self.last: float | None = None
        self.epoch = -1
        self.pruned = False

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        self.last = float(trainer.callback_metrics[self.metric])
        self.epoch = trainer.current_epoch
        better = max if self.direction == "maximize" else min
        self.best = self.last if self.best is None else better(self.best, self.last)
        self.trial.report(self.last, step=self.epoch)
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


USAGE = """\
usage: unimodality sweep SWEEP.yaml [--list] [--index I [I ...]] [--rerun] [--trials N] [-- FIT OPTIONS ...]

Train every point of a sweep (a config and a grid or list of overrides), one run directory per point, then
print their comparison. On Slurm, one array task per point: sbatch --array=0-<points - 1> slurm/sweep.sh SWEEP.yaml
"""


def main(args: list[str]) -> None:
    """``unimodality sweep``."""
    import argparse

    extra: list[str] = []
    if "--" in args:
        args, extra = args[: args.index("--")], args[args.index("--") + 1 :]
    parser = argparse.ArgumentParser(prog="unimodality sweep", usage=USAGE.split("\n\n")[0][7:],
                                     description=USAGE.split("\n\n", 1)[1])
    parser.add_argument("sweep", help="the sweep file")
    parser.add_argument("--list", action="store_true", help="print the points and their run directories, train none")
    parser.add_argument("--index", type=int, nargs="+", help="train only these points (0-based); one index trains "
                        "in this process (what a Slurm array task does)")
    parser.add_argument("--rerun", action="store_true", help="train completed points again")
    parser.add_argument("--trials", type=int, help="with a search: the number of trials this call runs")
    parser.add_argument("--task", type=int, help="the Slurm array task (slurm/sweep.sh): train point TASK of a grid "
                        "in this process, or run --trials trials (default 1) of a search")
    options = parser.parse_args(args)
    sweep = load_sweep(options.sweep)
    if sweep.search is not None:
        if options.list or options.index:
            raise DataError(f"{sweep.path}: a search has no fixed points; --list and --index need a grid or points")
        if options.task is not None and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise DataError(f"{sweep.path}: a search runs one process per trial; submit slurm/sweep.sh with "
                            "--ntasks-per-node=1 --nodes=1 (each array task then runs its own trials)")
        study = search(sweep, options.trials or (1 if options.task is not None else None), extra)
        if options.task is not None:
            return
        _print_comparison(sweep)
        done = [t for t in study.trials if t.value is not None]
        if done:
            best = study.best_trial
            print(f"\nBest trial: {sweep.directory / f'trial-{best.number}'} ({best.value:.4g}): {best.params}")
        return
    if options.list:
        for point in sweep.points:
            status = read_record(sweep.run_directory(point)).get("status", "not run")
            print(f"{point.index:4d}  {sweep.run_directory(point)}  [{status}]")
        print(f"\n{len(sweep.points)} points; on Slurm: sbatch --array=0-{len(sweep.points) - 1} slurm/sweep.sh "
              f"{sweep.path}")
        return
    if options.task is not None:
        options.index = [options.task]
    for index in options.index or []:
        if not 0 <= index < len(sweep.points):
            raise DataError(f"{sweep.path}: --index {index} is out of range: the sweep has {len(sweep.points)} points "
                            f"(0 to {len(sweep.points) - 1})")
    if options.index and len(options.index) == 1:
        run_point(sweep, sweep.points[options.index[0]], extra)
        return
    failed = run_all(sweep, options.index, options.rerun, extra)
    _print_comparison(sweep)
    if failed:
        raise SystemExit(f"unimodality sweep: {failed} of {len(options.index or sweep.points)} points failed")


def _print_comparison(sweep: Sweep) -> None:
    from unimodality import compare

    if not sweep.directory.is_dir():
        return
    table = compare.compare([sweep.directory])
    if len(table):
        print()
        print(compare.format_table(table))
