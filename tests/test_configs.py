"""Every shipped config parses, and every training config runs on the example data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml

from unimodality.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING = sorted(p for p in CONFIGS.glob("*.yaml"))
TRAINER = sorted((CONFIGS / "trainer").glob("*.yaml"))


def test_configs_are_found():
    assert {p.stem for p in TRAINING} >= {
        "clip", "clip_frozen_ph", "clip_frozen_tx", "clip_disabled_ph", "clip_disabled_tx"
    }
    assert {p.stem for p in TRAINER} >= {"ddp", "deepspeed"}


@pytest.mark.parametrize("config", TRAINING, ids=lambda p: p.stem)
def test_training_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("unimodality.plugins.setups.")


@pytest.mark.parametrize("config", TRAINER, ids=lambda p: p.stem)
def test_trainer_config_composes(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(config.read_text())["trainer"]["strategy"]["class_path"]
    assert resolved["trainer"]["strategy"]["class_path"] == expected
    assert resolved["model"]["init_args"]["loss"]["class_path"].endswith("ClipLoss")  # model config intact


@pytest.mark.parametrize("config", TRAINING, ids=lambda p: p.stem)
def test_training_config_runs(config, tmp_path):
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])


def test_ddp_config_runs_two_processes_on_cpu(tmp_path):
    """configs/trainer/ddp.yaml: two gloo processes train, gathering the global batch for the loss; then
    two processes embed a file."""
    result = subprocess.run(
        [sys.executable, "-m", "unimodality", "fit", "--config", str(CONFIGS / "clip.yaml"),
         "--config", str(CONFIGS / "trainer" / "ddp.yaml"), "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout
    checkpoint = tmp_path / "runs" / "clip" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    # predicting with two processes writes every row once, in input order, as one process does
    outputs = {name: tmp_path / f"{name}.h5ad" for name in ("ddp", "single")}
    predict = ["predict", "--ckpt_path", str(checkpoint), "--data.path", "example://transcriptomics.h5ad",
               "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(
        [sys.executable, "-m", "unimodality", *predict, "--data.output", str(outputs["ddp"]),
         "--trainer.strategy", "ddp", "--trainer.devices", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    main([*predict, "--data.output", str(outputs["single"])])  # one process: in this one (no imports to pay)
    ddp, single = (ad.read_h5ad(outputs[n]) for n in ("ddp", "single"))
    assert list(ddp.obs_names) == list(single.obs_names)
    np.testing.assert_allclose(ddp.obsm["X_unimodality"], single.obsm["X_unimodality"], atol=1e-6)
