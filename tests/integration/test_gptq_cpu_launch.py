"""The shipped CPU GPTQ-LoRA launch config runs a real job: the tiny model of the examples, quantized with
``fms-accelerate quantize``, trained by ``examples/trl_sft.py`` (TRL's SFTTrainer) under stock
``accelerate launch --config_file launch_configs/accelerate-cpu-gptq-lora-foak.yaml``."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from .conftest import ACCELERATE, REPO, VENV_BIN, free_port, run

CONFIG = REPO / "launch_configs" / "accelerate-cpu-gptq-lora-foak.yaml"
FMS_ACCELERATE = str(VENV_BIN / "fms-accelerate")
LOSSES = re.compile(r"first loss (?P<first>[\d.]+) -> last loss (?P<last>[\d.]+) \((?P<steps>\d+) steps\)")


@pytest.mark.slow
def test_cpu_gptq_launch_config_trains_lora_on_a_quantized_checkpoint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # the kernels' pure-torch CPU paths, as a user runs it (the root conftest turns the Triton interpreter on)
    for key in (
        "TRITON_INTERPRET",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "ACCELERATE_USE_CPU",
    ):
        env.pop(key, None)
    tiny, gptq = tmp_path / "tiny-llama", tmp_path / "tiny-llama-gptq"
    made = run([sys.executable, str(REPO / "examples" / "make_tiny_model.py"), str(tiny)], env, tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    quantized = run(
        [FMS_ACCELERATE, "quantize", str(tiny), str(gptq), "--bits", "4", "--group-size", "16",
         "--num-samples", "16", "--seq-len", "64", "--device", "cpu"],
        env, tmp_path,
    )  # fmt: skip
    assert quantized.returncode == 0, quantized.stdout[-2000:] + quantized.stderr[-3000:]
    assert len(re.findall(r"^layer \d+/\d+: 7 linears", quantized.stdout, flags=re.MULTILINE)) == 2
    assert json.loads((gptq / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"

    done = run(
        [ACCELERATE, "launch", "--config_file", str(CONFIG), "--main_process_port", str(free_port()),
         str(REPO / "examples" / "trl_sft.py"), "--model", str(gptq), "--steps", "24",
         "--output-dir", str(tmp_path / "out")],
        env, tmp_path,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # TRL's own from_pretrained of the path went through the GPTQ plugin, and the fused kernels read GPTQ bases
    assert re.search(r"from_pretrained\(.*tiny-llama-gptq.*\) loads through plugin 'auto_gptq'", output), output[-3000:]
    for kernel in ("kernels.lora_qkv [gptq]", "kernels.lora_mlp_swiglu [gptq]", "kernels.rms_norm"):
        assert kernel in output, kernel
    assert "bitsandbytes" not in re.findall(r"^(\S+)\s", done.stdout, flags=re.MULTILINE)  # no bnb patch rows
    match = LOSSES.search(done.stdout)
    assert match, done.stdout[-3000:]
    assert int(match["steps"]) == 24 and float(match["last"]) < float(match["first"]) - 0.1, match.group(0)
