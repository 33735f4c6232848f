"""Runs that survive preemption: a run directory that is the same across Slurm requeues, the newest
checkpoint in it to resume from, a DDP-safe checkpoint-and-requeue on Slurm's signal, and DeepSpeed
checkpoint directories made loadable without DeepSpeed.

How a Slurm run resumes (see docs/clusters.md):

* Slurm sends SIGUSR1 to every task shortly before the time limit (``#SBATCH --signal=SIGUSR1@90``).
  `SlurmRequeue` then has all processes save ``hpc_ckpt_<n>.ckpt`` together and requeues the job with
  ``scontrol requeue``. It saves into ``trainer.default_root_dir``, where Lightning also looks for HPC
  checkpoints, and the CLI sets that to the run directory (by default it is the job's working directory,
  shared by every job started there).
* A job requeued from outside (``scontrol requeue``, a node failure) gets no signal: what it has is the
  ``checkpoints/last.ckpt`` written at the end of each epoch.
* Either way the job starts again with the same ``SLURM_JOB_ID``, so its run directory
  (``<save_dir>/<name>/slurm-<job id>``) is the same, and ``fit`` resumes from the newest checkpoint in it.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

#: file names, relative to a run directory, of the checkpoints ``fit`` may resume from
RESUMABLE = ("hpc_ckpt_*.ckpt", "checkpoints/last.ckpt", "checkpoints/last-*.ckpt")


def slurm_job_id() -> str | None:
    """The id of the Slurm job this process is a task of, the same when the job is requeued; ``None``
    outside a Slurm job.

    Uses Lightning's own test for "launched by Slurm" (``SLURM_NTASKS`` set and the job not named ``bash``
    or ``interactive``), so the run directory is pinned exactly when Lightning's ``SLURMEnvironment`` is in
    charge. An array task is ``<array job id>_<task id>``.
    """
    if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_version() -> str | None:
    """The logger version (run directory name) of this Slurm job: ``slurm-<job id>``."""
    job_id = slurm_job_id()
    return f"slurm-{job_id}" if job_id else None


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written checkpoint of ``run_dir`` that ``fit`` can resume from, or ``None``.

    Candidates are Lightning's SIGUSR1 checkpoints ``hpc_ckpt_<n>.ckpt`` and ``checkpoints/last.ckpt`` (plus
    ``checkpoints/last-*.ckpt``, e.g. a step-interval checkpoint a user adds); ``best.ckpt`` is not one,
    since it may be epochs behind. Newest by modification time: after resuming from an HPC checkpoint,
    training goes on and ``last.ckpt`` is rewritten later, so it is the one holding the most training.
    A file cut short (the job was killed while writing it) is skipped with a warning, for the next newest.
    A DeepSpeed checkpoint (a directory) counts too.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = {path for pattern in RESUMABLE for path in run_dir.glob(pattern)}
    for path in sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True):
        if path.is_dir() or _complete(path):
            return path
        rank_zero_warn(f"{path} is incomplete (a job killed while writing it?): not resuming from it")
    return None


def _complete(path: Path) -> bool:
    """Whether a checkpoint file was written to the end: torch.save writes a zip archive, whose directory
    comes last (reading it does not read the weights)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_progress(path: str | Path) -> dict[str, int] | None:
    """``{"epoch", "global_step", "logged_step"}`` of a checkpoint file (``logged_step``: the step loggers
    were at, which differs from ``global_step`` with several optimizers); ``None`` when unreadable or a
    directory (DeepSpeed)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:  # memory-mapped: reading three integers does not load the weights
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    global_step = int(checkpoint.get("global_step", 0))
    return {
        "epoch": int(checkpoint.get("epoch", 0)),
        "global_step": global_step,
        "logged_step": int(epoch_loop.get("_batches_that_stepped", global_step)),
    }


def keep_csv_metrics(logger: Any, resume_step: int | None) -> int:
    """Keep the rows of the run's ``metrics.csv`` logged before the checkpoint being resumed from.

    Lightning's CSV logger deletes an existing ``metrics.csv`` when it opens a run directory again, which
    would lose the history of the run up to the requeue. The old rows with a step before ``resume_step``
    are handed to the new writer (rows after it are dropped: that training is redone, and logged again);
    ``resume_step=None`` keeps every row. Returns how many rows were kept. Call on rank 0 only.
    """
    from lightning.pytorch.loggers import CSVLogger

    if not isinstance(logger, CSVLogger):
        return 0
    path = Path(logger.log_dir) / "metrics.csv"
    rows: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
    with warnings.catch_warnings():  # "... Previous log files in this directory will be deleted": handled here
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        writer = logger.experiment  # creating the writer deletes metrics.csv
    if resume_step is not None:
        rows = [row for row in rows if _step(row) is not None and _step(row) < resume_step]
    if rows:
        writer.metrics = [{k: v for k, v in row.items() if v not in ("", None)} for row in rows] + writer.metrics
        writer.save()
    return len(rows)


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step", "")))
    except ValueError:
        return None


class SlurmRequeue(Callback):
    """On Slurm's requeue signal (SIGUSR1), save ``<run dir>/hpc_ckpt_<n>.ckpt`` and requeue the job, with
    every process at the same point of training.

    This replaces Lightning's own SIGUSR1 handler (it is installed first, so Lightning leaves the signal
    alone), which saves the checkpoint from *inside* the signal handler. Under DDP, Slurm signals every
    task, and each one runs the handler wherever it happens to be: one process then waits in the
    checkpoint's barrier while another waits in a gradient all-reduce, and the job hangs until it is killed,
    unrequeued (seen with 2 gloo processes on a local Slurm). Here the handler only raises a flag; after
    each training batch the processes agree on it (one all-reduce of a flag, as Lightning already does for
    SIGTERM) and then checkpoint together. Saved with the same file name and place as Lightning's, so
    Lightning's own ``ckpt_path="hpc"`` finds it as well.
    """

    def __init__(self, job_id: str, signum: int = signal.SIGUSR1) -> None:
        self.job_id = job_id
        self.signum = signum
        self.requested = False
        self._active = False
        self._previous: Any = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._active:
            self.requested = True
            return
        # still installed after its run (after an exception, Lightning's teardown puts back the handlers it found
        # at the start, this one among them): hand the signal to the handler that was there before
        signal.signal(signum, self._previous if self._previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # runs before the trainer registers its signal handlers: a handler already set keeps it from adding its own
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._on_signal)
            self._active = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._uninstall()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        if self._active and threading.current_thread() is threading.main_thread():
            self._active = False
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # not before this epoch's validation: Lightning takes a checkpoint saved on an epoch's last batch for
            # one saved after validation (as ModelCheckpoint's are) and would skip validating that epoch. The
            # next epoch's first batch checks instead (the same batch on every process: no collective here).
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = False
        name = signal.Signals(self.signum).name
        rank_zero_info(f"{name}: saving a checkpoint and requeueing Slurm job {self.job_id}")
        path = save_interruption_checkpoint(trainer, Path(trainer.default_root_dir))
        requeued = False
        if trainer.is_global_zero:
            try:
                result = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True)
                requeued, why = result.returncode == 0, result.stderr.strip() or f"exit status {result.returncode}"
            except OSError as error:  # no scontrol on this node's PATH
                requeued, why = False, str(error)
            if requeued:
                rank_zero_info(f"Saved {path} and requeued Slurm job {self.job_id}: it will resume from there")
            else:
                rank_zero_warn(
                    f"Saved {path}, but `scontrol requeue {self.job_id}` failed ({why}): training goes on until "
                    f"the time limit; to continue after it, submit again with --ckpt_path {path}"
                )
        if trainer.strategy.broadcast(requeued):
            # Slurm now ends this job (SIGTERM, then SIGKILL): every process leaves here, together, rather than
            # train on into the kill. Not `trainer.should_stop`: that would end the epoch early and save last.ckpt
            # as if the whole epoch had been trained.
            raise Requeued()


class Requeued(SIGTERMException):
    """Training stopped because the Slurm job was requeued (a success: the next job resumes it)."""


_HPC = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def save_interruption_checkpoint(trainer: Trainer, run_dir: Path) -> str:
    """Save ``run_dir/hpc_ckpt_<n>.ckpt`` (the next free ``n``), the name ``fit`` resumes from; collective:
    every process must call it."""
    for logger in trainer.loggers:  # metrics logged so far go to disk with the checkpoint
        logger.save()
    numbers = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt") if (m := _HPC.fullmatch(p.name))]
    path = trainer.strategy.broadcast(str(run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"))
    trainer.save_checkpoint(path)
    return path


class SigtermCheckpoint(Callback):
    """On SIGTERM (a scheduler cancelling or preempting the job, ``kill``), save a checkpoint to resume from
    in the run directory; the CLI then exits with status 143, as a process killed by SIGTERM does.

    Lightning stops training on SIGTERM by raising a ``SystemExit`` without a status, which a scheduler
    records as a success. With several processes they agree after each batch, so all save together; a stop
    Lightning raises on its own is saved from a single process only (a collective save could hang there).
    """

    def __init__(self) -> None:
        self.saved: str | None = None

    def _save(self, trainer: Trainer) -> None:
        log_dir = trainer.log_dir  # collective under DDP: every process is here
        self.saved = save_interruption_checkpoint(trainer, Path(log_dir or trainer.default_root_dir))
        rank_zero_info(f"SIGTERM: saved {self.saved}")

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # see SlurmRequeue.on_train_batch_end
            return
        stop = trainer.received_sigterm
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and self.saved is None:
            self._save(trainer)
            raise SIGTERMException()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if type(exception) is SIGTERMException and self.saved is None and trainer.world_size == 1:
            self._save(trainer)


# --- DeepSpeed checkpoints ----------------------------------------------------------------------------------


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint: a directory (Lightning names it like a file, ``last.ckpt``)
    holding a ``latest`` tag file or per-rank ``*model_states.pt`` shards."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def consolidated_checkpoint(path: str | Path) -> Path:
    """A single-file fp32 Lightning checkpoint of the DeepSpeed checkpoint directory ``path``.

    Written once, next to the directory, as ``<name>.consolidated.ckpt`` (rewritten when the directory is
    newer), by Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``: ZeRO shards are gathered into
    full fp32 weights and Lightning's state (hyperparameters, datamodule settings) is kept, so the result
    loads anywhere, without DeepSpeed or GPUs. The conversion itself needs the ``deepspeed`` package.
    """
    path = Path(path)
    output = path.with_name(path.name.removesuffix(".ckpt") + ".consolidated.ckpt")
    newest_shard = max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0)
    if output.is_file() and output.stat().st_mtime >= newest_shard:
        return output
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise DeepSpeedMissing(
            f"{path} is a DeepSpeed checkpoint (a directory of ZeRO shards). Using it needs its shards "
            "consolidated into one fp32 file, which needs the deepspeed package: `pip install "
            '"unimodality[deepspeed]"` (a CUDA machine is not required for this step), or consolidate it '
            'where deepspeed is installed with `python -c "from lightning.pytorch.utilities.deepspeed import '
            f"convert_zero_checkpoint_to_fp32_state_dict as c; c('{path}', '{output}')\"` and pass "
            f"--ckpt_path {output}."
        ) from None
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    convert_zero_checkpoint_to_fp32_state_dict(path, output)
    return output


class DeepSpeedMissing(RuntimeError):
    """A DeepSpeed checkpoint or strategy was asked for where deepspeed (or CUDA) is not available."""
