"""FSDP2 with a single rank (one GPU under ``fsdp_version: 2``): torch skips the all-gather there and reads one
input per parameter, so the plugin must leave its 4-bit layers as bitsandbytes layers instead of packed weights
(two inputs: codes and scales). One gloo process on CPU goes through the same torch code path."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from . import helpers as h

STEPS = 3


def _build(path: str):
    fw = h.framework()
    model = fw.model_loader(path, dtype=torch.float32)
    torch.manual_seed(5)
    model, _ = fw.augmentation(model, None, (h.lora_config(),))
    return fw, model


def _worker(rank: int, path: str, port: int, out: str) -> None:
    from fms_acceleration_accelerate_peft.packed4bit import Packed4bitLinear
    from torch.distributed.fsdp import FSDPModule

    try:
        h.init_gloo(rank, 1, port)
        fw, model = _build(path)
        merged = h.prepare_fsdp2(fw, model, 1, shard=True)
        assert isinstance(model, FSDPModule)
        torch.save(
            {
                "losses": h.train(model, h.batches(STEPS, seed=4)),
                "packed": sum(isinstance(m, Packed4bitLinear) for m in model.modules()),
                "notes": list(merged.notes),
            },
            out,
        )
    except Exception:
        Path(out + ".err").write_text(traceback.format_exc())
        raise
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_on_one_rank_trains_like_no_fsdp(tmp_path):
    path = str(h.tiny_llama(tmp_path / "m"))
    out = str(tmp_path / "rank0.pt")
    h.spawn_workers(_worker, (path, h.free_port(), out), 1, timeout=180.0)
    err = Path(out + ".err")
    assert not err.exists(), err.read_text()
    got = torch.load(out, weights_only=False)
    _, reference = _build(path)
    expected = h.train(reference, h.batches(STEPS, seed=4))
    assert got["packed"] == 0
    assert any("FSDP2 on one rank" in note for note in got["notes"]), got["notes"]
    assert got["losses"] == pytest.approx(expected, rel=1e-4), (got["losses"], expected)
