"""GPU tier of the benchmark harness: the runner on a small bf16 Llama on CUDA, every kind of row.

The full reference matrix (benchmarks/scenarios.yaml) is run by the command in benchmarks/README.md; this
test only proves every path works on a GPU in a couple of minutes.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

SCENARIOS = """
models:
  small:
    config: {model_type: llama, hidden_size: 512, intermediate_size: 1536, num_hidden_layers: 2,
             num_attention_heads: 8, num_key_value_heads: 2, vocab_size: 8192, max_position_embeddings: 2048,
             tie_word_embeddings: false}
defaults: {model: small, dtype: bfloat16, batch_size: 2, seq_len: 512, steps: 8, warmup_steps: 3,
           dataset: instructions, collate: pack, loss_rtol: 0.05}
scenarios:
  - {name: qlora-hf, group: qlora, peft: qlora}
  - {name: qlora-hf-lean, group: qlora, peft: qlora, prep: lean}
  - {name: qlora-liger-lean, group: qlora, peft: qlora, prep: lean, peer: liger}
  - {name: qlora-bnb-foak, group: qlora, peft: qlora, plugins: accelerated-peft-bnb-nf4-foak}
  - {name: lora-hf, group: lora, peft: lora}
  - {name: lora-foak, group: lora, peft: lora, plugins: foak-fast-kernels}
  - {name: full-hf, group: full, peft: full, learning_rate: 1.0e-5}
  - {name: full-foak, group: full, peft: full, plugins: foak-fast-kernels, learning_rate: 1.0e-5}
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runner_on_gpu_every_row_kind(tmp_path: Path) -> None:
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text(SCENARIOS, encoding="utf-8")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "benchmarks/run_benchmarks.py", "run", str(scenarios), "--out", str(out), "--device", "cuda"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    with (out / "results.csv").open(newline="", encoding="utf-8") as handle:
        rows = {r["scenario"]: r for r in csv.DictReader(handle)}
    failed = {name: r["note"] for name, r in rows.items() if r["status"] == "failed"}
    assert not failed, failed
    for name in ("qlora-hf", "qlora-hf-lean", "lora-hf", "full-hf"):  # the baselines need nothing optional
        assert rows[name]["status"] == "ok", (name, rows[name]["note"])
    for r in rows.values():
        if r["status"] == "ok":
            assert r["gpu_name"] and float(r["peak_alloc_gib"]) > 0 and float(r["peak_reserved_gib"]) > 0
            assert r["loss_match"] in ("baseline", "yes"), (r["scenario"], r["loss_max_rel_diff"])
        if r["status"] == "ok" and r["plugins"] != "none":
            assert r["entry"] == "accelerate launch: acceleration section" and int(r["patches"]) > 0
    # the fp32 upcast of prepare_model_for_kbit_training costs memory; the lean recipe does not pay it
    assert float(rows["qlora-hf-lean"]["peak_alloc_gib"]) < float(rows["qlora-hf"]["peak_alloc_gib"])
