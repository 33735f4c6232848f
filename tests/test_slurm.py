"""Runs that survive preemption: resuming a run directory from its newest checkpoint (no Slurm needed), and the
slurm/ scripts on a real Slurm cluster (tests marked ``slurm``; start a local one with ``.ci/slurm-up.sh``)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback

from tests.helpers import example_datamodule, quiet_trainer
from unimodality import cli, resume
from unimodality.cli import main
from unimodality.example_data import resolve_path
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.setups.cross_modal import CrossModalSetup

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "configs" / "clip.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
RESUMED = re.compile(r"Resuming run (\S+) from its newest checkpoint (\S+) \(epoch (\d+), global step (\d+)\)")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def steps_per_epoch(metrics: pd.DataFrame) -> int:
    """Optimizer steps in an epoch: validation rows are logged at the epoch's last step (0-based)."""
    return int(metrics.dropna(subset=["val/loss"]).iloc[0]["step"]) + 1


# --- resuming, without Slurm --------------------------------------------------------------------------------


def test_fit_in_a_run_directory_with_checkpoints_resumes_from_the_newest(tmp_path, capsys):
    """Started again in the same run directory (a fixed logger version) with more epochs, fit continues the
    run: global step and epoch go on from last.ckpt, and metrics.csv keeps the first part's rows."""
    run_dir = tmp_path / "runs" / "clip" / "fixed"
    args = ["fit", "--config", str(CLIP), *QUIET, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.logger.init_args.version", "fixed"]
    main([*args, "--trainer.max_epochs", "2"])
    first = load(run_dir / "checkpoints" / "last.ckpt")
    first_metrics = pd.read_csv(run_dir / "metrics.csv")
    assert "Resuming" not in capsys.readouterr().out  # a new directory: nothing to resume
    assert first["epoch"] == 1 and first["global_step"] == 2 * steps_per_epoch(first_metrics)

    main([*args, "--trainer.max_epochs", "4"])
    printed = capsys.readouterr().out
    match = RESUMED.search(printed)
    assert match, printed
    assert match.groups() == (str(run_dir), str(run_dir / "checkpoints" / "last.ckpt"), "1", str(first["global_step"]))

    last = load(run_dir / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 3
    assert last["global_step"] == 2 * first["global_step"]  # two more epochs, not four: it continued
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.dropna(subset=["val/loss"])["epoch"]) == [0, 1, 2, 3]  # each epoch validated once
    assert metrics["step"].is_monotonic_increasing
    # the rows of the first two epochs are still there, unchanged
    kept = metrics[metrics["epoch"] < 2][first_metrics.columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, first_metrics, check_dtype=False)
    # the best checkpoint's tracking went on too: still one best.ckpt, no best-v1.ckpt beside it
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_explicit_ckpt_path_wins_over_the_newest_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "clip" / "fixed"
    args = ["fit", "--config", str(CLIP), *QUIET, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.logger.init_args.version", "fixed", "--trainer.limit_train_batches", "2"]
    main([*args, "--trainer.max_epochs", "1"])
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", tmp_path / "epoch0.ckpt")
    main([*args, "--trainer.max_epochs", "2"])
    capsys.readouterr()
    main([*args, "--trainer.max_epochs", "3", "--ckpt_path", str(tmp_path / "epoch0.ckpt")])
    assert "Resuming run" not in capsys.readouterr().out
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3 * 2  # epoch 0's 2 steps + 2 x 2


def test_newest_checkpoint_of_a_run_directory(tmp_path):
    assert resume.newest_checkpoint(tmp_path / "missing") is None
    assert resume.newest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    files = {}
    for i, name in enumerate(["checkpoints/best.ckpt", "checkpoints/last.ckpt", "hpc_ckpt_1.ckpt",
                              "hpc_ckpt_2.ckpt", "checkpoints/last-step.ckpt"]):
        files[name] = tmp_path / name
        torch.save({"global_step": i}, files[name])
        os.utime(files[name], (1000 + i, 1000 + i))
    assert resume.newest_checkpoint(tmp_path) == files["checkpoints/last-step.ckpt"]
    os.utime(files["checkpoints/last.ckpt"], (2000, 2000))  # rewritten after the job resumed from hpc_ckpt_2
    assert resume.newest_checkpoint(tmp_path) == files["checkpoints/last.ckpt"]
    os.utime(files["checkpoints/best.ckpt"], (3000, 3000))  # best is never resumed from: it may be epochs behind
    assert resume.newest_checkpoint(tmp_path) == files["checkpoints/last.ckpt"]
    # a file cut short by a kill while it was written is passed over, with a warning
    data = files["hpc_ckpt_2.ckpt"].read_bytes()
    files["hpc_ckpt_2.ckpt"].write_bytes(data[: len(data) // 2])
    os.utime(files["hpc_ckpt_2.ckpt"], (4000, 4000))
    with pytest.warns(UserWarning, match="incomplete"):
        assert resume.newest_checkpoint(tmp_path) == files["checkpoints/last.ckpt"]


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "unimodality-fit", "SLURM_NTASKS": "1",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def test_a_slurm_job_trains_in_a_run_directory_named_after_it(tmp_path, monkeypatch, capsys):
    """Under Slurm (faked here: one task), the run directory is slurm-<job id>, Lightning's SIGUSR1 checkpoints
    go there (default_root_dir), and the job started again (a requeue: same id) resumes from it."""
    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    trainers = []
    original = cli.UnimodalityCLI.after_fit
    monkeypatch.setattr(cli.UnimodalityCLI, "after_fit", lambda self: (trainers.append(self.trainer), original(self)))
    args = ["fit", "--config", str(CLIP), *QUIET, "--trainer.limit_train_batches", "2"]
    main([*args, "--trainer.max_epochs", "1"])
    run_dir = Path("runs", "clip", "slurm-4242")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(trainers[0].default_root_dir).resolve() == run_dir.resolve()
    assert [type(c) for c in trainers[0].callbacks].count(resume.SlurmRequeue) == 1
    assert "Resuming" not in capsys.readouterr().out

    main([*args, "--trainer.max_epochs", "2"])
    match = RESUMED.search(capsys.readouterr().out)
    assert match and match.group(1) == str(run_dir) and match.group(4) == "2"
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    # one run directory (beside it, the lock file the running fit held: see run_lock)
    assert sorted(p.name for p in Path("runs", "clip").iterdir()) == [".slurm-4242.lock", "slurm-4242"]


class SignalAt(Callback):
    """Sends this process SIGUSR1 when training batch ``batch`` of epoch ``epoch`` starts (what Slurm does
    before the time limit)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def small_model() -> CrossModalSetup:
    return CrossModalSetup(encoders={"tx": partial(MLPEncoder, hidden_sizes=[32]), "ph": MLPEncoder},
                           loss=ClipLoss(), embed_dim=8, optimizer=partial(torch.optim.SGD, lr=0.05))


def fake_scontrol(tmp_path: Path, monkeypatch, status: int) -> Path:
    """An ``scontrol`` on PATH that records its arguments and exits with ``status``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/scontrol.calls"\nexit {status}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "scontrol.calls"


def test_sigusr1_saves_mid_epoch_requeues_and_the_resumed_run_loses_no_step(tmp_path, monkeypatch):
    datamodule = example_datamodule(batch_size=16)
    reference = quiet_trainer(max_epochs=2, limit_val_batches=0, default_root_dir=tmp_path / "reference")
    reference.fit(small_model(), datamodule=datamodule)

    calls = fake_scontrol(tmp_path, monkeypatch, status=0)
    run_dir = tmp_path / "run"
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, default_root_dir=run_dir,
                            callbacks=[resume.SlurmRequeue("4242"), SignalAt(epoch=1, batch=3)])
    with pytest.raises(SystemExit):  # requeued: every process leaves at once, Slurm restarts the job
        trainer.fit(small_model(), datamodule=datamodule)
    assert calls.read_text().split() == ["requeue", "4242"]
    saved = resume.checkpoint_progress(run_dir / "hpc_ckpt_1.ckpt")
    per_epoch = reference.global_step // 2
    assert saved["epoch"] == 1 and saved["global_step"] == per_epoch + 4  # mid-epoch: after batch 3 of epoch 1

    found = resume.newest_checkpoint(run_dir)
    assert found == run_dir / "hpc_ckpt_1.ckpt"
    resumed = quiet_trainer(max_epochs=2, limit_val_batches=0, default_root_dir=run_dir)
    resumed.fit(small_model(), datamodule=datamodule, ckpt_path=found)
    assert resumed.global_step == reference.global_step  # the rest of epoch 1, not all of it again


def test_sigusr1_on_an_epochs_last_batch_saves_after_its_validation(tmp_path, monkeypatch):
    """A checkpoint from the last batch of an epoch would be taken for one saved after validation, and the
    resumed run would never validate that epoch: the save waits for the next epoch's first batch."""
    fake_scontrol(tmp_path, monkeypatch, status=0)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1, default_root_dir=tmp_path,
                            callbacks=[resume.SlurmRequeue("4242"), SignalAt(epoch=0, batch=3)])
    with pytest.raises(SystemExit):
        trainer.fit(small_model(), datamodule=example_datamodule(batch_size=16))
    saved = resume.checkpoint_progress(tmp_path / "hpc_ckpt_1.ckpt")
    assert (saved["epoch"], saved["global_step"]) == (1, 5)


def test_sigusr1_when_requeue_fails_keeps_training(tmp_path, monkeypatch):
    fake_scontrol(tmp_path, monkeypatch, status=1)
    before = signal.getsignal(signal.SIGUSR1)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[resume.SlurmRequeue("4242"), SignalAt(epoch=0, batch=1)])
    with pytest.warns(UserWarning, match="scontrol requeue 4242` failed"):
        trainer.fit(small_model(), datamodule=example_datamodule(batch_size=16))
    assert (tmp_path / "hpc_ckpt_1.ckpt").is_file()
    assert trainer.current_epoch == 1  # finished the epoch
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is gone with the run


# --- a real Slurm cluster ----------------------------------------------------------------------------------


def _no_cluster() -> str | None:
    """Why the slurm tests cannot run here, or None."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "no Slurm here: sbatch/scontrol not found (as root, .ci/slurm-up.sh starts a local one-node cluster)"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"Slurm controller not reachable ({error}); .ci/slurm-up.sh starts a local cluster"
    if nodes.returncode != 0:
        return f"Slurm controller not reachable ({nodes.stderr.strip()[:300]}); .ci/slurm-up.sh starts a local cluster"
    usable = [line.split() for line in nodes.stdout.splitlines() if line.startswith(("idle", "mix", "alloc"))]
    if not any(int(cpus) >= 2 for _, cpus in usable):
        return f"no Slurm node up with 2 CPUs for 2 tasks (sinfo: {nodes.stdout.strip() or 'no nodes'})"
    return None


NO_CLUSTER = _no_cluster()
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]


def sbatch(script: str, args: list[str], workdir: Path, options: list[str] = CPU_JOB) -> str:
    """Submit ``slurm/<script>`` from ``workdir`` with this Python's ``unimodality`` first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["sbatch", "--parsable", "--export=ALL", f"--chdir={workdir}", f"--output={workdir}/slurm-%j.out",
         *options, str(ROOT / "slurm" / script), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(condition, job: str, workdir: Path, timeout: float, what: str):
    """Poll ``condition()`` until it is true; fail with the job's log when the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if job_info(job).get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.2)
    subprocess.run(["scancel", job], timeout=30)
    pytest.fail(f"{what}: not within {timeout:.0f} s; job {job_info(job)}\n{job_log(job, workdir)[-4000:]}")


def finished(job: str, workdir: Path, timeout: float = 150) -> dict[str, str]:
    wait_for(lambda: job_info(job).get("JobState") == "COMPLETED", job, workdir, timeout, f"job {job} completing")
    return job_info(job)


def job_log(job: str, workdir: Path) -> str:
    path = workdir / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.is_file() else "(no log)"


@pytest.mark.slurm
@pytest.mark.skipif(NO_CLUSTER is not None, reason=str(NO_CLUSTER))
def test_fit_script_trains_with_two_processes_then_predict_script_embeds(tmp_path):
    """slurm/fit.sh: 2 tasks (gloo DDP on CPU) train to completion in runs/clip/slurm-<job id>; then
    slurm/predict.sh embeds a file with 2 tasks from the checkpoint."""
    job = sbatch("fit.sh", [str(CLIP), "--trainer.accelerator", "cpu", "--trainer.max_epochs", "3", *QUIET], tmp_path)
    info = finished(job, tmp_path)
    log = job_log(job, tmp_path)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", log[-3000:]
    assert "MEMBER: 2/2" in log  # two processes, one per task
    run_dir = tmp_path / "runs" / "clip" / f"slurm-{job}"
    assert f"Run directory: runs/clip/slurm-{job}" in log
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert load(checkpoint)["epoch"] == 2
    assert list(pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val/loss"])["epoch"]) == [0, 1, 2]

    output = tmp_path / "embedded.h5ad"
    job = sbatch("predict.sh", [str(checkpoint), "--data.path", "example://transcriptomics.h5ad",
                                "--data.output", str(output), "--trainer.accelerator", "cpu", *QUIET], tmp_path)
    finished(job, tmp_path)
    embedded = ad.read_h5ad(output)
    source = ad.read_h5ad(resolve_path("example://transcriptomics.h5ad"))
    assert list(embedded.obs_names) == list(source.obs_names)  # every row once, in order, across 2 tasks
    assert embedded.obsm["X_unimodality"].shape == (source.n_obs, 128)


@pytest.mark.slurm
@pytest.mark.skipif(NO_CLUSTER is not None, reason=str(NO_CLUSTER))
def test_job_requeued_from_outside_resumes_from_its_last_checkpoint(tmp_path):
    """`scontrol requeue` ends the job with SIGTERM (then SIGKILL): the job saves hpc_ckpt_1.ckpt at the
    signal (or, killed before it could, keeps the last epoch's checkpoints/last.ckpt); the restarted job (same
    id, same run directory) resumes from the newest of them, and ends where an uninterrupted run would."""
    max_epochs = 10
    job = sbatch("fit.sh", [str(CLIP), "--trainer.accelerator", "cpu", "--trainer.max_epochs", str(max_epochs),
                            "--data.batch_size", "16", *QUIET], tmp_path)
    run_dir = tmp_path / "runs" / "clip" / f"slurm-{job}"
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(lambda: resume.checkpoint_progress(last) is not None, job, tmp_path, 120, "first checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    info = finished(job, tmp_path, timeout=180)
    log = job_log(job, tmp_path)
    assert info["Restarts"] == "1", log[-3000:]
    assert "(restart 0)" in log and "(restart 1)" in log
    match = RESUMED.search(log)
    assert match, log[-4000:]
    at_signal = match.group(2) == f"runs/clip/slurm-{job}/hpc_ckpt_1.ckpt"
    assert at_signal or match.group(2) == f"runs/clip/slurm-{job}/checkpoints/last.ckpt", match.group(2)
    assert not at_signal or "SIGTERM: saved" in log
    resumed_epoch, resumed_step = int(match.group(3)), int(match.group(4))
    assert resumed_step > 0 and resumed_epoch < max_epochs - 1  # not from scratch, and with training left
    metrics = pd.read_csv(run_dir / "metrics.csv")
    per_epoch = steps_per_epoch(metrics)
    assert at_signal or resumed_step == (resumed_epoch + 1) * per_epoch  # last.ckpt: an end-of-epoch checkpoint
    final = load(last)
    assert final["epoch"] == max_epochs - 1 and final["global_step"] == max_epochs * per_epoch
    assert list(metrics.dropna(subset=["val/loss"])["epoch"]) == list(range(max_epochs))


@pytest.mark.slurm
@pytest.mark.skipif(NO_CLUSTER is not None, reason=str(NO_CLUSTER))
def test_sigusr1_before_the_time_limit_checkpoints_requeues_and_resumes(tmp_path):
    """What --signal=SIGUSR1@90 does before the time limit (sent here with scancel): both DDP processes save
    hpc_ckpt_1.ckpt mid-epoch together, the job requeues itself and resumes from it, losing no step."""
    max_epochs = 10
    job = sbatch("fit.sh", [str(CLIP), "--trainer.accelerator", "cpu", "--trainer.max_epochs", str(max_epochs),
                            "--data.batch_size", "16", *QUIET], tmp_path)
    run_dir = tmp_path / "runs" / "clip" / f"slurm-{job}"
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(lambda: resume.checkpoint_progress(last) is not None, job, tmp_path, 120, "first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)  # to the job's tasks
    info = finished(job, tmp_path, timeout=180)
    log = job_log(job, tmp_path)
    assert info["Restarts"] == "1", log[-3000:]
    assert f"SIGUSR1: saving a checkpoint and requeueing Slurm job {job}" in log
    match = RESUMED.search(log)
    assert match, log[-4000:]
    assert match.group(2) == f"runs/clip/slurm-{job}/hpc_ckpt_1.ckpt"  # in the run directory, not the job's cwd
    assert not list(tmp_path.glob("hpc_ckpt_*"))
    assert int(match.group(4)) == load(run_dir / "hpc_ckpt_1.ckpt")["global_step"] > 0
    metrics = pd.read_csv(run_dir / "metrics.csv")
    final = load(last)
    assert final["epoch"] == max_epochs - 1 and final["global_step"] == max_epochs * steps_per_epoch(metrics)
    assert list(metrics.dropna(subset=["val/loss"])["epoch"]) == list(range(max_epochs))
