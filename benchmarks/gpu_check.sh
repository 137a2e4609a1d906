#!/usr/bin/env bash
# One prepared GPU run; everything lands under $OUT (default ./gpu_check_out). Parts (PARTS,
# default "a e f g": issue 13's goals and the CUDA tests, ~4 min on one H100, limits add up to
# 6 min 20 s):
#   (a) tests/test_cuda.py (CPU/CUDA agreement, host syncs, CUDA-graph replay)  -> a_test_cuda.txt
#   (e) solver overhead on the MDEQ-Tiny cell, batch 64: eager, CUDA graph, TorchDEQ beside
#       (e_solver_overhead.json), then torch.compile alone (e_solver_overhead_compile.json:
#       compilation may not fit its limit; the other results do not depend on it)
#   (f) UPG(5, 0.5) vs IFT (Broyden x20 backward) training steps on mdeq_cifar10m, batch 64,
#       eager and CUDA graph, fp32 and bf16 (f_cost_10m_{fp32,bf16}/cost.json): the UPG/IFT
#       and bf16/fp32 speed-ups
#   (g) phantomdeq (eager, CUDA graph) / TorchDEQ step times, MDEQ-Tiny batch 64 (g_vs_torchdeq.json)
# Optional parts of issue 9 (PARTS="a b c d ..."; ~3 more minutes):
#   (b) fp32 vs bf16 (and fp16) training steps of mdeq_cifar10m, real trainer, batch 128
#                                                -> b_steps_cifar10m.{txt,json}
#   (c) a 2-epoch mdeq_tiny_cifar10 run in bf16 on CIFAR-shaped generated data written in the
#       real pickled on-disk format              -> c_tiny_cifar10_bf16.{txt,json}
#   (d) the digits recipe, 2 epochs, fp32 and bf16 (the accuracy comparison the CPU suite can
#       only afford on a subset; checked: within 2 points) -> d_digits_{fp32,bf16}.{txt,json}
# Needs a python with torch and this package's dependencies (PyYAML, scikit-learn for digits;
# TorchDEQ 0.1.0 for the comparisons, e.g. a wheel in .whl/, installed with --no-deps); the
# package is used from src/ (no install).
#
#   bash benchmarks/gpu_check.sh                       # on a CUDA machine
#   OUT=/somewhere PYTHON=python3 PARTS="a e f g b" bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --cpu-smoke           # the same steps, shrunk, on CPU
#                                                      # (no CUDA graphs there)
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-./gpu_check_out}"
SMOKE=0; SCALE=1
PARTS=" ${PARTS:-a e f g} "
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1 && SCALE=3   # low precision is slow on CPUs
want() { [[ "$PARTS" == *" $1 "* ]]; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import torchdeq" 2> /dev/null && ls .whl/torchdeq*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/torchdeq*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
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
  echo "# $(date -u +%FT%TZ) $(uname -n) smoke=$SMOKE parts=$PARTS"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee "$LOG"

if [ $SMOKE = 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  DEV=cpu; PER_BATCH=16; TEST=16; STEP_BATCH=4; STEPS=3; PREC=fp32,bf16,fp16
  SO=(--batch 2 --size 8 --iters 4 --repeats 2); SO_MODES=eager; SO_CELLS=light,mdeq
  COST=(--model mdeq_tiny --batch 2 --fwd-iters 3 --bwd-iters 3 --repeats 1 --warmup 0 --no-memory)
  COST_MODES=eager
  VS=(--quick --models mdeq_tiny); VS_MODES=eager
  TINY=(--set data.train_size=16 --set data.test_size=8 --set data.batch_size=8
        --set data.eval_batch_size=8 --set solver.max_iter=2 --set eval_solver.max_iter=2
        --set grad.k=2 --set train.bn_recalibration_batches=1)
  STEPSET=(--set model.name=mdeq_tiny --set solver.max_iter=2 --set eval_solver.max_iter=2
           --set grad.k=2)
  DIGITS=(--set data.train_size=64 --set data.test_size=32 --set data.batch_size=32
          --set solver.max_iter=3 --set eval_solver.max_iter=3)
else
  DEV=cuda; PER_BATCH=2000; TEST=2000; STEP_BATCH=128; STEPS=12; PREC=fp32,bf16,fp16
  SO=(--batch 64 --repeats 9); SO_MODES=eager,graph; SO_CELLS=mdeq
  COST=(--model mdeq_cifar10m --batch 64 --repeats 5 --warmup 2 --no-memory)
  COST_MODES=eager,graph
  VS=(--models mdeq_tiny --batch 64 --repeats 5); VS_MODES=eager,graph
  TINY=(); STEPSET=(); DIGITS=()
fi
COMMON=(--set "train.device=$DEV" --set log.progress=false --set log.tensorboard=false --set log.plot=false)

# (a) the CUDA tests (on CPU only the CPU-runnable one runs, the rest skip)
want a && run a_test_cuda 60 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py

# (e) solver overhead: eager, CUDA graph (and TorchDEQ), then torch.compile on its own
if want e; then
  run e_solver_overhead 45 "$PY" benchmarks/solver_overhead.py --device "$DEV" --cells "$SO_CELLS" \
    --modes "$SO_MODES" --torchdeq "${SO[@]}" --out "$OUT/e_solver_overhead.json"
  run e_solver_overhead_compile 100 "$PY" benchmarks/solver_overhead.py --device "$DEV" \
    --cells "$SO_CELLS" --modes eager,compile "${SO[@]}" --out "$OUT/e_solver_overhead_compile.json"
fi

# (f) UPG(5, 0.5) vs IFT(Broyden x20) steps on mdeq_cifar10m, fp32 and bf16, eager and graph
if want f; then
  for amp in none bf16; do
    tag=$([ $amp = none ] && echo fp32 || echo bf16)
    run "f_cost_10m_$tag" 50 "$PY" -m phantomdeq cost --device "$DEV" --amp "$amp" "${COST[@]}" \
      --methods ift_broyden,upg_k5 --modes "$COST_MODES" --out "$OUT/f_cost_10m_$tag"
  done
  # the two speed-ups of issue 13, read from the two runs
  "$PY" - "$OUT" > "$OUT/f_check.txt" 2>&1 <<'PYEOF' || status=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
recs = {}
for tag in ("fp32", "bf16"):
    path = out / f"f_cost_10m_{tag}" / "cost.json"
    if path.is_file():
        for r in json.loads(path.read_text())["records"]:
            recs[(tag, r["mode"], r["method"])] = r["step_ms"]
for (tag, mode, method), ms in sorted(recs.items()):
    if method == "upg_k5" and (tag, mode, "ift_broyden") in recs:
        print(f"{tag} {mode}: UPG(5, 0.5) step {ms:.1f} ms, IFT(Broyden x20) "
              f"{recs[(tag, mode, 'ift_broyden')]:.1f} ms: UPG {recs[(tag, mode, 'ift_broyden')] / ms:.2f}x faster (goal 1.8)")
    if tag == "bf16" and ("fp32", mode, method) in recs:
        print(f"{mode} {method}: bf16 step {ms:.1f} ms vs fp32 {recs[('fp32', mode, method)]:.1f} ms: "
              f"{recs[('fp32', mode, method)] / ms:.2f}x (goal 1.5)")
PYEOF
  tee -a "$LOG" < "$OUT/f_check.txt"
fi

# (g) phantomdeq / TorchDEQ step times (goal <= 0.6 for UPG and IFT)
want g && run g_vs_torchdeq 75 "$PY" benchmarks/vs_torchdeq.py --device "$DEV" "${VS[@]}" \
  --modes "$VS_MODES" --out "$OUT/g_vs_torchdeq.json"

# (b) + (c) CIFAR-shaped data in the real format (issue 9, optional)
if want b || want c; then
  "$PY" benchmarks/gpu_check.py make-cifar "$WORK/cifar" --train-per-batch "$PER_BATCH" --test "$TEST" >> "$LOG" 2>&1 || status=1
fi
want b && run b_steps_cifar10m 110 "$PY" benchmarks/gpu_check.py steps --config configs/mdeq_cifar10m.yaml \
  --data "$WORK/cifar" --precisions "$PREC" --steps "$STEPS" --batch "$STEP_BATCH" --device "$DEV" \
  --work "$WORK/runs" --out "$OUT/b_steps_cifar10m.json" "${STEPSET[@]}"
if want c; then
  run c_tiny_cifar10_bf16 80 "$PY" benchmarks/gpu_check.py run --config configs/mdeq_tiny_cifar10.yaml \
    --out-dir "$WORK/runs/tiny_cifar10_bf16" --json "$OUT/c_tiny_cifar10_bf16.json" \
    --set "data.root=$WORK/cifar" --set train.epochs=2 --set train.precision=bf16 "${COMMON[@]}" "${TINY[@]}"
  cp "$WORK/runs/tiny_cifar10_bf16/metrics.jsonl" "$OUT/c_tiny_cifar10_bf16.metrics.jsonl" 2> /dev/null
fi

# (d) digits, 2 epochs, fp32 vs bf16 (issue 9, optional)
if want d; then
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
fi
rm -rf "$WORK"
echo "done: results in $OUT (status $status)" | tee -a "$LOG"
exit $status
