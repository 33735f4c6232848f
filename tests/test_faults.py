"""Faults: a non-finite loss stops training cleanly, killed writes leave the previous file intact, same seed
gives the same run."""

from __future__ import annotations

import errno
import io
import os
import signal
import socket
import time
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import PoisonedLoss, example_datamodule, fork, quiet_trainer
from tests.test_bad_inputs import assert_user_error, checkpoint, data, fit, predict
from unimodality.checkpoint import AtomicCheckpointIO, read_checkpoint
from unimodality.cli import main
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.sources.table import TableSource
from unimodality.setup import NonFiniteLossError
from unimodality.sources import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: the command-line catalogue's fixtures, used here by name
FIXTURES = (checkpoint, data)


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


def save_a_large_checkpoint(path: Path) -> None:
    # a large checkpoint: writing it takes long enough to be killed in the middle
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(100_000_000)}, "epoch": 2}, path)


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    pid = fork(save_a_large_checkpoint, path)  # another process, the writer
    leftover = tmp_path / f".last.ckpt.{socket.gethostname()}-{pid}.unimodality-tmp"
    deadline = time.time() + 120
    while not leftover.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert leftover.exists(), "the writer never started"
    time.sleep(0.05)  # well into the 400 MB write
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the writer finished before it was killed"
    saved = read_checkpoint(path)
    assert saved["epoch"] == 1 and torch.equal(saved["state_dict"]["w"], torch.zeros(3))
    # the killed run's temporary file is recognisable, and the next save of that checkpoint removes it
    assert leftover.exists()
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert read_checkpoint(path)["epoch"] == 3


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


def write_a_large_table(output: Path) -> None:
    from unimodality.outputs import write_embeddings

    os.chdir(output.parent)  # the writer works in the output's folder (its input.parquet is relative)
    rows = np.arange(400_000)
    metadata = pd.DataFrame({"well": [f"w{i}" for i in rows]})
    # a large table: writing it takes long enough to be killed in the middle
    write_embeddings(Path("input.parquet"), metadata, rows, np.ones((len(rows), 256), np.float32), output)


