#!/usr/bin/env bash
# On one GPU: benchmark (fp32, bf16, and the plain spec implementation for the ratio), then the full-config
# amazon_beauty run to early stopping. Everything lands in one folder.
#
#   bash gpu_run.sh [OUT_DIR] [extra main.py flags for the full run, e.g. --precision bf16]
set -uo pipefail  # a failed benchmark must not cancel the full run
out=${1:-runs/gpu-$(date +%Y%m%d-%H%M%S)}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } > "$out/environment.txt"

start=$(date +%s)
$python bench.py --dataset amazon_beauty --device cuda --steps 50 --eval_batches 5 --warmup 5 --compare \
    --log_file '' --json "$out/bench_fp32.json" | tee "$out/bench.txt"
$python bench.py --dataset amazon_beauty --device cuda --steps 50 --eval_batches 5 --warmup 5 --precision bf16 \
    --log_file '' --json "$out/bench_bf16.json" | tee -a "$out/bench.txt"
echo "benchmark: $(( $(date +%s) - start ))s" | tee -a "$out/bench.txt"

start=$(date +%s)
$python main.py --dataset amazon_beauty --device cuda --out_dir "$out/amazon_beauty" --log_file '' "$@" \
    > "$out/amazon_beauty.stdout" 2> "$out/amazon_beauty.stderr"
echo "full amazon_beauty run: $(( $(date +%s) - start ))s" | tee -a "$out/bench.txt"
