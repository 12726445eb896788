#!/usr/bin/env bash
# The neighbourhood prior at real strength (issue 12 B): the paper-size MLP on the demo data.
#
#   tools/n_study_gpu.sh [--out DIR] [--categories lattice,cable] [--settings LIST] [--cpu-smoke]
#
# Needs a python3 (or $PYTHON) whose jax sees the GPU, with ml_collections and clu importable
# (`tools/gpu_check.sh --nstudy` installs the carried wheels and runs `--settings paper,paper_k2
# --categories lattice`, ~3 minutes). For each setting below (default: all four) it runs
# tools/n_study.py (fit + evaluate baseline, +N (demo rule: relative), +N@mean_prob (eq. 5),
# +N@posterior, +P, +N+P, +N+P@relative, @mean_prob (eq. 6), @mean_score, + the N diagnostic) in one workdir per category set (the coreset is fitted once
# and reused), then prints the Markdown table (<out>/study.md). Settings, demo features
# (EfficientNet-Lite0, d = 128, |C_dist| = 512; the demo's scoring: relative_score, rho 0.1, T 2):
#   demo_k1   the demo MLP (window 5, 3 x 512, 6 epochs) without dilation (inert N, CPU reference)
#   demo_k5   the demo MLP with the demo's dilation 5 (reach 10 cells; the CPU study's choice)
#   paper     the paper MLP: window 9, 10 x 2048, dropout 0.5, 15 epochs, batch 2048, lr 1e-3
#             step x0.1 every 5 epochs, interior training positions, no dilation
#   paper_k2  the paper MLP with a dilated window (dilation 2: reach 8 cells = 64 px)
# Expected time on one H200: ~1 min per setting and category set after compilation.
# --cpu-smoke: tiny MLPs, 1 epoch, 'lattice' only at 12 training images: checks the script here.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/runs/n_study_gpu"
CATS="lattice,cable"
SETTINGS="demo_k1,demo_k5,paper,paper_k2"
PY="${PYTHON:-python3}"
SMOKE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --categories) CATS="$2"; shift 2 ;;
    --settings) SETTINGS="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ $SMOKE == 1 ]] && CATS=lattice
mkdir -p "$OUT"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import jax; print("devices:", jax.devices())'

ABL="baseline,N,N@mean_prob,N@posterior,P,N+P,N+P@relative"   # N+P adds @mean_prob, @mean_score
COMMON=(--config=configs/demo.py --workdir="$OUT/work" --config.data.categories="$CATS"
        --config.eval.max_figures=0 --config.eval.save_maps=False --config.eval.ablations="$ABL")
PAPER=(--config.model.neighborhood.window=9 --config.model.neighborhood.num_layers=10
       --config.model.neighborhood.width=2048 --config.model.neighborhood.dropout=0.5
       --config.model.neighborhood.epochs=15 --config.model.neighborhood.batch_size=2048
       --config.model.neighborhood.learning_rate=1e-3 --config.model.neighborhood.decay_every=5
       --config.model.neighborhood.train_positions=interior
       --config.model.neighborhood.dilation=1)
if [[ $SMOKE == 1 ]]; then
  COMMON+=(--config.data.generated.num_train=12 --config.data.generated.num_test_good=4
           --config.data.generated.num_test_defect=6)
  PAPER=(--config.model.neighborhood.window=9 --config.model.neighborhood.num_layers=2
         --config.model.neighborhood.width=64 --config.model.neighborhood.epochs=1
         --config.model.neighborhood.batch_size=256 --config.model.neighborhood.train_positions=all)
fi

run() {  # tag, extra overrides...
  local tag="$1"; shift
  [[ $SMOKE == 1 || ",$SETTINGS," == *",$tag,"* ]] || return 0
  local t0=$(date +%s)
  echo "=== $tag ($(date +%T))"
  "$PY" tools/n_study.py "${COMMON[@]}" --tag="$tag" "$@" > "$OUT/$tag.log" 2>&1 \
    || { echo "setting $tag failed, see $OUT/$tag.log"; tail -20 "$OUT/$tag.log"; exit 1; }
  echo "    done in $(( $(date +%s) - t0 )) s"
}

if [[ $SMOKE == 1 ]]; then
  run smoke_paper_k2 "${PAPER[@]}" --config.model.neighborhood.dilation=2
else
  run demo_k1 --config.model.neighborhood.dilation=1
  run demo_k5
  run paper "${PAPER[@]}"
  run paper_k2 "${PAPER[@]}" --config.model.neighborhood.dilation=2
fi
"$PY" tools/n_study.py --workdir="$OUT/work" --table | tee "$OUT/study.md"
echo "table: $OUT/study.md (raw: $OUT/work/study.jsonl)"