def test_an_output_write_killed_midway_leaves_the_previous_file(tmp_path):
    from unimodality.outputs import write_embeddings

    output = tmp_path / "wells_embedded.parquet"
    write_embeddings(Path("input.parquet"), pd.DataFrame({"well": ["a", "b"]}), np.arange(2),
                     np.zeros((2, 4), np.float32), output)
    before = output.read_bytes()
    pid = fork(write_a_large_table, output)  # another process, the writer
    leftover = tmp_path / f".wells_embedded.parquet.{socket.gethostname()}-{pid}.unimodality-tmp.parquet"
    deadline = time.time() + 120
    while not leftover.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert leftover.exists(), "the writer never started"
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the writer finished before it was killed"
    assert output.read_bytes() == before
    assert pd.read_parquet(output)["well"].tolist() == ["a", "b"]
    # the next write of that output removes the killed run's temporary file
    write_embeddings(Path("input.parquet"), pd.DataFrame({"well": ["c"]}), np.arange(1),
                     np.zeros((1, 4), np.float32), output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wells_embedded.parquet"]


def test_the_cli_writes_checkpoints_atomically(example_data_dir, tmp_path, monkeypatch):
    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    fit_metrics(tmp_path, "--trainer.max_epochs", "1")
    assert sorted(saved) == ["best.ckpt", "last.ckpt"]


# -- full disks, unwritable caches -----------------------------------------------------------------------

def test_a_full_disk_while_saving_a_checkpoint_says_so(data, tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    runs = tmp_path / "runs"
    args = [a for a in fit(data) if a not in ("--trainer.fast_dev_run", "1")]  # fast_dev_run saves nothing
    assert_user_error(args + ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                              "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(runs)],
                      r"unimodality fit: error: \S+(best|last)\.ckpt: no space left on device while writing it; "
                      r"free space or choose another folder", folder=data["dir"])
    assert [p.name for p in runs.rglob("*.ckpt*")] == []  # nothing half-written left behind


def test_a_cache_dir_that_cannot_be_created_is_named(data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_user_error(fit(data, "--data.streaming", "true", "--data.cache_dir", str(blocker / "cache")),
                      r"unimodality fit: error: streaming cache folder \S*a-file/cache is not writable \(",
                      r"--data\.cache_dir or the UNIMODALITY_CACHE_DIR", folder=data["dir"])


def test_a_read_only_cache_dir_is_named(data, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root): see the test with a file as parent")
        monkeypatch.setenv("UNIMODALITY_CACHE_DIR", str(locked))
        assert_user_error(fit(data, "--data.streaming", "true"), r"cache folder \S*locked is not writable",
                          folder=data["dir"])
    finally:
        locked.chmod(0o700)


def first_error(printed: str) -> str:
    return next(line for line in printed.splitlines() if "error:" in line)


@pytest.mark.parametrize("column", ["text", "numeric text", "null"])
def test_streaming_and_in_memory_refuse_a_bad_feature_column_alike(data, tmp_path, column):
    table = data["ph_table"].copy()
    if column == "text":
        table["feat_005"] = "abc"
    elif column == "numeric text":
        table["feat_005"] = table["feat_005"].astype(str)
    else:
        table.loc[7, "feat_010"] = None  # a null in parquet (row 7 is a training row)
    path = data["dir"] / "bad.parquet"
    table.to_parquet(path)
    not_numeric = r"feature columns must be numeric or lists of numbers, these are not: \['feat_005 \(string\)'\]"
    expected = {"text": not_numeric, "numeric text": not_numeric,
                "null": r"1 NaN or infinite feature values in 1 rows \(e\.g\. row 7 / feat_010\)"}[column]
    in_memory = assert_user_error(fit(data, ph=path), rf"bad\.parquet: {expected}", folder=data["dir"])
    streamed = assert_user_error(fit(data, "--data.streaming", "true", "--data.cache_dir", str(tmp_path / "cache"),
                                     ph=path), rf"bad\.parquet: {expected}", folder=data["dir"])
    assert first_error(streamed) == first_error(in_memory)
    assert not list((tmp_path / "cache").glob("*.npy"))  # no cache of bad data is kept


@pytest.mark.parametrize("transform", ["log1p", "normalize_log1p", "clr"])
def test_negative_values_under_a_log_transform_are_refused(tmp_path, transform):
    frame = pd.DataFrame({"key": ["a", "b", "c"], "g0": [1.0, 2.0, 3.0], "g1": [4.0, -0.5, 1.0]})
    frame.to_parquet(tmp_path / "counts.parquet")
    source = TableSource(str(tmp_path / "counts.parquet"), features=["g0", "g1"], transform=transform)
    message = (rf"counts\.parquet: 1 negative feature values in 1 rows would be meaningless after the "
               rf"'{transform}' transform \(e\.g\. row 1 / g1\), which expects non-negative counts")
    with pytest.raises(DataError, match=message):
        source.read_features()
    with pytest.raises(DataError, match=message):  # when embedding too
        source.read_features(align_to=["g1", "g0"], empty_rows="warn")
    assert TableSource(str(tmp_path / "counts.parquet"), features=["g0", "g1"]).read_features()[1, 1] == -0.5


def negative_counts(data: dict, rows: np.ndarray) -> Path:
    tx = data["tx_adata"].copy()
    X = tx.X.toarray()
    X[rows, 3] = -0.5  # log1p(-0.5) is finite: nothing would show later
    tx.X = X
    tx.write_h5ad(data["dir"] / "negative.h5ad")
    return data["dir"] / "negative.h5ad"


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_fit_refuses_negative_counts(data, tmp_path, streaming):
    train = np.flatnonzero(data["tx_adata"].obs["split"].to_numpy() == "train")
    path = negative_counts(data, train)  # every training row: the first streamed buffer holds some
    gene = data["tx_adata"].var_names[3]
    assert_user_error(fit(data, "--data.streaming", streaming, "--data.cache_dir", str(tmp_path / "cache"), tx=path),
                      r"unimodality fit: error: \S*negative\.h5ad: \d+ negative feature values in \d+ rows would be "
                      rf"meaningless after the 'normalize_log1p' transform \(e\.g\. row \d+ / {gene}",
                      r"expects non-negative counts", folder=data["dir"])


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_predict_refuses_negative_counts(data, checkpoint, tmp_path, streaming):
    path = negative_counts(data, np.array([5, 9]))
    output = tmp_path / "embedded.h5ad"
    assert_user_error(predict(checkpoint, path, "--data.output", str(output), "--data.streaming", streaming),
                      r"unimodality predict: error: \S*negative\.h5ad: 2 negative feature values in 2 rows would be "
                      r"meaningless after the 'normalize_log1p' transform \(e\.g\. row 5 / \S+, row 9 / ",
                      folder=data["dir"])
    assert not output.exists()
