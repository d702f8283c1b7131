#!/usr/bin/env bash
# The GPU check in one call (issue 13): build svdgrow with its CUDA kernels, run the op tests
# (CUDA and CPU cases), count host synchronisations, time the SVD and the resize step on the
# GPU, and run the main job there; keep every log.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# Everything runs against one deadline (BUDGET seconds from the start, default 540, so the
# whole check fits a 600 s call with time to copy $OUT back): each step gets what is left, up
# to its own cap, and is skipped when under 20 s are left. Steps, most needed first:
#   env.txt        machine, driver, torch, which svdgrow was imported, its CUDA registrations
#   build.log      pip's build output (nvcc included)
#   pytest.txt     pytest of tests/test_ops.py (CUDA cases and the CPU ones); junit.xml beside it
#   syncs.md/json  benchmarks/gpu_syncs.py: host synchronisations of the ops and of Resizer.step
#   bench_svd.txt  benchmarks/bench_svd.py --device cuda (and the JSON/markdown it wrote)
#   bench_resize*  benchmarks/bench_resize.py --device cuda: resize step vs training step
#   bench_widths*  benchmarks/bench_widths.py --device cuda: found widths against the same
#                  widths on multiples of 8 (does alignment matter on the GPU too?)
#   mnist_gpu*/    the main job (svdgrow train --dataset mnist) plain and --amp, with
#                  `svdgrow summary` (time split: batches, steps, resize checks, evaluation)
#   fashion_gpu/   2 epochs of the Fashion-MNIST recipe (its feature spectra on the GPU)
#   summary.txt    one line per step with its exit status and seconds
# The datasets travel with the call: copy ../shared/data/gz to data_gz/ (ignored) and name it
# in the device tool's `carry`; their .gz files are unpacked into the torchvision layout here.
# Needs an NVIDIA GPU, nvcc (CUDA_HOME, or nvcc on PATH) and a Python with torch (.venv is used
# when present). Nothing is downloaded (pip --no-index --no-deps).
# Environment: MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0, Hopper), PYTHON (python, else
# python3), BUDGET (540), DATA (data_gz), STEPS (default "build pytest syncs bench_svd
# bench_resize bench_widths train": a second call on the still-warm machine can run what the first cut,
# e.g. STEPS="train" once the build is installed there); for a dry run of the script itself on a machine without a GPU:
# DEVICE=cpu SKIP_BUILD=1 EPOCHS=1 (the CUDA-only steps then fail fast or skip).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET:-540}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
PY=${PYTHON:-$(command -v python >/dev/null 2>&1 && echo python || echo python3)}
STEPS=${STEPS:-build pytest syncs bench_svd bench_resize bench_widths train}
want() { [[ " $STEPS " == *" $1 "* ]]; }

# CUDA toolkit root; nvcc on PATH may be a wrapper script (as in scripts/setup.sh).
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  nvcc_bin=$(command -v nvcc)
  real=$(grep -o '/[^ "]*/bin/nvcc' "$nvcc_bin" 2>/dev/null | head -n 1 || true)
  [ -n "$real" ] || real=$(readlink -f "$nvcc_bin")
  export CUDA_HOME=$(dirname "$(dirname "$real")")
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

summary() { echo "$1" | tee -a "$OUT/summary.txt"; }
# step NAME CAP LOG CMD...: run CMD with stdout+stderr in $OUT/LOG, limited to CAP seconds and
# to what is left of BUDGET; one summary line; returns CMD's status (125 when skipped).
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    summary "$name: skipped ($left s of the budget left)"
    return 125
  fi
  local start=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  tail -n 4 "$OUT/$log"
  local why=""
  [ $rc -eq 124 ] && why=", timed out at $limit s"
  summary "$name: rc=$rc ($(( $(date +%s) - start )) s$why)"
  return $rc
}

