#!/usr/bin/env bash
# Train on Slurm: one process (task) per device, on one or more nodes; requeued and resumed when preempted.
#
#   sbatch slurm/fit.sh CONFIG [unimodality fit options ...]
#
#   sbatch slurm/fit.sh configs/clip.yaml --config configs/trainer/ddp.yaml
#   sbatch --nodes=4 slurm/fit.sh configs/clip.yaml --trainer.max_epochs 200       # 4 nodes x 4 GPUs
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 \
#       slurm/fit.sh configs/clip.yaml --trainer.accelerator cpu                    # CPU only: 2 gloo processes
#
# Options given to sbatch override the #SBATCH lines below; options after CONFIG go to `unimodality fit` and
# override the config. Slurm's node and task counts become --trainer.num_nodes and --trainer.devices, so
# resize the job here or on the sbatch command line, never in the config.
#
# The run directory is <save_dir>/<name>/slurm-<job id> (e.g. runs/clip/slurm-12345/): the same when the
# job is requeued, so the new job resumes from the newest checkpoint there (see docs/clusters.md).
#
# EDIT the #SBATCH lines for your cluster (a line starting with "##" is switched off):
#SBATCH --job-name=unimodality-fit
# nodes: multi-node DDP needs nothing else
#SBATCH --nodes=1
# tasks per node = devices (GPUs) per node: Lightning runs one process per device
#SBATCH --ntasks-per-node=4
# GPUs per node, the same number (--gpus-per-node=0 or delete this line on CPU-only partitions)
#SBATCH --gpus-per-node=4
# CPU cores per process: the data loader's workers + 1 (also torch's CPU threads, see OMP_NUM_THREADS below)
#SBATCH --cpus-per-task=8
# wall-clock limit: a longer run is requeued and resumes, each part within the limit
#SBATCH --time=24:00:00
# 90 s before the limit Slurm sends SIGUSR1 to every task: Lightning saves <run dir>/hpc_ckpt_<n>.ckpt and
# requeues the job (time enough to write a checkpoint of a large model to a slow file system: raise it if not)
#SBATCH --signal=SIGUSR1@90
# allow requeueing (by the signal above, preemption, a node failure, or `scontrol requeue`)
#SBATCH --requeue
# a requeued job appends to its log instead of overwriting it; the log goes to the directory sbatch ran in
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-project
##SBATCH --mem=0
set -euo pipefail

if [[ $# -lt 1 || ! -f $1 ]]; then
    echo "usage: sbatch slurm/fit.sh CONFIG [unimodality fit options ...]  (config '${1:-}' not found)" >&2
    exit 2
fi

# EDIT: make `unimodality` available, e.g. (sbatch passes the submitting shell's environment by default)
# source /path/to/unimodality/.venv/bin/activate
# module load cuda

# one torch CPU thread per core Slurm gave the task (not one per core of the node, shared by all tasks)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# srun does not inherit --cpus-per-task from sbatch in Slurm 22.05-23.02: pass it on explicitly
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

echo "$(date '+%F %T') job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES} node(s) x" \
    "${SLURM_NTASKS_PER_NODE} task(s) on ${SLURM_JOB_NODELIST}"

# srun starts the tasks; Lightning reads their ranks from Slurm (SLURMEnvironment, auto-requeue on SIGUSR1).
# --kill-on-bad-exit: one failed process ends the others instead of leaving them waiting on a collective.
srun --kill-on-bad-exit=1 unimodality fit --config "$1" \
    --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" "${@:2}"
