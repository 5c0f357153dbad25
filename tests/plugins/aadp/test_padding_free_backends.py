"""The attention backends and the choice among them.

The kernels of ``flash_attn`` and ``varlen`` run only on CUDA (and flash-attn is not installed here): their backends
are checked against pure-torch functions with the kernels' calling conventions (flash-attn's
``flash_attn_varlen_func``; PyTorch's ``varlen_attn`` with and without ``window_size`` / ``enable_gqa``), which
compute exactly what the kernels document. ``flex`` runs its forward on CPU (uncompiled; PyTorch has no CPU
backward for it). Every backend must equal the explicit masked attention on segments with padding, several rows,
GQA, sliding windows and soft-capping.
"""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
from fms_acceleration_accelerate_aadp.attention import (
    EagerBackend,
    FlashAttnBackend,
    FlexBackend,
    ModelNeeds,
    RunNeeds,
    SdpaBackend,
    TorchVarlenBackend,
    choose_backend,
    make_attention_function,
)
from fms_acceleration_accelerate_aadp.config import BACKEND_NAMES
from fms_acceleration_accelerate_aadp.segments import segments_of_batch

from fms_acceleration_accelerate import AccelerationConfigError
from fms_acceleration_accelerate.distributed import RunContext

from .padding_free_helpers import load_tiny, padding_free_framework, save_tiny

# the flex cases run flex_attention uncompiled on purpose (CPU forward only)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")


def _reference_varlen(q, k, v, cu, window_left, scale, softcap=None):
    """Causal attention of each segment of ``cu`` alone, keys at most ``window_left`` before the query."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        scores = qs @ ks.transpose(-1, -2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        n = end - start
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j <= i) & ((i - j) <= window_left if window_left >= 0 else True)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):  # fmt: skip
    """flash-attn 2.x's signature and semantics (causal, window (left, right), soft-capping), in plain torch."""
    assert causal and window_size[1] in (-1, 0) and dropout_p == 0.0 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    return _reference_varlen(q, k, v, cu_seqlens_q, window_size[0], scale, softcap or None)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
    """torch 2.13's ``varlen_attn`` signature: causal through ``window_size=(left, 0)``."""
    assert window_size[1] == 0 and (enable_gqa or query.shape[1] == key.shape[1])
    return _reference_varlen(query, key, value, cu_seq_q, window_size[0], scale)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None,
                     scale=None):  # fmt: skip
    """torch 2.10's ``varlen_attn`` signature: ``is_causal``, no window, no GQA."""
    assert is_causal and query.shape[1] == key.shape[1]
    return _reference_varlen(query, key, value, cu_seq_q, -1, scale)


def test_reference_signatures_are_the_installed_ones():
    from torch.nn.attention.varlen import varlen_attn

    assert list(inspect.signature(varlen_attn).parameters) == list(inspect.signature(varlen_attn_2_13).parameters)


def _segments_case(padded: bool):
    """Two rows of 10: row 0 holds examples of 4 and 6 tokens (positions restart), row 1 one of 7 (+3 pad)."""
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], list(range(10))])
    mask = torch.ones(2, 10, dtype=torch.long)
    if padded:
        mask[1, 7:] = 0
    return segments_of_batch(batch=2, length=10, device=torch.device("cpu"), position_ids=position_ids,
                             attention_mask=mask if padded else None)  # fmt: skip


