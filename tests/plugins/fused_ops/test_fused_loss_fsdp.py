"""fast_loss: fused_linear when lm_head is an FSDP2 unit of its own (Accelerate 1.15 groups [norm, lm_head])."""

from __future__ import annotations

import pytest
import torch

from .tiny_models import loss_and_grads, make_framework, tiny_batch, tiny_model


@pytest.mark.parametrize("grouped", [False, True])
def test_fused_linear_loss_with_lm_head_its_own_fsdp2_unit(tmp_path, grouped):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    batch = tiny_batch()
    reference = tiny_model("llama")
    make_framework({"fast_loss": "fused_linear"}).augmentation(reference, None, ())
    expected, expected_grads = loss_and_grads(reference, batch)

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = tiny_model("llama")
        framework = make_framework({"fast_loss": "fused_linear"})
        framework.augmentation(model, None, ())
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard([model.model.norm, model.lm_head] if grouped else model.lm_head)
        fully_shard(model)
        assert type(model.lm_head.weight).__name__ == "DTensor"  # sharded outside its forward
        actual, grads = loss_and_grads(model, batch)
        assert actual.logits is None
        torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == expected_grads.keys()
        for name, g in grads.items():
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            torch.testing.assert_close(g, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()
