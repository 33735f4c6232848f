"""Sweeps (unimodality sweep, slurm/sweep.sh, Optuna search) and run comparison (unimodality compare)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_slurm import CPU_JOB, NO_CLUSTER, QUIET, ROOT, sbatch
from unimodality import compare, sweep
from unimodality.cli import main
from unimodality.errors import DataError

CLIP = ROOT / "configs" / "clip.yaml"
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
# a point in seconds: 1 epoch of a few batches, validation on the whole (small) validation split
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", *QUIET]


def write_sweep(folder: Path, **spec) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "grid", "config": str(CLIP), "save_dir": str(folder / "runs"), **spec},
                                   sort_keys=False))
    return path


GRID = {"model.init_args.optimizer.init_args.lr": [0.0003, 0.001], "model.init_args.embed_dim": [32, 64]}


def test_points_of_a_grid_in_order_with_stable_names(tmp_path):
    loaded = sweep.load_sweep(write_sweep(tmp_path, grid=GRID))
    assert [p.overrides for p in loaded.points] == [
        {"model.init_args.optimizer.init_args.lr": lr, "model.init_args.embed_dim": d}
        for lr in (0.0003, 0.001) for d in (32, 64)
    ]
    assert [p.name for p in loaded.points] == [
        "000-lr=0.0003-embed_dim=32", "001-lr=0.0003-embed_dim=64", "002-lr=0.001-embed_dim=32",
        "003-lr=0.001-embed_dim=64",
    ]
    assert sweep.load_sweep(write_sweep(tmp_path, grid=GRID)).points == loaded.points  # the same every time
    args = sweep.fit_arguments(loaded, loaded.points[3].name, loaded.points[3].overrides, ["--trainer.devices", "2"])
    assert args[:3] == ["fit", "--config", str(CLIP)]
    assert "--model.init_args.optimizer.init_args.lr=0.001" in args and "--model.init_args.embed_dim=64" in args
    assert args[-6:] == ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                         "--trainer.logger.init_args.name", "grid",
                         "--trainer.logger.init_args.version", "003-lr=0.001-embed_dim=64"]
    assert args.index("--trainer.devices") > args.index("--model.init_args.embed_dim=64")  # extra options win


def test_options_sharing_a_last_part_keep_two_parts_in_the_name():
    name = sweep.point_name(0, {"model.init_args.encoders.tx.init_args.dropout": 0.1,
                                "model.init_args.encoders.ph.init_args.dropout": [0.2, "a b"]})
    assert name == '000-tx.dropout=0.1-ph.dropout=_0.2_a_b_'


@pytest.mark.parametrize(("spec", "message"), [
    ({"grid": GRID, "colour": 1}, "unknown key 'colour'"),
    ({"grid": {"trainer.max_epochs": 3}}, "grid option 'trainer.max_epochs' needs a non-empty list"),
    ({"grid": GRID, "points": [{}]}, "exactly one of 'grid', 'points' or 'search' (found grid, points)"),
    ({}, "exactly one of 'grid', 'points' or 'search' (found none)"),
    ({"grid": GRID, "config": "nowhere.yaml"}, "config file 'nowhere.yaml' not found"),
    ({"grid": GRID, "name": "a/b"}, "'name' must be a plain directory name"),
    ({"points": "x"}, "'points' must be a non-empty list of mappings"),
])
def test_a_bad_sweep_file_is_one_line_naming_the_key(tmp_path, spec, message):
    path = write_sweep(tmp_path, **spec)
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.")) as error:
        sweep.load_sweep(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_out_of_range_index_names_the_number_of_points(tmp_path, capsys):
    path = write_sweep(tmp_path, grid=GRID)
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--index", "4"])
    assert "--index 4 is out of range: the sweep has 4 points (0 to 3)" in capsys.readouterr().err


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_load_and_their_points_parse(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    loaded = sweep.load_sweep(path)
    if loaded.search is not None:
        params = loaded.search["params"]
        for key, space in params.items():
            sweep._check_space(path, key, space)
        points = [{key: space["choices"][0] if "choices" in space else space["low"] for key, space in params.items()}]
    else:
        points = [p.overrides for p in loaded.points]
    for overrides in points:
        with pytest.raises(SystemExit) as exit_info:
            main([*sweep.fit_arguments(loaded, "x", overrides), "--print_config"])
        assert exit_info.value.code == 0
        resolved = yaml.safe_load(capsys.readouterr().out)
        for key, value in overrides.items():
            node = resolved
            for part in key.split("."):
                node = node[part]
            assert node == value


def test_a_two_by_two_grid_trains_locally_then_compare_tabulates_it(tmp_path, capsys):
    """`unimodality sweep FILE`: four points, each in its own process and run directory; a second call skips
    them; the comparison has one row per point with the two swept options as columns."""
    path = write_sweep(tmp_path, grid=GRID, args=TINY)
    main(["sweep", str(path)])  # each point in a fresh `python -m unimodality sweep FILE --index I`
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "grid"
    points = sweep.load_sweep(path).points
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [p.name for p in points]
    for point in points:
        record = json.loads((folder / point.name / "sweep.json").read_text())
        assert record == {"sweep": "grid", "index": point.index, "status": "completed", "overrides": point.overrides}
        assert (folder / point.name / "checkpoints" / "last.ckpt").is_file()
        config = yaml.safe_load((folder / point.name / "config.yaml").read_text())["model"]["init_args"]
        assert config["embed_dim"] == point.overrides["model.init_args.embed_dim"]
        assert config["optimizer"]["init_args"]["lr"] == point.overrides["model.init_args.optimizer.init_args.lr"]
    assert "best val/pert/mrr" in out  # the comparison, printed at the end

    main(["sweep", str(path)])
    assert capsys.readouterr().out.count("completed before, skipped") == 4

    main(["compare", str(folder), "--plot", "val/pert/mrr"])
    out = capsys.readouterr().out
    table = pd.read_csv(folder / "comparison.csv")
    assert len(table) == 4 and set(table["status"]) == {"completed"}
    assert {"model.init_args.optimizer.init_args.lr", "model.init_args.embed_dim"} <= set(table.columns)
    # only options that differ: the config's learning-rate schedule, the same in every run, is not a column
    assert not [c for c in table.columns if c.startswith("model.") and "lr_scheduler" in c]
    mrr = table["best val/pert/mrr"]
    assert list(mrr) == sorted(mrr, reverse=True)  # sorted by the first metric
    for _, row in table.iterrows():
        logged = pd.read_csv(Path(row["run"]) / "metrics.csv")["val/pert/mrr"].dropna()
        assert row["best val/pert/mrr"] == pytest.approx(logged.max())
        assert row["last val/pert/mrr"] == pytest.approx(logged.iloc[-1])
    assert (folder / "comparison_val_pert_mrr.png").stat().st_size > 1000
    assert "Comparison of 4 runs written to" in out


def test_a_stopped_point_resumes_from_its_newest_checkpoint(tmp_path, capsys):
    path = write_sweep(tmp_path, points=[{"model.init_args.embed_dim": 32}],
                       args=["--trainer.limit_train_batches", "2", *QUIET])
    main(["sweep", str(path), "--index", "0", "--", "--trainer.max_epochs", "1"])
    run_dir = tmp_path / "runs" / "grid" / "000-embed_dim=32"
    sweep.record(run_dir, status="stopped")  # as a SIGTERM or a requeue would leave it
    capsys.readouterr()
    main(["sweep", str(path), "--index", "0", "--", "--trainer.max_epochs", "2"])
    assert f"Resuming run {run_dir} from its newest checkpoint" in capsys.readouterr().out
    assert list(pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val/loss"])["epoch"]) == [0, 1]
    assert sweep.read_record(run_dir)["status"] == "completed"


def test_a_failed_point_is_recorded_and_the_others_still_train(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, points=[{"model.init_args.embed_dim": 0}, {"model.init_args.embed_dim": 16}],
                       args=TINY)
    loaded = sweep.load_sweep(path)
    with pytest.raises(SystemExit):  # in this process: the CLI's one-line error, and the point says "failed"
        sweep.run_point(loaded, loaded.points[0])
    assert "embed_dim" in capsys.readouterr().err
    record = sweep.read_record(loaded.run_directory(loaded.points[0]))
    assert record.get("status", "failed") == "failed"  # (a fit that fails before it starts leaves no directory)

    started = []

    def run(command, **kwargs):  # the points' processes: the first fails
        started.append(int(command[command.index("--index") + 1]))
        return subprocess.CompletedProcess(command, 1 if started[-1] == 0 else 0)

    monkeypatch.setattr(sweep.subprocess, "run", run)
    assert sweep.run_all(loaded) == 1 and started == [0, 1]  # the second point still trained
    with pytest.raises(SystemExit, match="1 of 2 points failed"):
        main(["sweep", str(path)])


class FakeTrial:
    """An Optuna trial that asks to prune once it has seen ``prune_at`` reports."""

    def __init__(self, prune_at: int) -> None:
        self.reports: list[tuple[int, float]] = []
        self.prune_at = prune_at

    def report(self, value: float, step: int) -> None:
        self.reports.append((step, value))

    def should_prune(self) -> bool:
        return len(self.reports) >= self.prune_at


def test_pruning_stops_the_fit_after_the_epoch_the_pruner_rejects(tmp_path):
    trial = FakeTrial(prune_at=2)
    callback = sweep.PruneOnMetric(trial, "val/pert/mrr")
    path = write_sweep(tmp_path, points=[{"trainer.max_epochs": 5}],
                       args=["--trainer.limit_train_batches", "2", *QUIET])
    loaded = sweep.load_sweep(path)
    run_dir = sweep.run_point(loaded, loaded.points[0], callbacks=[callback])
    logged = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val/pert/mrr"])
    assert list(logged["epoch"]) == [0, 1]  # stopped after the second validation, not at max_epochs 5
    assert [step for step, _ in trial.reports] == [0, 1]
    assert [v for _, v in trial.reports] == pytest.approx(list(logged["val/pert/mrr"]))
    assert callback.pruned and callback.best == pytest.approx(logged["val/pert/mrr"].max())
    assert "PruneOnMetric" not in (run_dir / "config.yaml").read_text()  # a Python object, not config


def test_optuna_search_runs_trials_in_their_own_directories_and_continues_the_study(tmp_path):
    optuna = pytest.importorskip("optuna", reason="the sweeps extra (optuna) is not installed")
    search = {"n_trials": 2, "metric": "val/pert/mrr", "direction": "maximize", "seed": 0, "pruner": "none",
              "params": {"model.init_args.optimizer.init_args.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                         "model.init_args.embed_dim": {"choices": [16, 32]}}}
    path = write_sweep(tmp_path, search=search, args=TINY)
    loaded = sweep.load_sweep(path)
    study = sweep.search(loaded)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in study.trials:
        run_dir = tmp_path / "runs" / "grid" / f"trial-{trial.number}"
        logged = pd.read_csv(run_dir / "metrics.csv")["val/pert/mrr"].dropna()
        assert trial.value == pytest.approx(logged.max())
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["init_args"]["embed_dim"] == trial.params["model.init_args.embed_dim"]
        assert sweep.read_record(run_dir)["status"] == "completed"
    again = sweep.search(loaded, n_trials=1)  # the study lives in optuna.db: a later call adds to it
    assert len(again.trials) == 3 and (tmp_path / "runs" / "grid" / "trial-2").is_dir()


def test_a_bad_search_section_names_the_key(tmp_path):
    pytest.importorskip("optuna", reason="the sweeps extra (optuna) is not installed")
    path = write_sweep(tmp_path, search={"params": {"trainer.max_epochs": {"low": 1}}})
    with pytest.raises(DataError, match=r"search\.params\.trainer\.max_epochs must be \{low: \.\.\., high: \.\.\.\}"):
        sweep.search(sweep.load_sweep(path))


def test_compare_reports_only_differing_keys_and_a_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such run directory"):
        compare.find_runs([tmp_path / "nowhere"])
    with pytest.raises(DataError, match="holds no run"):
        compare.find_runs([tmp_path])
    for name, lr, losses in (("a", 0.1, [3.0, 2.0, 2.5]), ("b", 0.2, [3.5, 3.0, 1.0])):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 3}, "model": {"lr": lr}}))
        rows = [{"epoch": e, "step": e, "val/loss": v, "val/pert/mrr": 1 / v} for e, v in enumerate(losses)]
        pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    table = compare.compare([tmp_path])
    assert list(table["run"]) == [str(tmp_path / "b"), str(tmp_path / "a")]  # best MRR first
    assert "model.lr" in table.columns and "trainer.max_epochs" not in table.columns
    b = table.iloc[0]
    assert (b["best val/pert/mrr"], b["best epoch (val/pert/mrr)"], b["last val/loss"], b["best val/loss"]) == (
        1.0, 2, 1.0, 1.0)
    a = table.iloc[1]
    assert (a["best val/loss"], a["last val/loss"], a["epochs"]) == (2.0, 2.5, 3)


@pytest.mark.slurm
@pytest.mark.skipif(NO_CLUSTER is not None, reason=str(NO_CLUSTER))
def test_sweep_script_trains_a_two_by_two_grid_as_a_job_array(tmp_path):
    """slurm/sweep.sh under --array=0-3: one task per point, each in its own run directory; compare has 4 rows."""
    path = write_sweep(tmp_path, grid=GRID, args=TINY)
    options = [o for o in CPU_JOB if not o.startswith("--ntasks")] + [
        "--ntasks-per-node=1", "--array=0-3", f"--output={tmp_path}/slurm-%A_%a.out"]
    job = sbatch("sweep.sh", [str(path), "--", "--trainer.accelerator", "cpu"], tmp_path, options)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30).stdout
        if not queued.strip():
            break
        time.sleep(1)
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(tmp_path.glob("slurm-*.out")))
    folder = tmp_path / "runs" / "grid"
    statuses = {p.name: sweep.read_record(p).get("status") for p in sweep.load_sweep(path).points
                for p in [folder / p.name]}
    assert set(statuses.values()) == {"completed"}, f"{statuses}\n{logs}"
    assert len(list(tmp_path.glob(f"slurm-{job}_*.out"))) == 4
    table = compare.compare([folder])
    assert len(table) == 4 and set(table["status"]) == {"completed"}
    assert os.path.commonpath(list(table["run"])) == str(folder)
