#!/usr/bin/env bash
# One short run on a lent GPU machine (16 cores, otherwise idle): the CUDA tests and the GPU
# solver overhead, and -- in parallel, each pinned to 2 dedicated cores -- the CPU benchmarks
# that this project's shared 2-core machine is too noisy for. Results under $OUT.
#   OUT=dir bash benchmarks/device_check.sh     (TorchDEQ wheel in .whl/ if present)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./device_out}"
mkdir -p "$OUT" /tmp/dc
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
{ date -u; lscpu | grep -E "Model name|^CPU\(s\)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"; } > /tmp/dc/00_machine.txt 2>&1
cpu() {  # cpu CORES NAME LIMIT CMD...
  local cores="$1" name="$2" limit="$3"; shift 3
  (taskset -c "$cores" env OMP_NUM_THREADS=2 timeout "$limit" "$@" > "/tmp/dc/$name.txt" 2>&1
   echo "rc=$?" >> "/tmp/dc/$name.txt") &
}
cpu 0,1 10_solver_overhead_cpu 170 python3 benchmarks/solver_overhead.py --repeats 7 --out "$OUT/solver_overhead_cpu.json"
cpu 2,3 20_cost_cpu 185 python3 -m phantomdeq cost --model mdeq_tiny --batch 64 --device cpu --threads 2 \
  --methods ift_broyden,ift_fixed_point,upg_k5,npg_k5,onestep --repeats 3 --warmup 1 --no-memory --out /tmp/dc/cost_cpu
cpu 4,5 30_vs_torchdeq_conv 185 python3 benchmarks/vs_torchdeq.py --device cpu --models conv --batch 64 --repeats 3 --threads 2 --out "$OUT/vs_torchdeq_conv_cpu.json"
cpu 6,7 40_vs_torchdeq_mdeq 185 python3 benchmarks/vs_torchdeq.py --device cpu --models mdeq_tiny --batch 32 --repeats 3 --threads 2 --out "$OUT/vs_torchdeq_mdeq_cpu.json"
taskset -c 8-15 timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > /tmp/dc/50_test_cuda.txt 2>&1; echo "rc=$?" >> /tmp/dc/50_test_cuda.txt
taskset -c 8-15 timeout 60 python3 benchmarks/solver_overhead.py --device cuda --repeats 9 --out "$OUT/solver_overhead_cuda.json" > /tmp/dc/60_solver_overhead_cuda.txt 2>&1
wait
cp /tmp/dc/cost_cpu/cost.json "$OUT/cost_cpu.json" 2> /dev/null
for f in /tmp/dc/*.txt; do echo "=== $(basename "$f")"; cat "$f"; done > "$OUT/log.txt"
cat "$OUT/log.txt"
