"""Experiment trackers for real: a tiny fit with configs/tracking/mlflow.yaml (a local MLflow store) or
configs/tracking/wandb.yaml (W&B offline), then the tracker's own files are read back."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from unimodality.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit_with(tracking: str) -> Path:
    """A tiny CLIP fit with ``configs/tracking/<tracking>.yaml``, in the working directory; its run directory."""
    main(["fit", "--config", str(ROOT / "configs" / "clip.yaml"),
          "--config", str(ROOT / "configs" / "tracking" / f"{tracking}.yaml"), *TINY])
    run = Path("runs/unimodality/version_0")
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()  # the run directory as always
    return run


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("sqlalchemy") is None,
                    reason='MLflow is not installed (pip install "unimodality[mlflow]")')
def test_mlflow_records_runs_metrics_params_and_the_checkpoint(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    run_dir = fit_with("mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("unimodality")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    # MLflow allows no "@" or ">" in names: Lightning logs val/recall@1/tx->ph as val/recall1/tx-ph
    assert {"train/loss", "val/loss", "val/pert/mrr", "val/recall1/tx-ph", "epoch"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert len(history) == 1 and history[0].value > 0
    assert run.data.params["embed_dim"] == "128"
    assert run.data.params["encoders/tx/class_path"] == "unimodality.plugins.encoders.mlp.MLPEncoder"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    files = [f.path for folder in artifacts for f in client.list_artifacts(run.info.run_id, folder)]
    checkpoints = [f for f in files if f.endswith(".ckpt")]
    assert checkpoints, files
    local = Path(client.download_artifacts(run.info.run_id, checkpoints[0], str(tmp_path / "download")))
    assert local.read_bytes() == (run_dir / "checkpoints" / local.name).read_bytes()  # the run's own checkpoint


def _wandb_records(path: Path):
    """The records of a W&B offline run file (``run-<id>.wandb``): LevelDB-style blocks of protobuf records
    (wandb's Python reader of them is gone since its Go core)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason='wandb is not installed (pip install "unimodality[wandb]")')
def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path, monkeypatch):
    import wandb

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        fit_with("wandb")
    finally:
        wandb.finish()  # Lightning leaves the run open; finishing flushes its file
    files = list(tmp_path.glob("runs/wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(tmp_path.rglob("*"))
    history, config, summary = [], {}, {}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        items = {"history": lambda r: r.history.item, "config": lambda r: r.config.update,
                 "summary": lambda r: r.summary.update}.get(kind)
        if items is None:
            continue
        values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items(record)}
        {"history": history.append, "config": config.update, "summary": summary.update}[kind](values)
    assert any("train/loss" in row for row in history), history
    # the last step's row may reach the file only as the run's summary (W&B's core writes it at finish)
    logged = set(summary).union(*history)
    assert {"val/loss", "val/pert/mrr", "val/recall@1/tx->ph"} <= logged, logged  # names kept as they are
    assert summary["val/loss"] > 0
    assert config["embed_dim"] == 128 and config["encoders"]["tx"]["class_path"].endswith("MLPEncoder")
