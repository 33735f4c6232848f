"""Plots: embedding map, similarity heatmap, curves; PNG files, TensorBoard images, and no matplotlib."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import example_datamodule, quiet_trainer
from unimodality import plots
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup

pytest.importorskip("matplotlib")


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pca_finds_the_direction_of_largest_variance():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 5)) * np.array([0.1, 5.0, 0.1, 0.1, 0.1])
    coords, method = plots.reduce_2d(points, method="pca")
    assert method == "pca" and coords.shape == (200, 2)
    assert abs(np.corrcoef(coords[:, 0], points[:, 1])[0, 1]) > 0.99


def test_embedding_map_and_heatmap_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    points = {("tx", "val"): rng.normal(size=(50, 8)), ("ph", "val"): rng.normal(size=(40, 8)),
              ("tx", "train"): rng.normal(size=(30, 8))}
    assert _is_png(plots.embedding_map(points, tmp_path / "map.png", method="pca"))
    a = rng.normal(size=(6, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    assert _is_png(plots.similarity_heatmap(a, a, ("tx", "ph"), tmp_path / "sim.png", labels=list("abcdef")))


def test_curves_from_a_csv_log(tmp_path):
    log = pd.DataFrame({
        "epoch": [0, 0, 1, 1], "step": [4, 9, 14, 19],
        "train/loss": [3.0, np.nan, 2.5, np.nan], "val/loss": [np.nan, 2.8, np.nan, 2.4],
        "val/pert/recall@1": [np.nan, 0.1, np.nan, 0.2], "val/pert/chance@1": [np.nan, 0.025, np.nan, 0.025],
    })
    log.to_csv(tmp_path / "metrics.csv", index=False)
    assert _is_png(plots.metric_curves(tmp_path / "metrics.csv", tmp_path / "curves.png"))
    pd.DataFrame({"epoch": [0], "other": [1.0]}).to_csv(tmp_path / "empty.csv", index=False)
    assert plots.metric_curves(tmp_path / "empty.csv", tmp_path / "none.png") is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs with a CSV logger and the plot callback; returns (trainer, model, run dir)."""
    from lightning.pytorch.loggers import CSVLogger

    root = tmp_path_factory.mktemp("plots")
    torch.manual_seed(0)
    model = CrossModalSetup(encoders={"tx": partial(MLPEncoder, hidden_sizes=[32]),
                                      "ph": partial(MLPEncoder, hidden_sizes=[32])}, embed_dim=16)
    callback = plots.PlotCallback(max_points=200, method="pca")
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, limit_train_batches=3, callbacks=[callback],
                            logger=CSVLogger(root, name="run"))
    trainer.fit(model, datamodule=example_datamodule())
    return trainer, model, callback, root


def test_fit_end_writes_map_heatmap_and_curves(trained):
    trainer, model, callback, _ = trained
    folder = Path(trainer.log_dir) / "plots"
    assert set(callback.written) == {"embedding_map_fit", "similarity_fit", "curves"}
    for name in ("embedding_map_fit.png", "similarity_fit.png", "curves.png"):
        assert _is_png(folder / name), name


def test_images_go_to_tensorboard(trained, tmp_path):
    """With a TensorBoardLogger, every PNG is also added as an image (experiment mocked: no tensorboard needed)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer, model, callback, _ = trained
    experiment = mock.MagicMock()
    logger = mock.MagicMock(spec=TensorBoardLogger)
    logger.experiment = experiment
    with mock.patch.object(type(trainer), "loggers", new_callable=mock.PropertyMock, return_value=[logger]):
        plots.log_images(trainer, callback.written)
    tags = [call.args[0] for call in experiment.add_image.call_args_list]
    assert sorted(tags) == sorted(f"plots/{name}" for name in callback.written)
    image = experiment.add_image.call_args_list[0].args[1]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert experiment.add_image.call_args_list[0].kwargs["dataformats"] == "HWC"


def test_without_matplotlib_one_log_line_and_no_files(trained, tmp_path, caplog):
    trainer, model, _, _ = trained
    callback = plots.PlotCallback()
    with mock.patch.object(plots, "have_matplotlib", return_value=False), \
            mock.patch.object(plots, "run_directory", return_value=tmp_path), \
            caplog.at_level(logging.WARNING, logger="unimodality.plots"):
        callback.on_fit_end(trainer, model)
    assert [r.message for r in caplog.records if r.name == "unimodality.plots"] == [
        'matplotlib is not installed: no plots (pip install "unimodality[plots]")']
    assert not list(tmp_path.iterdir())


def test_a_failing_plot_does_not_fail_the_run(trained, tmp_path, caplog):
    trainer, model, _, _ = trained
    callback = plots.PlotCallback()
    with mock.patch.object(plots, "embedding_map", side_effect=RuntimeError("boom")), \
            mock.patch.object(plots, "run_directory", return_value=tmp_path), \
            caplog.at_level(logging.WARNING, logger="unimodality.plots"):
        callback.on_fit_end(trainer, model)
    assert any("plots failed (RuntimeError: boom)" in r.message for r in caplog.records)
