"""Strategies and precision: DeepSpeed configs fail clearly where they cannot run, DeepSpeed checkpoints are
consolidated for evaluation, and bf16 mixed precision trains every loss on CPU."""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import anndata as ad
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.helpers import copy_of_clip_run
from unimodality import cli
from unimodality.checkpoint import CheckpointError
from unimodality.cli import main
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.losses.hopfield import HopfieldLoss
from unimodality.plugins.losses.ntxent import NTXentLoss
from unimodality.plugins.losses.siglip import SigLipLoss

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
DEEPSPEED_RUNS = HAS_DEEPSPEED and torch.cuda.is_available()
DEEPSPEED_CONFIGS = [CONFIGS / "trainer" / "deepspeed.yaml", CONFIGS / "trainer" / "deepspeed_stage3.yaml"]


@pytest.mark.parametrize("config", DEEPSPEED_CONFIGS, ids=lambda p: p.stem)
def test_deepspeed_configs_set_their_zero_stage(config):
    strategy = yaml.safe_load(config.read_text())["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == {"deepspeed": 2, "deepspeed_stage3": 3}[config.stem]


@pytest.mark.skipif(DEEPSPEED_RUNS, reason="CUDA and deepspeed are both here: DeepSpeed can run")
@pytest.mark.parametrize("config", DEEPSPEED_CONFIGS, ids=lambda p: p.stem)
def test_deepspeed_without_cuda_or_deepspeed_fails_with_one_clear_paragraph(config, tmp_path, monkeypatch, capfd):
    # the command line in-process (a subprocess would pay another ~10 s of imports): the exit status is
    # SystemExit's code, and an exception escaping as a traceback would fail pytest.raises
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--config", str(config)])
    assert exit_info.value.code == 2
    stderr = capfd.readouterr().err  # file descriptor 2: whatever wrote to it, Python or not
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr  # one paragraph (one line), not a stack of exceptions
    message = errors[0]
    assert message.startswith("unimodality fit: error: the DeepSpeed strategy")
    if not torch.cuda.is_available():
        assert "a CUDA GPU" in message
    if not HAS_DEEPSPEED:
        assert 'pip install "unimodality[deepspeed]"' in message
    assert "configs/trainer/ddp.yaml" in message  # what to use instead
    assert not (tmp_path / "runs").exists()  # failed before creating anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_accelerator_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--trainer.accelerator", "gpu", *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unimodality fit: error: " in err and "Traceback" not in err, err


# --- DeepSpeed checkpoints for evaluation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(clip_run_dir, tmp_path_factory) -> Path:
    """last.ckpt of a one-epoch CLIP run (the session's, copied for this module)."""
    return copy_of_clip_run(clip_run_dir, tmp_path_factory.mktemp("strategies-run"))


def fake_deepspeed_checkpoint(path: Path) -> Path:
    """The layout Lightning's DeepSpeedStrategy saves: a directory named like a file, with a `latest` tag file
    and a folder of per-rank shards."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    (path / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    return path


def test_predict_from_a_deepspeed_checkpoint_consolidates_it_first(trained, tmp_path, monkeypatch, capsys):
    """`predict --ckpt_path <DeepSpeed directory>` converts it with Lightning's
    convert_zero_checkpoint_to_fp32_state_dict (faked: it needs deepspeed), once, and embeds from the result."""
    ds_dir = fake_deepspeed_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    calls = []

    def convert(checkpoint_dir, output_file, tag=None):
        calls.append((Path(checkpoint_dir), Path(output_file)))
        shutil.copy(trained, output_file)  # what conversion yields: a one-file Lightning checkpoint

    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setattr("lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict", convert)
    consolidated = tmp_path / "checkpoints" / "last.consolidated.ckpt"
    for run in range(2):
        output = tmp_path / f"embedded{run}.h5ad"
        main(["predict", "--ckpt_path", str(ds_dir), "--data.path", "example://transcriptomics.h5ad",
              "--data.output", str(output), "--trainer.accelerator", "cpu", *QUIET])
        assert output.is_file() and ad.read_h5ad(output).obsm["X_unimodality"].shape[1] == 128
    assert calls == [(ds_dir, consolidated)]  # the second run reused the consolidated file
    assert consolidated.is_file()


def test_deepspeed_checkpoint_without_deepspeed_says_how_to_consolidate(tmp_path, monkeypatch, capsys):
    ds_dir = fake_deepspeed_checkpoint(tmp_path / "last.ckpt")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it fails, installed or not
    with pytest.raises(SystemExit) as exit_info:
        cli.checkpoint_arguments(["predict", "--ckpt_path", str(ds_dir), "--data.path", "x.h5ad"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{ds_dir} is a DeepSpeed checkpoint" in err
    assert "convert_zero_checkpoint_to_fp32_state_dict" in err and str(tmp_path / "last.consolidated.ckpt") in err


def test_a_plain_directory_is_not_taken_for_a_deepspeed_checkpoint(tmp_path):
    args = ["predict", "--ckpt_path", str(tmp_path), "--data.path", "x.h5ad"]
    with pytest.raises(CheckpointError, match="a directory, not a checkpoint file"):
        cli.checkpoint_arguments(args)


@pytest.mark.skipif(not DEEPSPEED_RUNS, reason="needs CUDA and deepspeed")
@pytest.mark.parametrize("config", DEEPSPEED_CONFIGS, ids=lambda p: p.stem)
def test_deepspeed_trains_and_its_checkpoint_predicts(config, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unimodality", "fit", "--config", str(CONFIGS / "clip.yaml"), "--config", str(config),
         "--trainer.devices", "1", "--trainer.max_epochs", "2", *QUIET,
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "clip" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir()
    output = tmp_path / "embedded.h5ad"
    result = subprocess.run(
        [sys.executable, "-m", "unimodality", "predict", "--ckpt_path", str(checkpoint), "--data.path",
         "example://transcriptomics.h5ad", "--data.output", str(output), *QUIET],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.is_file()


# --- bf16 mixed precision on CPU --------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["clip", "siglip", "hopfield", "simclr_tx"])
def test_bf16_mixed_trains_every_loss_on_cpu(config, monkeypatch):
    metrics = {}
    original = cli.UnimodalityCLI.after_fit

    def record(self):
        metrics.update({k: v.item() for k, v in self.trainer.callback_metrics.items()})
        original(self)

    monkeypatch.setattr(cli.UnimodalityCLI, "after_fit", record)
    main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--trainer.precision", "bf16-mixed",
          "--trainer.accelerator", "cpu", "--trainer.fast_dev_run", "2", "--trainer.log_every_n_steps", "1", *QUIET])
    assert {"train/loss", "val/loss"} <= metrics.keys(), metrics
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def embeddings(n: int = 128, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    b = F.normalize(a + 0.5 * torch.randn(n, dim, generator=generator), dim=1)
    return a, b, torch.randint(0, n // 3, (n,), generator=generator)


@pytest.mark.parametrize("loss", [ClipLoss, SigLipLoss, HopfieldLoss, NTXentLoss], ids=lambda c: c.__name__)
def test_losses_are_computed_in_fp32_under_bf16_autocast(loss):
    """Scaled by up to 100, bf16 logits (8 bits of mantissa) are off by up to ~0.4; the loss must be the fp32
    one however its caller runs, in fp32, whatever dtype the embeddings arrive in."""
    module = loss()
    a, b, group = embeddings()
    reference = module(a, b, group)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module(a.bfloat16(), b.bfloat16(), group)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, module(a.bfloat16().float(), b.bfloat16().float(), group))
    assert abs(mixed.item() - reference.item()) < 0.05 * abs(reference.item())
