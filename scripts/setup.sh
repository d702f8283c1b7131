#!/usr/bin/env bash
# Make .venv, install torch, the test tools and svdgrow (building its C++/CUDA extension).
# Used by the README quick start and by CI. Safe to run again.
#
#   SVDGROW_VENV   where the venv goes (default: .venv in the repo)
#   FORCE_CUDA     1: build the CUDA kernels too (needs nvcc); default: when nvcc is found
#   TORCH_CUDA_ARCH_LIST  GPU architectures to build for when no GPU is present (default 9.0)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SVDGROW_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# torch first: the extension builds against the torch that is installed (no build isolation).
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python -m pip install --quiet -r requirements-dev.txt

# Find the CUDA toolkit. On some machines nvcc on PATH is a wrapper script, which makes
# torch guess CUDA_HOME wrong; follow the wrapper to the real toolkit root.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  nvcc_bin=$(command -v nvcc)
  real=$(grep -o '/[^ "]*/bin/nvcc' "$nvcc_bin" 2>/dev/null | head -n 1 || true)
  [ -n "$real" ] || real=$(readlink -f "$nvcc_bin")
  export CUDA_HOME=$(dirname "$(dirname "$real")")
fi
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export FORCE_CUDA=${FORCE_CUDA:-1}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  echo "setup: CUDA toolkit at $CUDA_HOME (FORCE_CUDA=$FORCE_CUDA, arch $TORCH_CUDA_ARCH_LIST)"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
python -m pip install --no-build-isolation --no-deps .
# -P: import the installed package, not the source folder (which has no compiled extension).
python -P -c "import svdgrow, torch; torch.ops.svdgrow.batched_svd; torch.ops.svdgrow.slice_copy; print('setup: svdgrow', svdgrow.__version__, 'with torch', torch.__version__, 'ready')"
