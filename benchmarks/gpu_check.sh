#!/usr/bin/env bash
# The GPU check in one call: build svdgrow with its CUDA kernels, run the op tests (CUDA and
# CPU) and the SVD benchmark on the GPU, and keep every log.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# Writes into $OUT (default benchmarks/results/gpu_check):
#   env.txt      machine, driver, torch, which svdgrow was imported, its CUDA registrations
#   build.log    pip's build output (nvcc included)
#   pytest.txt   pytest -q of tests/test_ops.py (its cuda cases and the CPU ones); junit.xml beside it
#   bench_svd.txt  python benchmarks/bench_svd.py --device cuda (and any file it wrote)
#   mnist_gpu*/  the main job (svdgrow train --dataset mnist) on the GPU, plain and --amp,
#                with its log and summary (needs the dataset in $DATA, default data_gz/)
#   fashion_gpu/ 2 epochs of the Fashion-MNIST recipe (its feature spectra on the GPU)
#   summary.txt  one line per step with its exit status
# Needs: an NVIDIA GPU, nvcc (CUDA_HOME, or nvcc on PATH), and a Python with torch installed
# (.venv is used when present). Nothing is downloaded (pip --no-index --no-deps).
# Environment: MAX_JOBS (default 16), TORCH_CUDA_ARCH_LIST (default 9.0, Hopper), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
PY=${PYTHON:-python}

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
: > "$OUT/summary.txt"
{
  date -u
  uname -a
  nvidia-smi || echo "nvidia-smi: not found"
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  "${CUDA_HOME:-/nonexistent}/bin/nvcc" --version || echo "nvcc: not found"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/env.txt" 2>&1

start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/build.log" 2>&1
rc=$?
summary "build: rc=$rc ($(( $(date +%s) - start )) s)"
if [ $rc -ne 0 ]; then
  tail -n 60 "$OUT/build.log"
  exit 1
fi

# PYTHONSAFEPATH keeps the source tree (which has no CUDA build) off sys.path, so the
# installed svdgrow is the one imported.
export PYTHONSAFEPATH=1
"$PY" - >> "$OUT/env.txt" 2>&1 <<'EOF'
import torch, svdgrow
print("svdgrow imported from", svdgrow.__file__)
for op in ("batched_svd", "slice_copy", "slice_copy_"):
    lines = [l for l in torch._C._dispatch_dump("svdgrow::" + op).splitlines() if l.startswith(("CPU", "CUDA"))]
    print(op, lines)
EOF

start=$(date +%s)
timeout 900 "$PY" -m pytest -q -rs --durations=15 tests/test_ops.py \
  --junitxml "$OUT/junit.xml" > "$OUT/pytest.txt" 2>&1
rc=$?
tail -n 40 "$OUT/pytest.txt"
summary "pytest: rc=$rc ($(( $(date +%s) - start )) s)"

unset PYTHONSAFEPATH  # a script's own folder stays importable (benchmarks/, not the repo root)
if [ -f benchmarks/bench_svd.py ]; then
  start=$(date +%s)
  stamp="$OUT/.bench_start"
  touch "$stamp"
  timeout 900 "$PY" benchmarks/bench_svd.py --device cuda > "$OUT/bench_svd.txt" 2>&1
  rc=$?
  tail -n 40 "$OUT/bench_svd.txt"
  # Keep whatever the benchmark wrote under benchmarks/results (JSON with the device named).
  find "$(pwd)/benchmarks/results" -type f -newer "$stamp" -not -path "$OUT/*" -exec cp {} "$OUT/" \; 2>/dev/null
  rm -f "$stamp"
  summary "bench_svd: rc=$rc ($(( $(date +%s) - start )) s)"
else
  summary "bench_svd: benchmarks/bench_svd.py not found, skipped"
fi
# The main job (README command 1) on the GPU, plain and with --amp. The data travels with the
# call: copy ../shared/data/gz to data_gz/ (ignored) and name it in `carry`; its MNIST/*.gz are
# unpacked here into the torchvision layout (MNIST/raw/<name>).
DATA=${DATA:-data_gz}
if [ -d "$DATA/MNIST" ]; then
  RAW=${TMPDIR:-/tmp}/svdgrow_data
  mkdir -p "$RAW/MNIST/raw"
  for f in "$DATA"/MNIST/*.gz; do gunzip -c "$f" > "$RAW/MNIST/raw/$(basename "$f" .gz)"; done
  if [ -d "$DATA/FashionMNIST" ]; then
    mkdir -p "$RAW/FashionMNIST/raw"
    for f in "$DATA"/FashionMNIST/*.gz; do
      gunzip -c "$f" > "$RAW/FashionMNIST/raw/$(basename "$f" .gz)"
    done
  fi
  DATA=$RAW
  for amp in "" "--amp"; do
    name=mnist_gpu${amp:+_amp}
    start=$(date +%s)
    timeout 600 "$PY" -m svdgrow train --dataset mnist --device cuda $amp --no-download \
      --data-dir "$DATA" --run-dir "$OUT/$name" --no-progress > "$OUT/$name.txt" 2>&1
    rc=$?
    tail -n 3 "$OUT/$name.txt"
    "$PY" -m svdgrow summary "$OUT/$name" >> "$OUT/$name.txt" 2>&1
    rm -rf "$OUT/$name/checkpoints"
    summary "train $name: rc=$rc ($(( $(date +%s) - start )) s)"
  done
  # the Fashion-MNIST recipe reads feature spectra (captured on the GPU batch): 2 epochs of it
  if [ -d "$DATA/FashionMNIST/raw" ]; then
    start=$(date +%s)
    timeout 300 "$PY" -m svdgrow train --dataset fashion-mnist --epochs 2 --shrink-steps 400 \
      --device cuda --no-download --data-dir "$DATA" --run-dir "$OUT/fashion_gpu" \
      --no-progress > "$OUT/fashion_gpu.txt" 2>&1
    rc=$?
    tail -n 3 "$OUT/fashion_gpu.txt"
    rm -rf "$OUT/fashion_gpu/checkpoints"
    summary "train fashion_gpu (feature spectra, 2 epochs): rc=$rc ($(( $(date +%s) - start )) s)"
  fi
else
  summary "train: no dataset folder $DATA (copy ../shared/data/gz there), skipped"
fi
cat "$OUT/summary.txt"
