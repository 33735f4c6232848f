"""The evaluation callback: evaluators on held-out files every N epochs of ``fit``, logged so that a checkpoint
can be selected on them; nothing done between evaluations; the same numbers on every DDP process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.cli import main
from unimodality.errors import DataError
from unimodality.evaluation import EvaluationCallback, embed_with_checkpoint, embed_with_model
from unimodality.evaluation.embedding import predict_datamodule
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "clip_evaluation.yaml"
FILES = ["example://transcriptomics.h5ad", "example://phenomics.parquet"]
MONITOR = "eval/cross_modal_retrieval/mrr/transcriptomics->phenomics"


@pytest.fixture(autouse=True)
def one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def held_out(**kwargs) -> EvaluationCallback:
    """Cross-modal retrieval on the example data's test split (rows the model never trains on)."""
    options = dict(inputs=FILES, evaluators=["CrossModalRetrieval"], perturbation=["smiles", "concentration"],
                   source_options={"include": {"split": ["test"]}})
    return EvaluationCallback(**{**options, **kwargs})


def small_clip() -> CrossModalSetup:
    return CrossModalSetup(encoders={"tx": partial(MLPEncoder, hidden_sizes=[64]),
                                     "ph": partial(MLPEncoder, hidden_sizes=[64])}, embed_dim=16)


def test_metrics_are_logged_every_n_epochs_and_a_checkpoint_selects_on_them(tmp_path):
    callback = held_out(every_n_epochs=2)
    best = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best_eval", monitor=MONITOR, mode="max",
                           every_n_epochs=2)
    trainer = quiet_trainer(max_epochs=4, limit_train_batches=4, callbacks=[callback, best],
                            enable_checkpointing=True, logger=CSVLogger(tmp_path, name="run", version=0))
    model = small_clip()
    trainer.fit(model, datamodule=example_datamodule())

    assert callback.evaluated_epochs == [1, 3]  # after epochs 2 and 4
    metrics = pd.read_csv(tmp_path / "run" / "version_0" / "metrics.csv")
    logged = metrics.dropna(subset=[MONITOR])
    assert logged["epoch"].tolist() == [1, 3]
    assert logged[MONITOR].between(0, 1).all()
    chance = metrics[f"eval_chance/{MONITOR.removeprefix('eval/')}"].dropna()
    assert chance.round(6).tolist() == [round(1 / 40 * sum(1 / k for k in range(1, 41)), 6)] * 2  # H_P / P, P 40
    assert {"eval/cross_modal_retrieval/recall@5/phenomics->transcriptomics", "val/loss"} <= set(metrics.columns)
    # the checkpoint kept is the evaluation's best
    assert Path(best.best_model_path).name == "best_eval.ckpt" and Path(best.best_model_path).is_file()
    assert float(best.best_model_score) == pytest.approx(logged[MONITOR].max(), abs=1e-6)
    assert callback._prepared is None  # the files were released at the end of fit

    # the callback embeds a file exactly as predict does from a checkpoint of the same weights
    final = tmp_path / "final.ckpt"
    trainer.save_checkpoint(final)
    with predict_datamodule(model, FILES[1], source_options={"include": {"split": ["test"]}}) as datamodule:
        rows, ours = embed_with_model(model, datamodule, trainer)
    predicted_rows, predicted = embed_with_checkpoint(FILES[1], final, source_options={"include": {"split": ["test"]}})
    np.testing.assert_array_equal(rows, predicted_rows)
    np.testing.assert_allclose(ours, predicted, atol=1e-6)
    assert model.training  # the model's mode is restored after embedding


def test_between_evaluations_nothing_is_read_or_embedded(tmp_path, monkeypatch):
    callback = held_out(every_n_epochs=1000)
    calls = []
    monkeypatch.setattr(callback, "evaluate", lambda *args: calls.append(args) or {})
    tic = time.perf_counter()
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[callback])
    trainer.fit(small_clip(), datamodule=example_datamodule())
    assert time.perf_counter() - tic < 60
    assert calls == [] and callback.evaluated_epochs == [] and callback._prepared is None  # no file even opened
    assert not any(name.startswith("eval") for name in trainer.callback_metrics)


