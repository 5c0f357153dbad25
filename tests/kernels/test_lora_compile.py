"""``lora_linear`` under ``torch.compile`` (aot_eager backend, CPU): one graph, eager results, lean backward.

Dense bases trace as they are; a bitsandbytes 4-bit base is dequantised through the custom op
``fms_accel_kernels::lora_dequantize_4bit`` under compile, in forward and again in backward.
"""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_kernels.lora import lora_linear

from tests.kernels.test_lora_fused import DEVICE, _tokens, lora_weights, make_base, weight_of

pytest.importorskip("bitsandbytes")

IN_F, OUT_F, R = 64, 48, 4


def _leaves(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    a, b = lora_weights(IN_F, OUT_F, R, seed=seed)
    x = _tokens(3, 5, IN_F, seed=seed + 1)
    return [t.to(DEVICE, dtype).requires_grad_(True) for t in (x, a, b)]


def _eager_and_compiled(base, dtype, fullgraph, backend="aot_eager"):
    leaves = _leaves(7, dtype)

    def step(x, a, b):
        # the weight format is read inside the compiled function, as a patched forward reads it
        return lora_linear(x, weight_of(base), a, b, 2.0, base.bias)

    y = step(*leaves)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, y.dtype)
    eager = [y.detach(), *torch.autograd.grad(y, leaves, g)]
    torch._dynamo.reset()
    c_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    y_c = torch.compile(step, backend=backend, fullgraph=fullgraph)(*c_leaves)
    compiled = [y_c.detach(), *torch.autograd.grad(y_c, c_leaves, g)]
    return eager, compiled


@pytest.mark.parametrize("base_kind", ["dense_bf16", "nf4_double_quant", "fp4"])
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks_allowed"])
def test_lora_linear_compiled_matches_eager(base_kind, fullgraph):
    base = make_base(base_kind, IN_F, OUT_F, bias=True, seed=3)
    eager, compiled = _eager_and_compiled(base, torch.float32, fullgraph)
    for name, want, got in zip(("out", "dx", "dA", "dB"), eager, compiled):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_lora_linear_compiles_in_bf16_without_graph_breaks():
    from torch._dynamo.utils import counters

    counters.clear()
    base = make_base("nf4_double_quant", IN_F, OUT_F, seed=4)
    eager, compiled = _eager_and_compiled(base, torch.bfloat16, fullgraph=False)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for want, got in zip(eager, compiled):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def _graph_outputs(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    (node,) = [n for n in gm.graph.nodes if n.op == "output"]
    outs = node.args[0]
    return [n.meta.get("val") for n in outs if isinstance(n, torch.fx.Node)]


def _graph_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_compiled_backward_dequantises_again_and_saves_no_dense_weight():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, list[torch.fx.GraphModule]] = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, _example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    base = make_base("nf4_double_quant", IN_F, OUT_F, seed=5)
    eager, compiled = _eager_and_compiled(base, torch.float32, fullgraph=True, backend=backend)
    for want, got in zip(eager, compiled):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
    op = "fms_accel_kernels.lora_dequantize_4bit.default"
    assert op in _graph_targets(graphs["fw"][0]) and op in _graph_targets(graphs["bw"][0])
    # forward outputs = the result plus what is saved for backward: no (out, in) dense weight among them
    saved_shapes = [tuple(v.shape) for v in _graph_outputs(graphs["fw"][0]) if isinstance(v, torch.Tensor)]
    assert saved_shapes, "expected graph outputs"
    assert (OUT_F, IN_F) not in saved_shapes, saved_shapes


def test_dequantize_custom_op_passes_opcheck_and_matches_the_weight():
    base = make_base("nf4_double_quant", IN_F, OUT_F, seed=6)
    weight = weight_of(base)
    s, nested = weight.state, weight.state.nested
    args = (
        weight.packed, s.absmax, s.code, nested.absmax, nested.code, nested.offset, list(s.shape), s.blocksize,
        nested.blocksize, s.quant_type, s.dtype, torch.float32,
    )  # fmt: skip
    op = torch.ops.fms_accel_kernels.lora_dequantize_4bit.default
    torch.testing.assert_close(op(*args), weight.dequantize(torch.float32), atol=0, rtol=0)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
