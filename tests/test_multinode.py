"""Multi-node DDP as Slurm runs it, on one host: two "nodes" of one process each, their ranks from the
environment `srun` sets, train to the same checkpoint as one node with two processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TRAIN = ["fit", "--config", str(CONFIGS / "clip.yaml"), "--config", str(CONFIGS / "trainer" / "ddp.yaml"),
         "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_task(rank: int, port: int) -> dict[str, str]:
    """The environment `srun --nodes=2 --ntasks-per-node=1` gives task ``rank`` (its node is node ``rank``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD"))}
    return env | {
        "SLURM_JOB_ID": "4321", "SLURM_JOB_NAME": "unimodality-fit", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank),
        "SLURM_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def test_two_nodes_of_one_process_train_as_one_node_of_two(tmp_path):
    one_node = subprocess.run(
        [sys.executable, "-m", "unimodality", *TRAIN, "--trainer.devices", "2",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "one")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "unimodality", *TRAIN, "--trainer.num_nodes", "2", "--trainer.devices", "1",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "two")],
            cwd=tmp_path, env=srun_task(rank, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    logs = []
    for node in nodes:
        try:
            logs.append(node.communicate(timeout=600)[0])
        finally:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-2500:] for log in logs)
    assert all("MEMBER: " in log for log in logs) and "MEMBER: 1/2" in logs[0] and "MEMBER: 2/2" in logs[1]

    single = tmp_path / "one" / "clip" / "version_0"
    multi = tmp_path / "two" / "clip" / "slurm-4321"  # the Slurm job's run directory, written by global rank 0
    expected, got = weights(single / "checkpoints" / "last.ckpt"), weights(multi / "checkpoints" / "last.ckpt")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    metrics = [pd.read_csv(d / "metrics.csv").dropna(subset=["val/loss"]) for d in (single, multi)]
    assert list(metrics[0]["epoch"]) == list(metrics[1]["epoch"]) == [0, 1]
    assert metrics[1]["val/loss"].to_numpy() == pytest.approx(metrics[0]["val/loss"].to_numpy(), abs=1e-5)
