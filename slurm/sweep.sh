#!/usr/bin/env bash
# A sweep on Slurm: one array task per point of the sweep file, each trained like slurm/fit.sh trains a run
# (one process per device, on one or more nodes), requeued and resumed when preempted.
#
#   sbatch --array=0-<points - 1> slurm/sweep.sh SWEEP [-- unimodality fit options ...]
#
#   unimodality sweep configs/sweeps/clip_grid.yaml --list     # the points, and the sbatch line to run them
#   sbatch --array=0-3 slurm/sweep.sh configs/sweeps/clip_grid.yaml
#   sbatch --array=0-3%2 slurm/sweep.sh configs/sweeps/clip_grid.yaml      # at most 2 points at a time
#   sbatch --array=0-3 --gpus-per-node=0 --ntasks-per-node=1 \
#       slurm/sweep.sh configs/sweeps/clip_grid.yaml -- --trainer.accelerator cpu
#   sbatch --array=0-3 --ntasks-per-node=1 --gpus-per-node=1 \
#       slurm/sweep.sh configs/sweeps/clip_search.yaml --trials 2      # an Optuna search: 4 tasks x 2 trials
#
# Point i trains in <save_dir>/<name>/<point name>/ (e.g. runs/clip_grid/002-lr=0.001-embed_dim=64/): the same
# directory whatever the job id, so a requeued or resubmitted point resumes from its newest checkpoint, and a
# completed one is trained again only if asked (--rerun). Options before `--` go to `unimodality sweep`,
# options after it to every point's `unimodality fit`. Then: unimodality compare runs/clip_grid
#
# EDIT the #SBATCH lines for your cluster (a line starting with "##" is switched off); they apply to each point:
#SBATCH --job-name=unimodality-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
# one log per point: <array job id>_<task id>
#SBATCH --output=slurm-%x-%A_%a.out
##SBATCH --partition=gpu
##SBATCH --account=my-project
set -euo pipefail

if [[ $# -lt 1 || ! -f $1 ]]; then
    echo "usage: sbatch --array=0-<points - 1> slurm/sweep.sh SWEEP [sweep options] [-- fit options]  (sweep file '${1:-}' not found)" >&2
    exit 2
fi
if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "slurm/sweep.sh runs one point per array task: submit it with --array (\`unimodality sweep $1 --list\` prints the line)" >&2
    exit 2
fi

# EDIT: make `unimodality` available, e.g.
# source /path/to/unimodality/.venv/bin/activate

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

sweep=$1
shift
sweep_options=()
while [[ $# -gt 0 && $1 != "--" ]]; do sweep_options+=("$1"); shift; done
[[ $# -gt 0 ]] && shift  # the "--"

echo "$(date '+%F %T') job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (restart ${SLURM_RESTART_COUNT:-0}): point" \
    "${SLURM_ARRAY_TASK_ID} of ${sweep}, ${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE} task(s)"

srun --kill-on-bad-exit=1 unimodality sweep "$sweep" --task "$SLURM_ARRAY_TASK_ID" "${sweep_options[@]}" \
    -- --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" "$@"
