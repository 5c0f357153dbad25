#!/usr/bin/env bash
# Prepare a GPU machine (no network) for the benchmarks: install this repository's packages and the carried
# wheels into the Python that already has CUDA torch, then print what is installed.
#
#   bash benchmarks/gpu_setup.sh            # from the repository root (any cwd works)
#   PYTHON=/path/to/python bash benchmarks/gpu_setup.sh
#
# What it does, in order (every step logs; a failing optional wheel is reported and skipped):
#   1. wheels/**/*.whl  (git-ignored folder carried to the machine: bitsandbytes, liger-kernel, ...)
#      installed with `pip install --no-deps --no-index`, one wheel at a time so one bad wheel cannot block
#      the rest; wheels whose package is already installed at that version are skipped. Wheels inside a folder
#      named deps/ (e.g. wheels/deepspeed/deps/: pydantic, hjson, ... that deepspeed needs) are dependencies only:
#      installed when their package is missing, never replacing one the machine has at another version (its
#      torch/transformers stack keeps its own pydantic, psutil, ...). Any other wheel is a package under test and
#      replaces an installed version that differs.
#   2. the framework (.), kernels/ and every plugins/*/ with a pyproject.toml, editable, `--no-deps
#      --no-build-isolation --no-index` (the machine's torch/transformers/accelerate/peft/triton are kept;
#      setuptools comes with torch on Python >= 3.12; a setuptools wheel under wheels/ is used if it is not).
#   3. a check that the packages import and the plugins are discovered (`fms-accelerate plugins`).
# Exit status is non-zero only if the framework itself cannot be installed or imported.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
log() { echo "[gpu_setup] $*" >&2; }
PIP=("$PY" -m pip install --disable-pip-version-check --no-input --no-deps --no-index)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# --user only where the interpreter's site-packages is not writable (never inside a venv, where it fails)
if ! "$PY" -c "import os, sys, sysconfig; sys.exit(0 if os.access(sysconfig.get_paths()['purelib'], os.W_OK) else 1)"; then
  log "site-packages is not writable: installing with --user"
  PIP+=(--user)
fi
pip_try() { "${PIP[@]}" "$@"; }

log "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# 1. carried wheels
if [ -d wheels ]; then
  mapfile -t WHEELS < <(find -L wheels -name '*.whl' | sort)
  for whl in "${WHEELS[@]}"; do
    base=$(basename "$whl")
    dist=${base%%-*}
    ver=$(echo "$base" | cut -d- -f2)
    have=$("$PY" - "$dist" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1].replace("_", "-")))
except metadata.PackageNotFoundError:
    print("")
EOF
)
    if [ "$have" = "$ver" ]; then
      log "wheel $base: $dist $ver already installed"
      continue
    fi
    case "/$whl" in
      */deps/*)
        if [ -n "$have" ]; then
          log "wheel $base: dependency only; keeping the installed $dist $have"
          continue
        fi ;;
    esac
    if pip_try "$whl" >/tmp/gpu_setup_pip.log 2>&1; then
      log "wheel $base: installed"
    else
      log "wheel $base: NOT installed (scenarios needing it will be skipped):"
      tail -n 5 /tmp/gpu_setup_pip.log >&2
    fi
  done
else
  log "no wheels/ folder: scenarios needing bitsandbytes or liger-kernel will be skipped"
fi

# 2. this repository's packages, editable. Building them needs setuptools with its own bdist_wheel
# (setuptools >= 70.1) or setuptools + the `wheel` package; carry both wheels under wheels/build/ if the
# machine has neither (they are then installed by step 1).
if ! "$PY" - <<'EOF'
import sys
try:
    import setuptools
except ImportError:
    sys.exit("[gpu_setup] setuptools is missing: carry setuptools and wheel wheels in wheels/build/")
from importlib.util import find_spec
from packaging.version import Version
if Version(setuptools.__version__) < Version("70.1") and find_spec("wheel") is None:
    sys.exit(f"[gpu_setup] setuptools {setuptools.__version__} needs the 'wheel' package to build: carry "
             "setuptools>=70.1 (or wheel) in wheels/build/")
EOF
then
  log "the editable installs below will probably fail (see the line above)"
fi
EDITABLES=(-e .)
for dir in kernels plugins/*; do
  [ -f "$dir/pyproject.toml" ] && EDITABLES+=(-e "$dir")
done
log "installing (editable): ${EDITABLES[*]}"
if ! pip_try --no-build-isolation "${EDITABLES[@]}" >/tmp/gpu_setup_pip.log 2>&1; then
  tail -n 30 /tmp/gpu_setup_pip.log >&2
  log "installing all at once failed; trying one by one"
  for ((i = 1; i < ${#EDITABLES[@]}; i += 2)); do
    pkg=${EDITABLES[$i]}
    if pip_try --no-build-isolation -e "$pkg" >/tmp/gpu_setup_pip.log 2>&1; then
      log "installed $pkg"
    else
      log "FAILED to install $pkg:"
      tail -n 15 /tmp/gpu_setup_pip.log >&2
    fi
  done
fi

# 3. what we have
"$PY" - <<'EOF'
import importlib.util
import sys
from importlib import metadata

for name in ("torch", "transformers", "accelerate", "peft", "triton", "bitsandbytes", "liger-kernel", "deepspeed",
             "fms-acceleration-accelerate", "fms-acceleration-accelerate-kernels"):
    try:
        print(f"[gpu_setup] {name:<40} {metadata.version(name)}", file=sys.stderr)
    except metadata.PackageNotFoundError:
        print(f"[gpu_setup] {name:<40} -", file=sys.stderr)
import torch

print(f"[gpu_setup] cuda: {torch.cuda.is_available()} {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}", file=sys.stderr)
if importlib.util.find_spec("fms_acceleration_accelerate") is None:
    sys.exit("[gpu_setup] fms_acceleration_accelerate is not importable")
EOF
status=$?
"$PY" -m fms_acceleration_accelerate.cli plugins >&2 || log "fms-accelerate plugins failed"
exit $status