def _qkv(seed=0, heads=4, kv_heads=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, 10, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, 10, 8, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    ("backend", "window", "softcap"),
    [
        (FlashAttnBackend(flash_attn_varlen_func), None, None),
        (FlashAttnBackend(flash_attn_varlen_func), 3, 5.0),
        (TorchVarlenBackend(varlen_attn_2_13), None, None),
        (TorchVarlenBackend(varlen_attn_2_13), 3, None),
        (TorchVarlenBackend(varlen_attn_2_10), None, None),
        (FlexBackend(compile=False), None, None),
        (FlexBackend(compile=False), 3, 5.0),
        (SdpaBackend(), 3, None),
    ],
    ids=[
        "flash",
        "flash-window-softcap",
        "varlen",
        "varlen-window",
        "varlen-2.10",
        "flex",
        "flex-window-softcap",
        "sdpa-window",
    ],
)
def test_backend_equals_explicit_attention(backend, window, softcap, padded):
    segments = _segments_case(padded)
    assert segments.cu_seqlens.tolist() == ([0, 4, 10, 17] if padded else [0, 4, 10, 20])
    q, k, v = _qkv()
    expected = EagerBackend().attend(q, k, v, segments, scaling=0.3, dropout=0.0, sliding_window=window,
                                     softcap=softcap)  # fmt: skip
    with torch.no_grad():
        got = backend.attend(q, k, v, segments, scaling=0.3, dropout=0.0, sliding_window=window, softcap=softcap)
    real = torch.ones(2, 10, dtype=torch.bool)
    if padded:
        real[1, 7:] = False
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_explicit_attention_keeps_examples_apart():
    """The reference itself: a key of another example (or a pad) never changes a query's output."""
    segments = _segments_case(padded=True)
    q, k, v = _qkv()
    base = EagerBackend().attend(q, k, v, segments, scaling=0.3, dropout=0.0, sliding_window=None, softcap=None)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:], v2[0, :, 4:] = 9.0, 9.0  # the second example of row 0
    k2[1, :, 7:], v2[1, :, 7:] = 9.0, 9.0  # the pads of row 1
    moved = EagerBackend().attend(q, k2, v2, segments, scaling=0.3, dropout=0.0, sliding_window=None, softcap=None)
    torch.testing.assert_close(moved[0, :4], base[0, :4], rtol=0, atol=0)
    torch.testing.assert_close(moved[1, :7], base[1, :7], rtol=0, atol=0)
    assert (moved[0, 4:] - base[0, 4:]).abs().max() > 1


# ------------------------------------------------------------------------------------------------- the choice
CPU_TRAIN = RunNeeds(device_type="cpu", dtype=torch.float32, training=True)
GPU_BF16 = RunNeeds(device_type="cuda", dtype=torch.bfloat16, training=True)


def test_auto_on_cpu_takes_sdpa_and_says_why_not_the_others():
    choice = choose_backend(BACKEND_NAMES, ModelNeeds(), CPU_TRAIN)
    assert choice.name == "sdpa"
    reasons = dict(choice.passed_over)
    assert reasons["flash_attn"] == "flash-attn is not installed"
    assert "CUDA" in reasons["varlen"] and "CPU backward" in reasons["flex"]
    assert choice.describe().startswith("sdpa (passed over flash_attn: flash-attn is not installed; varlen: ")


def test_auto_passes_over_backends_that_cannot_honour_the_model():
    softcap = choose_backend(BACKEND_NAMES, ModelNeeds(softcap=True), CPU_TRAIN)
    assert softcap.name == "eager" and dict(softcap.passed_over)["sdpa"] == "has no soft-capping"
    backends = {"flash_attn": FlashAttnBackend(flash_attn_varlen_func), "varlen": TorchVarlenBackend(varlen_attn_2_10)}
    window = choose_backend(BACKEND_NAMES, ModelNeeds(sliding_window=True), GPU_BF16, backends=backends)
    assert window.name == "flash_attn"
    window = choose_backend(BACKEND_NAMES[1:], ModelNeeds(sliding_window=True), GPU_BF16, backends=backends)
    assert window.name == "flex" and "window_size" in dict(window.passed_over)["varlen"]
    dropout = choose_backend(BACKEND_NAMES[1:], ModelNeeds(dropout=True), GPU_BF16, backends=backends)
    assert dropout.name == "sdpa"
    assert [n for n, _ in dropout.passed_over] == ["varlen", "flex"]


def test_auto_on_a_gpu_takes_torch_varlen_when_flash_attn_is_missing():
    choice = choose_backend(BACKEND_NAMES, ModelNeeds(), GPU_BF16)
    assert choice.name == "varlen"
    fp32 = choose_backend(BACKEND_NAMES, ModelNeeds(), RunNeeds(device_type="cuda", dtype=torch.float32))
    assert fp32.name == "flex" and "fp16 or bf16" in dict(fp32.passed_over)["varlen"]


@pytest.mark.parametrize(
    ("backend", "needs", "words"),
    [
        ("flash_attn", ModelNeeds(), "flash-attn is not installed"),
        ("varlen", ModelNeeds(), "needs a CUDA device"),
        ("flex", ModelNeeds(), "no CPU backward"),
        ("sdpa", ModelNeeds(softcap=True), "sdpa has no soft-capping"),
    ],
)
def test_an_explicit_backend_that_cannot_run_is_refused(backend, needs, words):
    with pytest.raises(AccelerationConfigError, match=words) as err:
        choose_backend((backend,), needs, CPU_TRAIN, path="training.attention.padding_free.attention_backend")
    assert "attention_backend: auto" in str(err.value)


