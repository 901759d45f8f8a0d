#!/usr/bin/env bash
# Every GPU measurement and GPU test of issue 11 in one command, a few minutes on one GPU (two GPUs add the
# 1 -> 2 process nccl scaling row):
#
#     bash benchmarks/gpu_all.sh            # from the repository root, in an environment with fkdiff[dev] installed
#                                           # against a CUDA torch (and diffusers, as for the CPU benchmark)
#
# Writes benchmarks/results/cifar10_fast_path/cuda.{json,md} (bf16 autocast + channels_last, N = 256 / 1024),
# cuda_compile.{json,md} (the same with torch.compile) and gpu_tests.txt (pytest -m gpu). Stops at the first failure
# of a benchmark; the tests run last and their outcome is kept in the file either way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results/cifar10_fast_path
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_machine.txt"
# eager bf16: teacher forward vs energy+score, DSM vs distillation step (images/s), SMC N = 256 / 1024, scaling
timeout 300 $PY benchmarks/cifar10_fast_path.py --device cuda --batch 128 --particles 256 1024 --repeats 5 \
    --scaling-particles 1024 --out "$OUT/cuda"
# the same with torch.compile of energy+score (scaling left out: compilation per process dominates)
timeout 300 $PY benchmarks/cifar10_fast_path.py --device cuda --batch 128 --particles 256 1024 --repeats 5 \
    --scaling-particles 0 --compile --out "$OUT/cuda_compile" || echo "compile run failed (see above)"
# the GPU tests (CPU vs CUDA SMC within float tolerance, bf16/compile paths, FSDP distillation, ...)
set +e
timeout 600 $PY -m pytest -q -m gpu -p no:randomly 2>&1 | tee "$OUT/gpu_tests.txt"
