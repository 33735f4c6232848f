"""The command's frictions (issue 16): which checkpoint is kept, quiet and honest output, no stray folders,
no validation, dropped batches, composed configs and nested help."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.helpers import example_datamodule
from unimodality.cli import main
from unimodality.parser import compose_configs
from unimodality.selection import resolve_auto

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1"]


def fit(tmp_path: Path, *args: str) -> Path:
    main(["fit", "--config", str(CONFIGS / "clip.yaml"), *SHORT,
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *args])
    return tmp_path / "runs" / "clip" / "version_0"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> dict:
    """One short fit with the defaults, its output captured at the file descriptors (as a log file gets it)."""
    root = tmp_path_factory.mktemp("frictions")
    import os
    import sys
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as out:
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            with pytest.MonkeyPatch.context() as m:
                m.setattr(sys, "stdout", open(1, "w", closefd=False))  # noqa: SIM115 - the redirected descriptors
                m.setattr(sys, "stderr", open(2, "w", closefd=False))  # noqa: SIM115
                for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning's handlers hold the old stream
                    for handler in logging.getLogger(name).handlers:
                        m.setattr(handler, "stream", sys.stderr)
                run_dir = fit(root)
                sys.stdout.flush()
                sys.stderr.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        out.seek(0)
        printed = out.read()
    return {"run_dir": run_dir, "printed": printed, "root": root}


def test_best_is_chosen_by_perturbation_mrr_and_last_is_kept(default_run):
    run_dir, printed = default_run["run_dir"], default_run["printed"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    metrics = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val/pert/mrr"])
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    best_epoch = int(metrics.loc[metrics["val/pert/mrr"].idxmax(), "epoch"])
    assert best["epoch"] == best_epoch
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["epoch"] == 2
    # the summary says how good the model is, beside chance, and which epoch best.ckpt holds, chosen by what
    assert f"best.ckpt: epoch {best_epoch}, chosen by val/pert/mrr (max)" in printed
    assert re.search(r"pert/mrr [\d.]+ \(chance [\d.]+\)", printed), printed
    assert re.search(r"val/loss: last [\d.]+ \(epoch 2\), lowest [\d.]+ \(epoch \d\)", printed), printed


def test_the_default_output_is_quiet_and_has_a_line_per_epoch_in_a_log(default_run):
    printed = default_run["printed"]
    for chatter in ("💡 Tip", "GPU available", "TPU available", "LeafSpec", "`Trainer.fit` stopped"):
        assert chatter not in printed, chatter
    assert "\r" not in printed  # no tqdm bars in a file
    epochs = re.findall(r"^Epoch (\d) of 3 .*val/pert/mrr=", printed, flags=re.MULTILINE)
    assert epochs == ["0", "1", "2"], printed  # the progress shows the perturbation-level metric


@pytest.mark.slow  # a fit (or a fresh interpreter) of its own
def test_checkpoint_monitor_option_keeps_last_and_a_callbacks_config_does_not_drop_it(tmp_path, capsys):
    run_dir = fit(tmp_path, "--checkpoint.monitor", "val/loss", "--trainer.callbacks+=LearningRateMonitor")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    metrics = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val/loss"])
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert best["epoch"] == int(metrics.loc[metrics["val/loss"].idxmin(), "epoch"])
    assert "chosen by val/loss (min)" in capsys.readouterr().out  # the mode follows the metric


@pytest.mark.slow  # a fit (or a fresh interpreter) of its own
def test_an_unknown_monitor_is_one_line_listing_the_logged_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path, "--checkpoint.monitor", "val/nope")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("unimodality fit: error: --checkpoint.monitor val/nope: the setup logs no such metric")
    assert "val/pert/mrr" in err


def test_auto_falls_back_for_setups_without_perturbation_metrics():
    assert resolve_auto(["val/loss", "val/recall@10", "val/recall@1"]) == ("val/recall@1", "max")  # SimCLR
    assert resolve_auto(["val/loss"]) == ("val/loss", "min")
    assert resolve_auto(["val/loss", "val/pert/mrr", "val/recall@1"]) == ("val/pert/mrr", "max")


def test_evaluation_commands_leave_no_folder_and_no_warnings(default_run, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    best = default_run["run_dir"] / "checkpoints" / "best.ckpt"
    for command in ("validate", "test"):
        main([command, "--ckpt_path", str(best), "--trainer.enable_progress_bar", "false"])
    main(["predict", "--ckpt_path", str(best), "--data.path", "example://phenomics.parquet",
          "--data.output", str(tmp_path / "ph.parquet"), "--trainer.enable_progress_bar", "false"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ph.parquet"]  # no runs/unimodality/version_N
    printed = capfd.readouterr()
    text = printed.out + printed.err
    for unwanted in ("No seed found", "dirpath", "callbacks used to create the checkpoint", "Tip"):
        assert unwanted not in text, unwanted
    # validate writes its results table like test, into the checkpoint's run directory
    table = pd.read_csv(default_run["run_dir"] / "val_results_best.csv")
    row = table[(table["level"] == "perturbation") & (table["metric"] == "mrr") & (table["target"] == "mean")]
    assert len(row) == 1 and 0 < row["value"].iloc[0] <= 1 and 0 < row["chance"].iloc[0] < 1
    document = json.loads((default_run["run_dir"] / "val_results_best.json").read_text())
    assert document["checkpoint"] == str(best.resolve())


def test_a_failed_fit_leaves_no_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path, "--data.init_args.keys", "[no_such_column]")
    err = capsys.readouterr().err
    # the missing key's message lists the obs index too (it works as a key)
    assert "no_such_column" in err and "the obs index as 'obs_names'" in err
    assert not (tmp_path / "runs").exists()


def test_without_validation_split_training_is_clean(tmp_path, capsys, recwarn, caplog):
    caplog.set_level(logging.WARNING)
    run_dir = fit(tmp_path, "--data.init_args.split_column", "null", "--data.init_args.val_fraction", "0",
                  "--data.init_args.test_fraction", "0")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    messages = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    for unwanted in ("split holds no", "zero", "could not find the monitored key", "val_dataloader"):
        assert not [m for m in messages if unwanted in m], (unwanted, messages)
    assert "no validation split: trained without validation" in capsys.readouterr().out


def test_a_small_last_batch_is_dropped_with_a_warning_and_a_large_one_is_kept(caplog):
    datamodule = example_datamodule(batch_size=200)  # 320 training perturbations: 200 + 120
    datamodule.setup("fit")
    sizes = [len(batch["tx"]) for batch in datamodule.train_dataloader()]
    assert sorted(sizes) == [120, 200]
    datamodule = example_datamodule(batch_size=140)  # 140 + 140 + 40: 40 < 70 is dropped, 12.5% of the split
    datamodule.setup("fit")
    with caplog.at_level(logging.WARNING, logger="unimodality.datamodule"):
        sizes = [len(batch["tx"]) for batch in datamodule.train_dataloader()]
    assert sizes == [140, 140]
    assert any("40 of 320 training perturbations (12%) are left out" in r.getMessage() for r in caplog.records)


def test_a_second_config_naming_one_modality_merges_with_the_first(tmp_path, capsys):
    more = tmp_path / "ph.yaml"
    more.write_text(yaml.safe_dump({"data": {"init_args": {"modalities": {"ph": {
        "class_path": "TableSource", "init_args": {"transform": "log1p"}}}}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--config", str(more), "--print_config"])
    assert exit_info.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["modalities"]
    assert set(data) == {"tx", "ph"}
    assert data["ph"]["init_args"]["transform"] == "log1p"
    assert data["ph"]["init_args"]["feature_prefix"] == "feat_"  # the first config's settings of ph remain
    assert data["tx"]["init_args"]["path"] == "example://transcriptomics.h5ad"


def test_compose_configs_replaces_an_entry_whose_class_changes(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"model": {"init_args": {"encoders": {
        "tx": {"class_path": "MLPEncoder", "init_args": {"dropout": 0.1}},
        "ph": {"class_path": "MLPEncoder", "init_args": {"dropout": 0.2}}}}}}))
    second.write_text(yaml.safe_dump({"model": {"init_args": {"encoders": {
        "ph": {"class_path": "OtherEncoder", "init_args": {"width": 3}}}}}}))
    args = compose_configs(["fit", "--config", str(first), "--config", str(second)])
    assert args[:4] == ["fit", "--config", str(first), "--config"]
    encoders = json.loads(args[4])["model"]["init_args"]["encoders"]
    assert encoders == {"tx": {"class_path": "MLPEncoder", "init_args": {"dropout": 0.1}},
                        "ph": {"class_path": "OtherEncoder", "init_args": {"width": 3}}}
    assert compose_configs(["fit", "--config", str(first)]) == ["fit", "--config", str(first)]


@pytest.mark.parametrize("args, shown", [
    (["fit", "--model.encoders.help", "MLPEncoder"], "--encoders.hidden_sizes"),
    (["fit", "--data.modalities.help", "TableSource"], "--modalities.feature_prefix"),
    (["fit", "--config", str(CONFIGS / "simclr_tx.yaml"), "--model.init_args.encoder.help", "MLPEncoder"],
     "--encoder.hidden_sizes"),
])
def test_nested_help_works_without_naming_the_setup(args, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert shown in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    printed = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "evaluate", "plugins", "example-data"):
        assert f"unimodality {command}" in printed, command


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", str(tmp_path))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ('unimodality fit: error: this needs the tensorboard package, which is not installed: '
                       'pip install "unimodality[tensorboard]" (or pip install tensorboard)')
    assert not any(line.startswith("Traceback") for line in err)


@pytest.mark.slow  # a fit (or a fresh interpreter) of its own
def test_unimodality_imports_lazily():
    import subprocess
    import sys

    code = ("import sys, unimodality; assert 'torch' not in sys.modules, 'torch'; "
            "from unimodality import Evaluator, evaluate, Setup, TableSource; print(Setup.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Setup"


def test_quiet_drops_lightning_chatter_and_verbose_brings_it_back():
    from unimodality import console

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        for verbose in (False, True):
            console.quiet(verbose)
            for message in ("GPU available: False, used: False", "💡 Tip: try litlogger", "Loaded model weights"):
                logger.warning(message)
        assert seen == ["Loaded model weights", "GPU available: False, used: False", "💡 Tip: try litlogger",
                        "Loaded model weights"]
    finally:
        logger.removeHandler(handler)
        console.quiet(False)


def test_checkpoint_options_can_come_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "select.yaml"
    config.write_text("checkpoint:\n  monitor: val/pert/recall@10\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--config", str(config), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["checkpoint"] == {"monitor": "val/pert/recall@10", "mode": None}
