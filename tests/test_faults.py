"""Faults: a non-finite loss stops training cleanly, killed writes leave the previous file intact, same seed
gives the same run."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.checkpoint import AtomicCheckpointIO, read_checkpoint
from unimodality.cli import main
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.setup import NonFiniteLossError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class PoisonedLoss(ClipLoss):
    """CLIP, until it returns NaN from its ``after``-th training call on (a diverging run, on cue)."""

    def __init__(self, after: int = 15) -> None:
        super().__init__()
        self.after = after
        self.calls = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        loss = super().forward(a, b, group)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.after:
                return loss * float("nan")
        return loss


def test_non_finite_loss_stops_with_the_step_and_terms_and_keeps_finite_weights(example_data_dir, tmp_path):
    data = example_datamodule(batch_size=32)  # 320 training perturbations: 10 steps per epoch
    model = CrossModalSetup(
        encoders={"tx": partial(MLPEncoder, hidden_sizes=[64]), "ph": partial(MLPEncoder, hidden_sizes=[64])},
        loss=PoisonedLoss(after=15), embed_dim=16,
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = quiet_trainer(max_epochs=3, callbacks=[checkpoint], enable_checkpointing=True,
                            num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError, match=r"step 14 \(epoch 1\): the loss is nan \(tx-ph=nan\)"):
        trainer.fit(model, datamodule=data)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights
    saved = read_checkpoint(tmp_path / "last.ckpt")
    assert saved["epoch"] == 0 and saved["global_step"] == 10  # the last good epoch's checkpoint stays
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_the_cli_reports_a_non_finite_loss_without_a_traceback(example_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--model.optimizer.init_args.lr", "1e30",
              "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "the loss is" in err and "learning rate" in err and "Traceback" not in err


KILL_DURING_SAVE = textwrap.dedent("""
    import sys, torch
    from unimodality.checkpoint import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    path = sys.argv[1]
    # a large checkpoint: writing it takes long enough to be killed in the middle
    io.save_checkpoint({"state_dict": {"w": torch.ones(100_000_000)}, "epoch": 2}, path)
""")


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    process = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(path)])
    deadline = time.time() + 120
    while not list(tmp_path.glob(".last.ckpt.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".last.ckpt.*.tmp")), "the writer never started"
    time.sleep(0.05)  # well into the 400 MB write
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = read_checkpoint(path)
    assert saved["epoch"] == 1 and torch.equal(saved["state_dict"]["w"], torch.zeros(3))


def fit_metrics(root: Path, *extra: str) -> pd.DataFrame:
    with redirect_stdout(io.StringIO()):
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--trainer.max_epochs", "3",
              "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(root), *extra])
    return pd.read_csv(next(root.rglob("metrics.csv")))


def test_same_config_and_seed_give_identical_runs_on_cpu(example_data_dir, tmp_path):
    first, second = fit_metrics(tmp_path / "a"), fit_metrics(tmp_path / "b")
    pd.testing.assert_frame_equal(first, second)
    assert first["train/loss"].notna().sum() == 15 and first["val/recall@1"].notna().sum() == 3
    other = fit_metrics(tmp_path / "c", "--seed_everything", "1")
    assert not first["train/loss"].dropna().equals(other["train/loss"].dropna())  # the seed matters


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(example_data_dir, tmp_path):
    """Stop after 2 of 4 epochs, resume from last.ckpt: the same global steps, losses and metrics."""

    def trainer(max_epochs: int, folder: Path):
        from lightning.pytorch.loggers import CSVLogger

        return quiet_trainer(
            max_epochs=max_epochs, logger=CSVLogger(folder, name="", version=""), log_every_n_steps=1,
            enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=folder, filename="last", monitor=None)],
        )

    def model():
        return CrossModalSetup(
            encoders={"tx": partial(MLPEncoder, hidden_sizes=[64]), "ph": partial(MLPEncoder, hidden_sizes=[64])},
            embed_dim=16, lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.7),
        )

    from lightning.pytorch import seed_everything

    seed_everything(0)
    trainer(4, tmp_path / "whole").fit(model(), datamodule=example_datamodule(batch_size=32))
    seed_everything(0)
    trainer(2, tmp_path / "part").fit(model(), datamodule=example_datamodule(batch_size=32))
    seed_everything(123)  # a restarted job seeds as it likes: the checkpoint's random state wins
    resumed = trainer(4, tmp_path / "part")
    resumed.fit(model(), datamodule=example_datamodule(batch_size=32), ckpt_path=tmp_path / "part" / "last.ckpt")
    assert resumed.global_step == 40
    columns = ["step", "epoch", "train/loss", "val/loss", "val/recall@1"]
    whole = pd.read_csv(tmp_path / "whole" / "metrics.csv")[columns]
    after = pd.read_csv(tmp_path / "part" / "metrics.csv")[columns]  # the resumed run's log: epochs 2 and 3
    assert sorted(after["epoch"].unique()) == [2, 3]
    pd.testing.assert_frame_equal(whole[whole["epoch"] >= 2].reset_index(drop=True), after.reset_index(drop=True),
                                  check_exact=True)


KILL_DURING_OUTPUT = textwrap.dedent("""
    import sys
    import numpy as np, pandas as pd
    from pathlib import Path
    from unimodality.outputs import write_embeddings
    rows = np.arange(400_000)
    metadata = pd.DataFrame({"well": [f"w{i}" for i in rows]})
    # a large table: writing it takes long enough to be killed in the middle
    write_embeddings(Path("input.parquet"), metadata, rows, np.ones((len(rows), 256), np.float32), sys.argv[1])
""")


def test_an_output_write_killed_midway_leaves_the_previous_file(tmp_path):
    from unimodality.outputs import write_embeddings

    output = tmp_path / "wells_embedded.parquet"
    write_embeddings(Path("input.parquet"), pd.DataFrame({"well": ["a", "b"]}), np.arange(2),
                     np.zeros((2, 4), np.float32), output)
    before = output.read_bytes()
    process = subprocess.Popen([sys.executable, "-c", KILL_DURING_OUTPUT, str(output)], cwd=tmp_path)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".wells_embedded.parquet.*")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".wells_embedded.parquet.*")), "the writer never started"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert output.read_bytes() == before
    assert pd.read_parquet(output)["well"].tolist() == ["a", "b"]


def test_the_cli_writes_checkpoints_atomically(example_data_dir, tmp_path, monkeypatch):
    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    fit_metrics(tmp_path, "--trainer.max_epochs", "1")
    assert sorted(saved) == ["best.ckpt", "last.ckpt"]
