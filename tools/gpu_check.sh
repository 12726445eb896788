#!/usr/bin/env bash
# GPU check for pni-jax: a fresh single-GPU machine (e.g. one H200), no internet, < 8 minutes.
#
#   tools/gpu_check.sh [--wheels DIR] [--out DIR] [--pipeline] [--cpu-smoke] [--print-requirements]
#
# What it does (each step prints its start time since launch):
#   1. Python environment: uses the current `python3` if it already imports jax with a GPU backend;
#      otherwise creates a venv (PNI_GPU_VENV, default $HOME/pni-gpu-venv) and installs jax[cuda12]
#      and the package's requirements (read from setup.cfg) from a folder of wheels carried beside
#      the checkout (--wheels, PNI_WHEELS, default ../wheels next to the repository), offline
#      (`pip install --no-index --find-links`).
#   2. Prints the devices (nvidia-smi -L, jax.devices()) and fails unless JAX sees a GPU.
#   3. Runs `python tools/benchmark.py e2e --configs paper` on a generated MVTec-layout set at
#      480 px with 200 train / 100 test images (pni_jax.data.generate, category 'tokens'): the
#      paper config (WideResNet-101-2, layers 2+3, p=5, d=1024, 1% coreset, |C_dist| 2048,
#      10 x 2048 MLP on 9 x 9 windows for 15 epochs, N + P scoring) with
#      model.allow_random_init=True, because no WideResNet-101 weights exist on this machine
#      (speed is representative, AUROCs are not). The refinement network (densenet161, random
#      init too) is timed for 200 iterations instead of the paper's 55,000 (per-iteration time
#      printed). It prints per-stage wall / compile times, achieved FLOP/s or GB/s against the
#      peak measured in the same run, and the peak device memory, and writes <out>/e2e.{json,md}.
#   4. --pipeline: afterwards runs the real CLI (`python -m pni_jax.main`, configs/mvtec.py, same
#      data, refinement off) and prints its log's timing lines (adds ~2-3 minutes).
#
# Preparing the wheels folder (once, on a machine with internet; same CPU architecture and Python
# minor version as the GPU machine, or add --platform manylinux2014_x86_64 --python-version 3.11
# --only-binary=:all: to download for another one):
#   cd pni-jax && pip download -d ../wheels $(tools/gpu_check.sh --print-requirements)
# and carry ../wheels next to the checkout (about 3.5 GB: the CUDA 12 wheels of jax are most of it).
#
# --cpu-smoke: a dry run on CPU with tiny sizes (4 train / 4 test images at 128 px, 1 MLP epoch,
# no refinement: its densenet161 train step alone compiles ~2 min on 2 CPU cores), no install:
# checks the script end to end where no GPU exists.
set -euo pipefail
set -f   # no globbing: requirement strings such as jax[cuda12] stay literal

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${PNI_WHEELS:-$(dirname "$REPO")/wheels}"
OUT="$REPO/runs/gpu_check"
VENV="${PNI_GPU_VENV:-$HOME/pni-gpu-venv}"
MODE=gpu
PIPELINE=0
START=$(date +%s)

requirements() {
  # install_requires of setup.cfg (comments dropped) plus jax[cuda12].
  python3 - "$REPO/setup.cfg" <<'EOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
reqs = [l.split('#')[0].strip() for l in cfg['options']['install_requires'].splitlines()]
print(' '.join(r for r in reqs if r) + ' jax[cuda12]>=0.10.2')
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --pipeline) PIPELINE=1; shift ;;
    --cpu-smoke) MODE=cpu; shift ;;
    --print-requirements) requirements; exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

step() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
cd "$REPO"

# ------------------------------------------------------------------ 1. environment
PY=python3
if [[ $MODE == cpu ]]; then
  export JAX_PLATFORMS=cpu
  step "cpu smoke run with $($PY -c 'import jax; print("jax", jax.__version__)')"
elif $PY -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  step "using the current python: $($PY -c 'import jax; print("jax", jax.__version__, jax.devices())')"
else
  if [[ ! -d "$WHEELS" ]]; then
    echo "no wheels folder at $WHEELS: prepare it with" >&2
    echo "  pip download -d $WHEELS \$(tools/gpu_check.sh --print-requirements)" >&2
    exit 1
  fi
  step "installing jax[cuda12] and requirements offline from $WHEELS into $VENV"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  # shellcheck disable=SC2046
  timeout 300 "$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" \
      $(requirements)
  PY="$VENV/bin/python"
fi

# ------------------------------------------------------------------ 2. devices
if [[ $MODE == gpu ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L || true
  $PY - <<'EOF'
import jax
print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices())
if jax.default_backend() != 'gpu':
  raise SystemExit('JAX does not see a GPU (is the jax[cuda12] install complete? CUDA driver?)')
EOF
fi

# ------------------------------------------------------------------ 3. paper config, stage times
if [[ $MODE == gpu ]]; then
  SIZES=(--images 200 --test-images 100 --size 480 --refine-iterations 200
         --coreset-chunk 1048576)
  LIMIT=420
else
  SIZES=(--images 4 --test-images 4 --size 128 --mlp-epochs 1 --refine-iterations 0)
  LIMIT=900
fi
step "paper config: python tools/benchmark.py e2e --configs paper ${SIZES[*]}"
set +e
timeout "$LIMIT" $PY tools/benchmark.py e2e --configs paper "${SIZES[@]}" \
    --data-root "$OUT/data" --out "$OUT" 2>&1 \
    | grep --line-buffered -v -E 'oneDNN|absl::InitializeLog|UserWarning|load_variables\(' \
    | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
set -e
if [[ $status -ne 0 ]]; then
  step "benchmark failed (exit $status); log in $OUT/bench.log"
  exit "$status"
fi

# ------------------------------------------------------------------ 4. the real CLI (optional)
if [[ $PIPELINE == 1 ]]; then
  step "pipeline: python -m pni_jax.main --config=configs/mvtec.py (generated data, refinement off)"
  crop=$([[ $MODE == gpu ]] && echo 480 || echo 128)
  timeout 600 $PY -m pni_jax.main --config=configs/mvtec.py --workdir="$OUT/pipeline" \
      --config.data.root="$OUT/data/paper" --config.data.categories=tokens \
      --config.data.resize=$crop --config.data.crop=$crop \
      --config.model.allow_random_init=True --config.model.use_refinement=False \
      $([[ $MODE == cpu ]] && echo --config.model.neighborhood.epochs=1) \
      2>&1 | grep --line-buffered -E 'fitted in|I-AUROC|neighbourhood MLP epoch|coreset|ERROR|Error' \
      | tee "$OUT/pipeline.log" || true
fi

grep -h 'Peak device memory' "$OUT/e2e.md" || true
elapsed=$(( $(date +%s) - START ))
step "done in ${elapsed}s; tables in $OUT/e2e.md, raw figures in $OUT/e2e.json"
if [[ $MODE == gpu && $elapsed -gt 480 ]]; then
  echo "WARNING: the check took ${elapsed}s, over the 8-minute budget" >&2
fi