def test_explicit_backend_refused_when_the_accelerator_is_created():
    framework = padding_free_framework(attention_backend="flash_attn")
    plugin = framework.plugin("padding_free")
    with pytest.raises(AccelerationConfigError, match="flash-attn is not installed") as err:
        plugin.check_run_settings(RunContext())
    assert "plugins.training.attention.padding_free.attention_backend" in str(err.value)
    padding_free_framework(attention_backend="eager").plugin("padding_free").check_run_settings(RunContext())


def test_sdpa_refused_for_a_soft_capping_model_when_patched(tmp_path):
    model = load_tiny(save_tiny("gemma2", tmp_path / "gemma2"))
    framework = padding_free_framework(attention_backend="sdpa")
    with pytest.raises(AccelerationConfigError, match="soft-capping"):
        framework.augmentation(model)
    assert model.config._attn_implementation == "eager" and framework.patches.records == ()


def test_attention_function_refuses_what_it_cannot_follow(tmp_path):
    function = make_attention_function(SdpaBackend())
    module = torch.nn.Module()
    q, k, v = _qkv()
    with pytest.raises(AccelerationConfigError, match="4-D attention mask"):
        function(module, q, k, v, torch.ones(2, 1, 10, 10, dtype=torch.bool), scaling=0.3)
    with pytest.raises(AccelerationConfigError, match="output_attentions"):
        function(module, q, k, v, None, scaling=0.3, output_attentions=True)
    with pytest.raises(AccelerationConfigError, match="one flattened row"):
        function(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 4, 10], dtype=torch.int32))
    with pytest.raises(AccelerationConfigError, match="end at the row's length"):
        function(module, q[:1], k[:1], v[:1], None, cu_seq_lens_q=torch.tensor([0, 4, 9], dtype=torch.int32))
    out, weights = function(module, q, k, v, None, scaling=0.3)  # no boundaries given: one example per row
    assert out.shape == (2, 10, 4, 8) and weights is None


