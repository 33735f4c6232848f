#!/usr/bin/env bash
# Embed a file with a trained checkpoint on Slurm (rows are split over the tasks and written once, in order).
#
#   sbatch slurm/predict.sh CHECKPOINT --data.path cells.h5ad [unimodality predict options ...]
#
#   sbatch slurm/predict.sh runs/clip/slurm-12345/checkpoints/best.ckpt \
#       --data.path wells.parquet --data.output wells_embedded.parquet
#   sbatch --gpus-per-node=0 slurm/predict.sh CHECKPOINT --data.path cells.h5ad --trainer.accelerator cpu
#
# CHECKPOINT may be a DeepSpeed checkpoint directory: it is consolidated into CHECKPOINT-name.consolidated.ckpt
# first (needs the deepspeed package; see docs/clusters.md). Options after CHECKPOINT go to
# `unimodality predict`. Prediction is one pass over the file: a requeued job simply runs it again.
#
# EDIT the #SBATCH lines for your cluster (a line starting with "##" is switched off):
#SBATCH --job-name=unimodality-predict
#SBATCH --nodes=1
# tasks per node = devices (GPUs) per node; one GPU is plenty for most files
#SBATCH --ntasks-per-node=1
# GPUs per node, the same number (--gpus-per-node=0 or delete this line on CPU-only partitions)
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-project
set -euo pipefail

if [[ $# -lt 1 || ! -e $1 ]]; then
    echo "usage: sbatch slurm/predict.sh CHECKPOINT --data.path FILE [unimodality predict options ...]" \
        "(checkpoint '${1:-}' not found)" >&2
    exit 2
fi

# EDIT: make `unimodality` available, e.g. (sbatch passes the submitting shell's environment by default)
# source /path/to/unimodality/.venv/bin/activate

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

# several tasks: DDP splits the rows (Lightning's default strategy is single-device otherwise)
strategy=()
if (( SLURM_NNODES * SLURM_NTASKS_PER_NODE > 1 )); then strategy=(--trainer.strategy ddp); fi

srun --kill-on-bad-exit=1 unimodality predict --ckpt_path "$1" \
    --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" "${strategy[@]}" "${@:2}"
