#!/usr/bin/env bash
# One prepared GPU check (issue 9, item 6); everything lands under $OUT (default ./gpu_check_out):
#   (a) tests/test_cuda.py                       -> a_test_cuda.txt
#   (b) fp32 vs bf16 (and fp16) training steps of mdeq_cifar10m, real trainer, batch 128
#                                                -> b_steps_cifar10m.{txt,json}
#   (c) a 2-epoch mdeq_tiny_cifar10 run in bf16 on CIFAR-shaped generated data written in the
#       real pickled on-disk format              -> c_tiny_cifar10_bf16.{txt,json}
#   (d) the digits recipe, 2 epochs, fp32 and bf16 (the accuracy comparison the CPU suite can
#       only afford on a subset; checked: within 2 points) -> d_digits_{fp32,bf16}.{txt,json}
# Needs a python with torch and this package's dependencies (PyYAML, scikit-learn for digits);
# the package is used from src/ (no install). About 3 minutes on one H100; the per-step time
# limits add up to 6 min 10 s at worst.
#
#   bash benchmarks/gpu_check.sh                       # on a CUDA machine
#   OUT=/somewhere PYTHON=python3 bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --cpu-smoke           # the same steps, shrunk, on CPU
#                                                      # (b) with mdeq_tiny; ~10 min on 2 cores
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-./gpu_check_out}"
SMOKE=0; SCALE=1
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1 && SCALE=3   # low precision is slow on CPUs
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
LOG="$OUT/gpu_check.log"
status=0
run() {  # run NAME TIMEOUT CMD... : log the command, its wall time and exit status
  local name="$1" limit=$(($2 * SCALE)); shift 2
  echo "== $name: $* ($(date -u +%FT%TZ))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  tail -n 15 "$OUT/$name.txt" | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
}
{
  echo "# $(date -u +%FT%TZ) $(uname -n) smoke=$SMOKE"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee "$LOG"

if [ $SMOKE = 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  DEV=cpu; PER_BATCH=16; TEST=16; STEP_BATCH=4; STEPS=3; PREC=fp32,bf16,fp16
  TINY=(--set data.train_size=16 --set data.test_size=8 --set data.batch_size=8
        --set data.eval_batch_size=8 --set solver.max_iter=2 --set eval_solver.max_iter=2
        --set grad.k=2 --set train.bn_recalibration_batches=1)
  STEPSET=(--set model.name=mdeq_tiny --set solver.max_iter=2 --set eval_solver.max_iter=2
           --set grad.k=2)
  DIGITS=(--set data.train_size=64 --set data.test_size=32 --set data.batch_size=32
          --set solver.max_iter=3 --set eval_solver.max_iter=3)
else
  DEV=cuda; PER_BATCH=2000; TEST=2000; STEP_BATCH=128; STEPS=12; PREC=fp32,bf16,fp16
  TINY=(); STEPSET=(); DIGITS=()
fi
COMMON=(--set "train.device=$DEV" --set log.progress=false --set log.tensorboard=false --set log.plot=false)

# (a) the CUDA tests (on CPU only the CPU-runnable one runs, the rest skip)
run a_test_cuda 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py

# (b) + (c) CIFAR-shaped data in the real format
"$PY" benchmarks/gpu_check.py make-cifar "$WORK/cifar" --train-per-batch "$PER_BATCH" --test "$TEST" >> "$LOG" 2>&1 || status=1
run b_steps_cifar10m 110 "$PY" benchmarks/gpu_check.py steps --config configs/mdeq_cifar10m.yaml \
  --data "$WORK/cifar" --precisions "$PREC" --steps "$STEPS" --batch "$STEP_BATCH" --device "$DEV" \
  --work "$WORK/runs" --out "$OUT/b_steps_cifar10m.json" "${STEPSET[@]}"
run c_tiny_cifar10_bf16 80 "$PY" benchmarks/gpu_check.py run --config configs/mdeq_tiny_cifar10.yaml \
  --out-dir "$WORK/runs/tiny_cifar10_bf16" --json "$OUT/c_tiny_cifar10_bf16.json" \
  --set "data.root=$WORK/cifar" --set train.epochs=2 --set train.precision=bf16 "${COMMON[@]}" "${TINY[@]}"
cp "$WORK/runs/tiny_cifar10_bf16/metrics.jsonl" "$OUT/c_tiny_cifar10_bf16.metrics.jsonl" 2> /dev/null

# (d) digits, 2 epochs, fp32 vs bf16
for p in fp32 bf16; do
  run "d_digits_$p" 45 "$PY" benchmarks/gpu_check.py run --config configs/mdeq_tiny_digits.yaml \
    --out-dir "$WORK/runs/digits_$p" --json "$OUT/d_digits_$p.json" \
    --set train.epochs=2 --set "train.precision=$p" "${COMMON[@]}" "${DIGITS[@]}"
done

# the criterion of tests/test_precision.py::test_bf16_digits_two_epochs_within_two_points_of_fp32
# (on the shrunk --cpu-smoke runs the numbers are printed, not judged)
"$PY" - "$OUT" > "$OUT/d_check.txt" 2>&1 <<'PYEOF' || [ $SMOKE = 1 ] || status=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
acc = {p: json.loads((out / f"d_digits_{p}.json").read_text())["test_acc"] for p in ("fp32", "bf16")}
ok = abs(acc["bf16"] - acc["fp32"]) <= 0.02
print(f"digits 2 epochs: fp32 {100 * acc['fp32']:.2f} %, bf16 {100 * acc['bf16']:.2f} %: "
      f"{'within' if ok else 'NOT within'} 2 points")
sys.exit(0 if ok else 1)
PYEOF
tee -a "$LOG" < "$OUT/d_check.txt"
rm -rf "$WORK"
echo "done: results in $OUT (status $status)" | tee -a "$LOG"
exit $status
