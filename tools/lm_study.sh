#!/usr/bin/env bash
# The DEQ language-model study on Tiny Shakespeare (EXPERIMENTS.md, "DEQ language models"):
# validation loss against training time for the DEQ-Transformer with UPG(5, 0.5) and the
# explicit 4-block Transformer (3 seeds each), the DEQ with NPG(5, 0.5) and with IFT (1 seed
# each), and the explicit model on the reference 2,000-step schedule (1 seed). Each run has one
# thread and a step budget sized to about 7.5 CPU-minutes at the step times measured in a pilot
# (CPU seconds per step: explicit 0.092, DEQ-UPG 0.19-0.23, DEQ-IFT 0.32-0.35): DEQ-UPG and NPG
# 2,000 steps (the reference schedule), IFT 1,500, explicit 4,250; two runs at a time.
#   bash tools/lm_study.sh [RUNS_DIR]        (default runs/lm_study; about 35 min on 2 idle cores)
#   python tools/lm_study.py RUNS_DIR         (collects results/lm_shakespeare/ and the figure)
set -euo pipefail
out="${1:-runs/lm_study}"
py="${PYTHON:-python}"
mkdir -p "$out"
jobs=(  # name, preset, seed, epochs of 250 steps, overrides; longest first
  "deq_ift_s0 deq_lm 0 6 --set grad.name=ift"
  "deq_upg_s0 deq_lm 0 8"
  "deq_upg_s1 deq_lm 1 8"
  "deq_upg_s2 deq_lm 2 8"
  "deq_npg_s0 deq_lm 0 8 --set grad.name=npg"
  "explicit_s0 transformer_lm 0 17"
  "explicit_s1 transformer_lm 1 17"
  "explicit_s2 transformer_lm 2 17"
  "explicit_ref_s0 transformer_lm 0 8"
)
run_one() {
  set -- $1
  local name=$1 cfg=$2 seed=$3 epochs=$4; shift 4
  local mode=()  # a folder already there: continue it (a finished run returns at once)
  [ -d "$out/$name" ] && mode=(--resume)
  OMP_NUM_THREADS=1 "$py" -m phantomdeq train --config "configs/${cfg}_shakespeare.yaml" \
    --out "$out/$name" "${mode[@]}" --no-progress \
    --set train.seed="$seed" --set train.epochs="$epochs" --set train.num_threads=1 \
    --set data.test_size=500 "$@" > "$out/$name.log" 2>&1 && echo "$name: finished" \
    || echo "$name: failed (rc $?; see $out/$name.log)"
}
export -f run_one
export out py
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run_one "{}"'
