#!/usr/bin/env bash
# Create (or reuse) .venv with everything the main job and the test suite need; print its python path.
#
# - No GPU: a plain venv with the CPU build of torch 2.13.0 (a bare `torch` requirement could pull a
#   multi-GB CUDA build) and triton (Triton kernels then run in interpreter mode on CPU).
# - GPU with torch already installed: the venv sees the system site-packages, so the existing CUDA torch
#   and triton are used as they are.
# Re-running is cheap: installs are skipped while the pyproject files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${FMS_VENV:-$ROOT/.venv}
log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    log "CUDA torch found in $PY: creating $VENV on top of it"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    log "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
stamp="$VENV/.fms-setup-stamp"
want=$({ cat pyproject.toml kernels/pyproject.toml plugins/*/pyproject.toml scripts/setup_env.sh scripts/constraints.txt 2>/dev/null || true; } | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VPY"
  exit 0
fi

pip_install() {
  # (this machine's pip config names extra local indexes that may be absent: drop those warnings)
  "$VPY" -m pip install --disable-pip-version-check -q -c scripts/constraints.txt "$@" 2>&1 | { grep -v "is ignored: it is neither" >&2 || true; }
  return "${PIPESTATUS[0]}"
}
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  log "installing torch==2.13.0 (CPU build)"
  pip_install "torch==2.13.0"
fi
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  # CPU: Triton's interpreter needs triton >= 3.7 (3.6 fails on some reductions)
  pip_install "triton>=3.7"
fi
editables=(-e ".[test,bitsandbytes,trl]")
for plugin in kernels/ plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && editables+=(-e "$plugin")
done
log "installing the framework, kernels and plugins (editable)"
pip_install "${editables[@]}"
echo "$want" > "$stamp"
echo "$VPY"
