#!/usr/bin/env bash
# One command for a GPU machine: the Table-2 cost tables on CUDA (fp32 and bf16 autocast for f)
# for MDEQ-Tiny and mdeq_cifar10m, the solver-overhead benchmark on CUDA and, when TorchDEQ is
# importable, the side-by-side comparison. Everything lands under $OUT (default ./gpu_out).
# Needs only a python with torch (+ numpy); matplotlib is optional (cost.png is skipped without it).
#
#   bash benchmarks/gpu.sh                 # from the repository root; ~3-5 min on one H100
#   OUT=/somewhere PYTHON=python3 bash benchmarks/gpu.sh
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh   # smoke test of this script without a GPU
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-./gpu_out}"
DEVICE="${DEVICE:-cuda}"
QUICK="${QUICK:-0}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # no install needed
LOG="$OUT/gpu_sh.log"
status=0
run() {  # run NAME TIMEOUT CMD... : log the command, its time and exit code
  local name="$1" limit="$2"; shift 2
  echo "== $name: $* ($(date -u +%FT%TZ); load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  tail -n 30 "$OUT/$name.txt"
  [ $rc -eq 0 ] || status=1
}
{
  echo "# $(date -u +%FT%TZ) $(uname -n)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} | tee "$LOG"

Q=()
[ "$QUICK" = "1" ] && Q=(--quick)
TINY=(--batch 64 --repeats 5 --warmup 2)
BIG=(--batch 64 --repeats 3 --warmup 1)
run cost_tiny_fp32   150 "$PY" -m phantomdeq cost --model mdeq_tiny --device "$DEVICE" "${TINY[@]}" "${Q[@]}" --out "$OUT/cost_tiny_fp32"
run cost_tiny_bf16   150 "$PY" -m phantomdeq cost --model mdeq_tiny --device "$DEVICE" --amp bf16 "${TINY[@]}" "${Q[@]}" --out "$OUT/cost_tiny_bf16"
run cost_10m_fp32    200 "$PY" -m phantomdeq cost --model mdeq_cifar10m --device "$DEVICE" "${BIG[@]}" "${Q[@]}" --out "$OUT/cost_10m_fp32"
run cost_10m_bf16    200 "$PY" -m phantomdeq cost --model mdeq_cifar10m --device "$DEVICE" --amp bf16 "${BIG[@]}" "${Q[@]}" --out "$OUT/cost_10m_bf16"
SO=(--repeats 7); [ "$QUICK" = "1" ] && SO=(--repeats 1 --batch 2 --iters 3)
run solver_overhead  120 "$PY" benchmarks/solver_overhead.py --device "$DEVICE" "${SO[@]}" --out "$OUT/solver_overhead.json"
VS=(--batch 64 --repeats 5); [ "$QUICK" = "1" ] && VS=(--quick)
run vs_torchdeq      150 "$PY" benchmarks/vs_torchdeq.py --device "$DEVICE" "${VS[@]}" --out "$OUT/vs_torchdeq.json"
echo "done: results in $OUT (status $status)" | tee -a "$LOG"
exit $status
