#!/usr/bin/env bash
# benchmarks/gpu_figures.sh -- the GPU figures of README and docs/cost.md in one go, on one
# CUDA GPU in bf16 (about 5 min on an H200):
#   1. the default run, `python train.py --config config.yaml` on CUDA with a bf16 base
#      (the embedded base is built on the CPU on first use, or taken from .cache/);
#   2. bench_step.py: one training step of plain LLaVA, Pilot stage 1 and stage 2 at the tiny,
#      the LLaVA-like and the LLaVA-1.5-7B shapes, then 7B at micro-batch 4 x 2,048 tokens,
#      the shape of the `--dry-run` memory estimate in docs/cost.md;
#   3. bench_ctmoa.py, bench_difference_loss.py and bench_ata.py on CUDA;
#   4. the default config for one round of each stage with 4 DataLoader workers (pinned memory);
#   5. the real run's data path on the embedded base: 2,000 LLaVA-JSON records of 336 x 336 JPEGs
#      over 9 clients (`jpeg`: benchmarks/common.write_jpeg_manifest), then `manifest`: 4 workers,
#      gradient checkpointing, one round of each stage, 64 records scored per client and point.
#
#     bash benchmarks/gpu_figures.sh [OUT_DIR]        # default: runs/gpu
#     PEAK_TFLOPS=989 PYTHON=python3 bash benchmarks/gpu_figures.sh   # the GPU's dense bf16 peak, for MFU
#     STEPS="step_7b ata" bash benchmarks/gpu_figures.sh                # only the steps named
#
# OUT_DIR gets all.log (every step's output, with its exit code and seconds), bench.jsonl (the
# benchmarks' JSON lines), gpu.txt (nvidia-smi, torch and transformers versions) and the default
# run's results.md and log.jsonl. Each step has its own time limit, and a step that fails does not
# stop the next; the files are written as the steps finish.

set -u
out=${1:-runs/gpu}
py=${PYTHON:-python}
peak=${PEAK_TFLOPS:-989}          # H100 / H200 SXM: 989 TFLOP/s dense bf16
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."            # the repository root
export PYTHONUNBUFFERED=1
run_dir=$(mktemp -d)               # the default run's checkpoints stay out of OUT_DIR
trap 'rm -rf "$run_dir"' EXIT

step() {                           # step NAME LIMIT_S COMMAND...: run it, log it, keep its JSON lines
    local name=$1 limit=$2; shift 2
    [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
    echo "== $name: $*" >> "$out/all.log"
    local t0; t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.tmp" 2>&1
    local rc=$?
    cat "$out/$name.tmp" >> "$out/all.log"
    grep '^{"benchmark"' "$out/$name.tmp" >> "$out/bench.jsonl"
    rm -f "$out/$name.tmp"
    echo "== $name: rc=$rc seconds=$(( ($(date +%s%N) - t0) / 1000000000 ))" | tee -a "$out/all.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/gpu.txt" 2>&1

step default 300 "$py" train.py --config config.yaml --set model.device=cuda --set model.dtype=bfloat16 \
    --set run_dir="$run_dir/default"
[[ -f "$run_dir/default/results.md" ]] && cp "$run_dir/default/results.md" "$out/default_results.md"
[[ -f "$run_dir/default/log.jsonl" ]] && cp "$run_dir/default/log.jsonl" "$out/default_log.jsonl"
step step_7b 180 "$py" benchmarks/bench_step.py --device cuda --shapes 7b --peak-tflops "$peak"
step step_7b_2048 150 "$py" benchmarks/bench_step.py --device cuda --shapes 7b --batch-size 4 --text-tokens 1472 \
    --peak-tflops "$peak"
step step_small 120 "$py" benchmarks/bench_step.py --device cuda --shapes tiny llava_like --peak-tflops "$peak"
step ctmoa 60 "$py" benchmarks/bench_ctmoa.py --device cuda
step difference_loss 90 "$py" benchmarks/bench_difference_loss.py --device cuda
step ata 90 "$py" benchmarks/bench_ata.py --device cuda
step default_workers 150 "$py" train.py --config config.yaml --set model.device=cuda --set model.dtype=bfloat16 \
    --set data.num_workers=4 --set fed.stage1_rounds=1 --set fed.stage2_rounds=1 --set run_dir="$run_dir/workers"
step jpeg 120 "$py" -c 'import sys; sys.path.insert(0, "benchmarks"); import common
print(common.write_jpeg_manifest(sys.argv[1], 2000))' "$run_dir/jpeg"
step manifest 240 "$py" train.py --config config.yaml --set model.device=cuda --set model.dtype=bfloat16 \
    --set model.gradient_checkpointing=true --set data.scenario=manifest --set data.manifest="$run_dir/jpeg/manifest.yaml" \
    --set data.num_workers=4 --set fed.stage1_rounds=1 --set fed.stage2_rounds=1 --set fed.local_epochs=1 \
    --set fed.eval_max_samples=64 --set run_dir="$run_dir/manifest"