def test_bad_settings_fail_when_the_config_is_read(tmp_path):
    with pytest.raises(DataError, match="NoSuchEvaluator"):
        held_out(evaluators=["NoSuchEvaluator"])
    with pytest.raises(DataError, match="input .*missing.h5ad: no such file"):
        held_out(inputs=[str(tmp_path / "missing.h5ad")])
    with pytest.raises(DataError, match="every_n_epochs must be at least 1"):
        held_out(every_n_epochs=0)
    with pytest.raises(DataError, match="unknown baseline"):
        held_out(baselines=["umap"])


def test_an_evaluation_error_names_the_problem(tmp_path):
    # a column the held-out files lack: the fit stops with the evaluation's one-line error
    callback = held_out(perturbation=["no_such_column"])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[callback])
    with pytest.raises(DataError, match="no metadata column 'no_such_column' \\(--perturbation\\)"):
        trainer.fit(small_clip(), datamodule=example_datamodule())


def every_epoch_config(tmp_path: Path) -> dict:
    """configs/clip_evaluation.yaml evaluating (and selecting its checkpoint) every epoch, runs in tmp_path."""
    config = yaml.safe_load(CONFIG.read_text())
    for c in config["trainer"]["callbacks"]:
        if c["class_path"].endswith("EvaluationCallback") or str(c["init_args"].get("monitor")).startswith("eval/"):
            c["init_args"]["every_n_epochs"] = 1
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    return config


def test_the_fit_config_selects_its_checkpoint_on_the_evaluation(tmp_path):
    """configs/clip_evaluation.yaml from the command line (every epoch, two epochs, few batches)."""
    config = every_epoch_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    run = tmp_path / "runs" / "clip_evaluation" / "version_0"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics.dropna(subset=[MONITOR])["epoch"].tolist() == [0, 1]
    assert {"best.ckpt", "best_eval.ckpt", "last.ckpt"} <= {p.name for p in (run / "checkpoints").iterdir()}


class DumpEvaluation(Callback):
    """Writes what this process logged from the evaluation callback to ``<folder>/rank<r>.json`` (for the DDP
    test: the CSV logger records the first process only)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        evaluation = next(c for c in trainer.callbacks if isinstance(c, EvaluationCallback))
        best = next(c for c in trainer.checkpoint_callbacks if str(c.monitor).startswith("eval/"))
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval")}
        record = {"latest": evaluation.latest, "logged": logged, "epochs": evaluation.evaluated_epochs,
                  "best": best.best_model_path}
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow  # two processes paying the imports of torch and Lightning: 40-100 s on the 2-core machine
def test_two_ddp_processes_log_the_same_metrics(tmp_path):
    """configs/clip_evaluation.yaml with configs/trainer/ddp.yaml on two gloo processes: the first evaluates,
    the other waits for its broadcast; no deadlock, equal numbers on both, the monitoring checkpoint saved."""
    config = every_epoch_config(tmp_path)
    config["trainer"]["callbacks"].append({"class_path": "tests.test_evaluate_callback.DumpEvaluation",
                                           "init_args": {"folder": str(tmp_path)}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "unimodality", "fit", "--config", str(path), "--config",
         str(ROOT / "configs" / "trainer" / "ddp.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == [0, 1]
    assert MONITOR in ranks[0]["logged"] and ranks[0]["logged"] == ranks[1]["logged"]
    assert ranks[0]["latest"] == ranks[1]["latest"] and len(ranks[0]["latest"]) == 16  # 8 scores and their chance
    assert Path(ranks[0]["best"]).is_file() and ranks[0]["best"] == ranks[1]["best"]
    metrics = pd.read_csv(tmp_path / "runs" / "clip_evaluation" / "version_0" / "metrics.csv")
    assert metrics[MONITOR].dropna().iloc[-1] == pytest.approx(ranks[0]["latest"][MONITOR])