: > "$OUT/summary.txt"
{
  date -u
  uname -a
  nvidia-smi || echo "nvidia-smi: not found"
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  "${CUDA_HOME:-/nonexistent}/bin/nvcc" --version || echo "nvcc: not found"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/env.txt" 2>&1

if want build && [ -z "${SKIP_BUILD:-}" ]; then
  export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
  if ! step build 300 build.log "$PY" -m pip install --no-build-isolation --no-deps --no-index -v .; then
    tail -n 60 "$OUT/build.log"
    cat "$OUT/summary.txt"
    exit 1
  fi
fi
# The installed extension also goes into the source tree: `python -m` and the benchmarks
# (which put the repository first on sys.path) import svdgrow from there.
if [ -z "${SKIP_BUILD:-}" ]; then
  so=$(cd / && "$PY" -c "import svdgrow._C as c; print(c.__file__)") && cp "$so" svdgrow/ \
    || summary "the built svdgrow._C was not found: the source tree's svdgrow has no CUDA build"
fi
(cd / && "$PY" - >> "$OUT/env.txt" 2>&1) <<'EOF'
import torch, svdgrow
print("svdgrow imported from", svdgrow.__file__)
for op in ("batched_svd", "slice_copy", "slice_copy_", "pivoted_cholesky"):
    lines = [l for l in torch._C._dispatch_dump("svdgrow::" + op).splitlines() if l.startswith(("CPU", "CUDA"))]
    print(op, lines)
EOF

want pytest && step pytest 150 pytest.txt "$PY" -m pytest -q -rs --durations=15 -p no:cacheprovider \
  tests/test_ops.py --junitxml "$OUT/junit.xml"

want syncs && step syncs 60 syncs.txt "$PY" benchmarks/gpu_syncs.py --device "$DEVICE" --out "$OUT/syncs"
want bench_svd && step bench_svd 90 bench_svd.txt "$PY" benchmarks/bench_svd.py --device "$DEVICE" \
  --out "$OUT/bench_svd_$DEVICE.json"
want bench_resize && step bench_resize 90 bench_resize.txt "$PY" benchmarks/bench_resize.py --device "$DEVICE" \
  --quality-steps 0 --out "$OUT/bench_resize_$DEVICE"
want bench_widths && step bench_widths 40 bench_widths.txt "$PY" benchmarks/bench_widths.py \
  --device "$DEVICE" --out "$OUT/bench_widths_$DEVICE"

# The main job (README command 1) on the GPU, plain and with --amp, and the Fashion recipe.
DATA=${DATA:-data_gz}
if ! want train; then
  :
elif [ -d "$DATA/MNIST" ]; then
  RAW=${TMPDIR:-/tmp}/svdgrow_data
  for ds in MNIST FashionMNIST; do
    [ -d "$DATA/$ds" ] || continue
    mkdir -p "$RAW/$ds/raw"
    for f in "$DATA"/$ds/*.gz; do gunzip -c "$f" > "$RAW/$ds/raw/$(basename "$f" .gz)"; done
  done
  epochs=${EPOCHS:+--epochs $EPOCHS}
  for amp in "" "--amp"; do
    name=mnist_gpu${amp:+_amp}
    step "train $name" 150 "$name.txt" "$PY" -m svdgrow train --dataset mnist --device "$DEVICE" \
      $amp $epochs --no-download --data-dir "$RAW" --run-dir "$OUT/$name" --no-progress
    "$PY" -m svdgrow summary "$OUT/$name" >> "$OUT/$name.txt" 2>&1 && grep -E "^(test acc|time)" "$OUT/$name.txt"
    rm -rf "$OUT/$name/checkpoints"
  done
  if [ -d "$RAW/FashionMNIST/raw" ]; then
    step "train fashion_gpu (feature spectra, 2 epochs)" 90 fashion_gpu.txt "$PY" -m \
      svdgrow train --dataset fashion-mnist --epochs 2 --shrink-steps 400 --device "$DEVICE" \
      --no-download --data-dir "$RAW" --run-dir "$OUT/fashion_gpu" --no-progress
    rm -rf "$OUT/fashion_gpu/checkpoints"
  fi
else
  summary "train: no dataset folder $DATA (copy ../shared/data/gz there), skipped"
fi
summary "total: $(( $(date +%s) - T0 )) s of a $BUDGET s budget"
cat "$OUT/summary.txt"