# ------------------------------------------------------------------------------------------------- attention sinks
def _gpt_oss_reference(q, k, v, segments, sinks, window, scaling=0.3):
    """Each example alone through GPT-OSS's own eager attention (transformers' code: sink column, dropped after the
    softmax), with its causal (and sliding-window) additive mask."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups = sinks, q.shape[1] // k.shape[1]
    module.eval()
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    for row, cu in enumerate(([0, 4, 10], [0, 7])):
        for start, end in itertools.pairwise(cu):
            n = end - start
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            allowed = (j <= i) & ((i - j) < window if window else True)
            mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
            piece = [t[row : row + 1, :, start:end] for t in (q, k, v)]
            out[row, start:end] = eager_attention_forward(module, *piece, mask, scaling=scaling)[0][0]
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", [EagerBackend(), SdpaBackend()], ids=["eager", "sdpa"])
def test_backends_with_sinks_equal_the_models_own_attention(backend, window):
    """Attention sinks through the eager and sdpa backends: GPT-OSS's own attention, forward and backward."""
    segments = _segments_case(padded=True)
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, 7:] = False
    q, k, v = (t.requires_grad_(True) for t in _qkv(seed=4))
    sinks = torch.tensor([1.5, -0.5, 0.0, 2.5], requires_grad=True)
    leaves = (q, k, v, sinks)
    want = _gpt_oss_reference(q, k, v, segments, sinks, window)
    want_grads = torch.autograd.grad(want[real].square().sum(), leaves)
    got = backend.attend(q, k, v, segments, scaling=0.3, dropout=0.0, sliding_window=window, softcap=None, sinks=sinks)
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got[real].square().sum(), leaves)
    for name, g, w in zip(("q", "k", "v", "sinks"), grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")
    without = backend.attend(q, k, v, segments, scaling=0.3, dropout=0.0, sliding_window=window, softcap=None)
    assert (without[real] - want[real]).abs().max() > 1e-2  # the sinks matter here


def test_auto_passes_over_backends_without_sinks():
    backends = {"flash_attn": FlashAttnBackend(flash_attn_varlen_func), "varlen": TorchVarlenBackend(varlen_attn_2_13)}
    sinks = ModelNeeds(sinks=True, sliding_window=True)
    choice = choose_backend(BACKEND_NAMES, sinks, GPU_BF16, backends=backends)
    assert choice.name == "sdpa"
    assert [n for n, _ in choice.passed_over] == ["flash_attn", "varlen", "flex"]
    assert all("attention sinks" in why for _, why in choice.passed_over)
    assert "attention sinks" in sinks.describe()
    assert choose_backend(BACKEND_NAMES, sinks, CPU_TRAIN).name == "sdpa"
    with pytest.raises(AccelerationConfigError, match="flex has no attention sinks"):
        choose_backend(("flex",), sinks, GPU_BF16)


@pytest.mark.parametrize("backend", ["flash_attn", "varlen", "flex"])
def test_a_backend_without_sinks_is_refused_for_gpt_oss_before_loading(backend):
    framework = padding_free_framework(attention_backend=backend)
    with pytest.raises(AccelerationConfigError, match="gpt_oss attention has sinks") as err:
        framework.check_model_type("gpt_oss")
    assert "padding_free.attention_backend" in str(err.value) and "sdpa or eager" in str(err.value)
    framework.check_model_type("llama")  # no sinks: the backend is judged on the run (check_run_settings)
    for able in ("sdpa", "eager", "auto"):
        padding_free_framework(attention_backend=able).check_model_type("gpt_oss")


def test_attention_function_never_drops_sinks():
    q, k, v = _qkv()
    module = torch.nn.Module()
    sinks = torch.tensor([1.0, 0.0, -1.0, 2.0])
    with pytest.raises(AccelerationConfigError, match="flex padding-free attention backend got attention sinks"):
        make_attention_function(FlexBackend(compile=False))(module, q, k, v, None, scaling=0.3, s_aux=sinks)
    function = make_attention_function(EagerBackend())
    with_sinks, _ = function(module, q, k, v, None, scaling=0.3, s_aux=sinks)
    plain, _ = function(module, q, k, v, None, scaling=0.3)
    assert (with_sinks - plain).abs().max() > 1e-2
    # decoding with a cache (queries shorter than the keys) applies them too: the last query of the full call
    last, _ = function(module, q[:, :, -1:], k, v, None, scaling=0.3, s_aux=sinks)
    torch.testing.assert_close(last[:, 0], with_sinks[:, -1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- torch.compile
def test_varlen_backend_settles_its_call_path_when_chosen(monkeypatch):
    """Choosing the varlen backend inspects varlen_attn's signature and the flash ops' schemas once; ``attend``
    (traced under torch.compile) must find the answers cached, or every attention layer breaks the graph."""
    from fms_acceleration_accelerate_aadp import attention

    backend = TorchVarlenBackend(varlen_attn_2_13)
    assert choose_backend(("varlen",), ModelNeeds(), GPU_BF16, backends={"varlen": backend}).backend is backend

    def no_inspection(*args, **kwargs):
        raise AssertionError("inspected at attention time")

    assert backend._parameter_names is not None and "window_size" in backend._parameter_names  # read when chosen
    monkeypatch.setattr(attention, "_flash_ops_usable", no_inspection)
    assert backend._calls_kernels_directly() is False  # a stand-in function: the generic call path
    segments = _segments_case(padded=False)
    q, k, v = _qkv()
    got = backend.attend(q, k, v, segments, scaling=0.3, dropout=0.0, sliding_window=None, softcap=None)
    expected = EagerBackend().attend(q, k, v, segments, scaling=0.3, dropout=0.0, sliding_window=None, softcap=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_function_compiles_without_graph_breaks():
    """The registered attention function (segments given, as the decoder stack passes them) traces into one graph
    with ``fullgraph=True``, forward and backward, and computes what it computes uncompiled."""
    torch._dynamo.reset()
    segments = _segments_case(padded=True)
    function = make_attention_function(SdpaBackend())
    module = torch.nn.Module()

    def attend(q, k, v):
        return function(module, q, k, v, None, scaling=0.3, fms_padding_free_segments=segments)[0]

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True, dynamic=True)
    q, k, v = (t.requires_grad_(True) for t in _qkv())
    out = compiled(q, k, v)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = attend(q2, k2, v2)
    ref.square().sum().backward()
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, 7:] = False
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
