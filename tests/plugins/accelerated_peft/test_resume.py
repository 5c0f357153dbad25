"""Resuming from an Accelerate checkpoint reproduces the loss trajectory of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from .helpers import batches, plugin_model, tiny_llama


def _steps(accelerator, model, opt, data):
    losses = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _setup(path):
    from accelerate import Accelerator

    torch.manual_seed(11)
    _, model = plugin_model(path)
    model.train()
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    return accelerator, model, opt


def test_resume_from_accelerate_checkpoint(tmp_path):
    path = tiny_llama(tmp_path / "llama")
    data = batches(8, seed=3)

    accelerator, model, opt = _setup(path)
    straight = _steps(accelerator, model, opt, data)

    accelerator, model, opt = _setup(path)
    first = _steps(accelerator, model, opt, data[:4])
    accelerator.save_state(tmp_path / "ckpt")
    del model, opt

    torch.manual_seed(999)  # different LoRA init: the checkpoint must restore the adapters
    accelerator, model, opt = _setup(path)
    accelerator.load_state(tmp_path / "ckpt")
    second = _steps(accelerator, model, opt, data[4:])

    assert first == straight[:4]
    assert second == pytest.approx(straight[4:], abs=1e-6), (second, straight[4:])


def test_checkpoint_of_another_base_is_refused(tmp_path):
    path = tiny_llama(tmp_path / "llama")
    _, model = plugin_model(path)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("q_proj.base_layer.weight.absmax"))
    state[key] = state[key] + 1
    with pytest.raises(RuntimeError, match="4-bit statistics differ"):
        model.load_state_dict(state)
    del state[key]
    model.load_state_dict({k: v for k, v in model.state_dict().items()})  # its own state loads cleanly
