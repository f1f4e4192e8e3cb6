#!/usr/bin/env bash
# What to run when a GPU is lent, in the order that pays: correctness on real CUDA tensors
# first, then the issue-4 targets, then the planner's GPU term, then the wide sweep.
# Each stage fits one 10-minute device call; everything it makes lands in $OUT (default
# benchmarks/results/gpu_session) with the device, versions and date, to be committed under
# benchmarks/results/.
#
#   bash benchmarks/gpu_session.sh tests      # CUDA kernel tests + compile probe, ~3 min
#   bash benchmarks/gpu_session.sh point      # Llama-3-8B and Gemma-2 heads, DPO: vs Liger/CCE
#   bash benchmarks/gpu_session.sh planner    # planner head term vs max_memory_allocated
#   bash benchmarks/gpu_session.sh sweep      # N and V sweeps (long: split with --modes)
#
# The GPU image already has torch and Triton: the package is installed without dependencies.
set -euo pipefail
stage=${1:?usage: gpu_session.sh tests|point|planner|sweep}
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$out"
export TRITON_INTERPRET=0

pip install --quiet --no-deps --no-build-isolation -e . >/dev/null
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  pip list 2>/dev/null | grep -i -E "liger|cut.cross|transformers" || true
} > "$out/env_$stage.txt" 2>&1

case "$stage" in
  tests)
    python -m pytest -q -rs tests/kernels/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
    python tests/kernels/compile_probe.py > "$out/compile_probe.jsonl" 2>/dev/null || true
    ;;
  point)
    python benchmarks/run.py --preset gpu_point --repeats 5 --tag gpu_point 2>&1 \
      | tee "$out/point.txt"
    cp benchmarks/results/gpu_point.json benchmarks/results/gpu_point.csv "$out/"
    cp benchmarks/results/gpu_point_*.png "$out/" 2>/dev/null || true
    ;;
  planner)
    python -m fused_losses.planner_validate --cuda --json "$out/planner_cuda.json" 2>&1 \
      | tee "$out/planner_cuda.txt"
    ;;
  sweep)
    python benchmarks/run.py --preset gpu --repeats 3 --tag gpu_sweep "${@:2}" 2>&1 \
      | tee "$out/sweep.txt"
    cp benchmarks/results/gpu_sweep.json benchmarks/results/gpu_sweep.csv "$out/"
    ;;
  *)
    echo "unknown stage $stage (tests|point|planner|sweep)" >&2
    exit 2
    ;;
esac
