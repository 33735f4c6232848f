#!/usr/bin/env bash
# The GPU check: what CPU-only CI cannot run, in under ten minutes on one GPU machine.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]         (default: $OUT, else benchmarks/results/gpu_check)
#
# Steps, each with its own time limit (600 s together), none stopping the others:
#   env          nvidia-smi, torch/CUDA/Lightning/DeepSpeed versions
#   bf16_fit     configs/clip.yaml on one GPU in bf16-mixed: finite losses, a checkpoint, predict from it
#   ddp_fit      DDP (NCCL) on every visible GPU (one GPU: a one-process DDP run still initialises NCCL)
#   zero2, zero3 DeepSpeed ZeRO-2 and ZeRO-3 fits, then predict from each checkpoint directory (consolidation)
#   gradcache    peak GPU memory of a large effective batch, plain vs gradient-cached
#   losses       benchmarks/losses.py on the GPU: time and memory against the anchors' formulas
# Results: OUT_DIR/summary.json (step -> status, seconds, figures), one log per step, the benchmarks' JSON.
# Nothing is downloaded: the example data are generated, and the packages must already be installed.
# GPU_CHECK_ACCELERATOR=cpu runs the same steps on CPU (2 gloo processes for DDP, small loss sizes): a dry run
# of the script itself where there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-benchmarks/results/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT_DIR/summary.jsonl"
: > "$SUMMARY"
QUIET=(--trainer.enable_progress_bar false --trainer.enable_model_summary false)
GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
ACCEL=${GPU_CHECK_ACCELERATOR:-gpu}
# the losses with an anchor (the field's code to compare against); every loss at three sizes would not fit
LOSSES=(--losses ClipLoss SigLipLoss HopfieldLoss NTXentLoss)
if [[ $ACCEL == cpu ]]; then DEVICE=cpu; DDP_DEVICES=2; LOSS_BATCH=(256); LOSSES=(--losses ClipLoss); else
    DEVICE=cuda; DDP_DEVICES=$(( GPUS > 0 ? GPUS : 1 )); LOSS_BATCH=(1024 4096 16384); fi

step() {  # step NAME SECONDS COMMAND...: run, time, record status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    # through bash, so that a step may be one of the functions below (exported)
    (cd "$WORK" && timeout "$limit" bash -c '"$@"' step "$@") > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local status=ok
    [[ $rc -eq 124 ]] && status=timeout
    [[ $rc -ne 0 && $rc -ne 124 ]] && status="failed (exit $rc)"
    echo "{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $((SECONDS - start))}" >> "$SUMMARY"
    echo "    $status in $((SECONDS - start)) s (log: $OUT_DIR/$name.log)"
    tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/    | /'
}

ROOT=$(pwd)
fit() {  # fit NAME [options]: a short fit of configs/clip.yaml in $WORK/runs/NAME, then predict from last.ckpt
    local name=$1
    shift
    local quiet
    read -ra quiet <<< "$QUIET_OPTIONS"
    unimodality fit --config "$ROOT/configs/clip.yaml" --trainer.max_epochs 3 "${quiet[@]}" \
        --trainer.logger.init_args.save_dir runs --trainer.logger.init_args.name "$name" \
        --trainer.logger.init_args.version run "$@" || return $?
    local last=runs/$name/run/checkpoints/last.ckpt
    python - "$last" "$name" <<'EOF' || return $?
import math, sys
from pathlib import Path
import pandas as pd
run = Path(sys.argv[1]).parents[1]
metrics = pd.read_csv(run / "metrics.csv")
losses = metrics["val/loss"].dropna()
assert len(losses) == 3 and all(map(math.isfinite, losses)), f"{sys.argv[2]}: validation losses {list(losses)}"
print(f"{sys.argv[2]}: val/loss {list(losses.round(4))}, val/pert/mrr {metrics['val/pert/mrr'].dropna().iloc[-1]:.4f}")
EOF
    unimodality predict --ckpt_path "$last" --data.path example://transcriptomics.h5ad \
        --data.output "$name.h5ad" --trainer.accelerator "$ACCEL" --trainer.devices 1 "${quiet[@]:0:2}"
}

export -f fit
export ROOT ACCEL
export QUIET_OPTIONS="${QUIET[*]}"
step env 30 bash -c 'nvidia-smi; python -c "
import torch, lightning
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpus\", torch.cuda.device_count())
print(\"bf16\", torch.cuda.is_available() and torch.cuda.is_bf16_supported(), \"lightning\", lightning.__version__)
try:
    import deepspeed; print(\"deepspeed\", deepspeed.__version__)
except Exception as e:
    print(\"deepspeed: not importable\", e)
"'
step bf16_fit 90 fit bf16 --trainer.accelerator "$ACCEL" --trainer.devices 1 --trainer.precision bf16-mixed
step ddp_fit 120 fit ddp --config "$ROOT/configs/trainer/ddp.yaml" --trainer.accelerator "$ACCEL" \
    --trainer.devices "$DDP_DEVICES" --trainer.precision bf16-mixed
if [[ $ACCEL != cpu ]] && python -c "import deepspeed" 2>/dev/null; then
    step zero2 90 fit zero2 --config "$ROOT/configs/trainer/deepspeed.yaml" --trainer.devices 1
    step zero3 90 fit zero3 --config "$ROOT/configs/trainer/deepspeed_stage3.yaml" --trainer.devices 1
else
    echo '{"step": "zero2", "status": "skipped: deepspeed not installed"}' >> "$SUMMARY"
    echo '{"step": "zero3", "status": "skipped: deepspeed not installed"}' >> "$SUMMARY"
fi
if [[ -f benchmarks/gradcache.py ]]; then
    step gradcache 60 python "$ROOT/benchmarks/gradcache.py" --device "$DEVICE" --output "$OUT_DIR/gradcache.json"
else
    echo '{"step": "gradcache", "status": "skipped: benchmarks/gradcache.py not present"}' >> "$SUMMARY"
fi
step losses 120 python "$ROOT/benchmarks/losses.py" --device "$DEVICE" --batch "${LOSS_BATCH[@]}" --dim 512 \
    --repeats 5 --no-naive "${LOSSES[@]}" --output "$OUT_DIR/losses.json"

python - "$SUMMARY" "$OUT_DIR/summary.json" <<'EOF'
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
json.dump(steps, open(sys.argv[2], "w"), indent=1)
for s in steps:
    print(f"{s['step']:10s} {s['status']:32s} {s.get('seconds', '')}")
EOF
rm -f "$SUMMARY"
