#!/usr/bin/env bash
# The main job: accelerated fine-tune (QLoRA nf4 + fused kernels) of the tiny embedded Llama on the embedded
# data, through the stock `accelerate launch` with an Accelerate config that has an `acceleration:` section.
# Uses the GPU when there is one, else the CPU. Extra args go to examples/train_tiny.py (e.g. --steps 80).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=$(bash scripts/setup_env.sh)
if "$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  CONFIG=${FMS_MAIN_JOB_CONFIG:-launch_configs/accelerate-single-gpu-qlora-foak.yaml}
else
  CONFIG=${FMS_MAIN_JOB_CONFIG:-launch_configs/accelerate-cpu-qlora-foak.yaml}
fi
# Only installed packages are importable in the launcher and its workers: Python would otherwise put the script's
# folder (examples/) first on sys.path (and the current folder, the checkout's root, for `python -c` / `-m`),
# where folders that are not packages import as namespace packages (examples/data as `data`; from the root,
# kernels/ as `kernels`, hiding Hugging Face's kernels package that bitsandbytes looks for). Python >= 3.11.
export PYTHONSAFEPATH=1
echo "[main job] accelerate launch --config_file $CONFIG examples/train_tiny.py $*"
exec "$(dirname "$VPY")/accelerate" launch --config_file "$CONFIG" examples/train_tiny.py "$@"
