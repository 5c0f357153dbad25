"""Cross-entropy kernel vs reference: reductions, ignore_index, num_items_in_batch, softcap, scaling, smoothing."""

import pytest
import torch
from fms_acceleration_accelerate_kernels import cross_entropy, cross_entropy_ref, cross_entropy_triton

from tests.kernels.harness import Tolerance, check_against_reference, device_for_tests

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _targets(n, vocab, ignore_index=-100, ignored_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[::ignored_every] = ignore_index
    return target


# Loss values are O(log V); fp32 reference vs half-precision logits agree to ~1e-2 relative.
LOSS_TOL = {
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5),
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2),
    torch.float16: Tolerance(atol=1e-2, rtol=1e-2),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab", [(13, 1000), (7, 3001)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_reference(dtype, n, vocab, reduction):
    torch.manual_seed(0)
    tol = LOSS_TOL[dtype]
    check_against_reference(
        cross_entropy_ref,
        cross_entropy_triton,
        inputs=dict(logits=torch.randn(n, vocab) * 4, target=_targets(n, vocab)),
        kwargs=dict(reduction=reduction),
        dtype=dtype,
        grad_inputs=("logits",),
        tolerance=tol if reduction != "sum" else Tolerance(tol.atol * n, tol.rtol),
        # gradient entries are softmax probabilities (<= 1): absolute tolerance in the dtype's resolution
        grad_tolerance=Tolerance(
            atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5 if dtype == torch.float32 else 5e-2
        ),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [
        dict(num_items_in_batch=9),
        dict(softcap=30.0),
        dict(logits_scaling=8.0),
        dict(label_smoothing=0.1),
        dict(softcap=5.0, logits_scaling=0.5, label_smoothing=0.05, ignore_index=3),
    ],
    ids=["num_items", "softcap", "scaling", "smoothing", "combined"],
)
def test_cross_entropy_options_match_reference(dtype, options):
    torch.manual_seed(0)
    n, vocab = 11, 517
    ignore_index = options.get("ignore_index", -100)
    tol = LOSS_TOL[dtype]
    check_against_reference(
        cross_entropy_ref,
        cross_entropy_triton,
        inputs=dict(logits=torch.randn(n, vocab) * 6, target=_targets(n, vocab, ignore_index)),
        kwargs=options,
        dtype=dtype,
        grad_inputs=("logits",),
        tolerance=tol,
        grad_tolerance=Tolerance(
            atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5 if dtype == torch.float32 else 5e-2
        ),
    )


def test_num_items_in_batch_matches_hf_loss():
    """HF's ForCausalLMLoss with num_items_in_batch: sum over valid tokens / num_items_in_batch."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    torch.manual_seed(0)
    device = device_for_tests()
    logits, target = torch.randn(10, 50, device=device), _targets(10, 50).to(device)
    want = fixed_cross_entropy(logits, target, num_items_in_batch=torch.tensor(23), ignore_index=-100)
    got = cross_entropy_triton(logits, target, num_items_in_batch=torch.tensor(23))
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_cross_entropy_inplace_backward_writes_gradient_over_logits():
    torch.manual_seed(0)
    device = device_for_tests()
    base = torch.randn(6, 40, device=device)
    target = _targets(6, 40).to(device)
    ref_logits = base.clone().requires_grad_(True)
    cross_entropy_ref(ref_logits, target).backward()
    logits = base.clone().requires_grad_(True)
    cross_entropy_triton(logits, target, inplace_backward=True).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-6, rtol=1e-5)
    # the gradient was computed into the logits' own storage and adopted as .grad without a copy
    torch.testing.assert_close(logits.detach(), ref_logits.grad, atol=1e-6, rtol=1e-5)
    assert logits.grad.data_ptr() == logits.data_ptr()


def test_cross_entropy_all_ignored_mean_is_nan_like_torch():
    device = device_for_tests()
    logits = torch.randn(3, 8, device=device, requires_grad=True)
    target = torch.full((3,), -100, device=device)
    loss = cross_entropy_triton(logits, target)
    assert torch.isnan(loss)
    assert torch.isnan(torch.nn.functional.cross_entropy(logits.detach(), target))
    assert cross_entropy_triton(logits, target, reduction="sum").item() == 0.0


def test_cross_entropy_rejects_bad_options():
    device = device_for_tests()
    logits, target = torch.randn(2, 5, device=device), torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        cross_entropy(logits, target, reduction="sum", num_items_in_batch=4)
    with pytest.raises(ValueError, match="2-D"):
        cross_entropy(logits[None], target)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cross_entropy_8b_shape():
    torch.manual_seed(0)
    n, vocab = 8192, 128256
    check_against_reference(
        cross_entropy_ref,
        cross_entropy,
        inputs=dict(logits=torch.randn(n, vocab) * 3, target=_targets(n, vocab)),
        kwargs=dict(reduction="sum"),  # O(1) gradients, so the tolerances below can fail
        dtype=torch.bfloat16,
        grad_inputs=("logits",),
        tolerance=Tolerance(atol=1.0, rtol=1e-2),
        grad_tolerance=Tolerance(atol=4e-3, rtol=5e-2),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_backward_scales_by_non_unit_upstream(reduction):
    """The forward-written gradient is scaled by the incoming gradient (here 2.5, as under loss scaling)."""
    torch.manual_seed(0)
    device = device_for_tests()
    base = torch.randn(9, 300, device=device) * 3
    target = _targets(9, 300).to(device)
    ref_logits = base.clone().requires_grad_(True)
    logits = base.clone().requires_grad_(True)
    want = cross_entropy_ref(ref_logits, target, reduction=reduction, num_items_in_batch=None)
    got = cross_entropy_triton(logits, target, reduction=reduction)
    (want.sum() * 2.5).backward()
    (got.sum() * 2.5).backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-6, rtol=1e-5)


def test_cross_entropy_second_backward_raises_with_a_clear_message():
    device = device_for_tests()
    logits = torch.randn(4, 50, device=device, requires_grad=True)
    target = _targets(4, 50).to(device)
    loss = cross_entropy_triton(logits, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_cross_entropy_without_grad_leaves_logits_untouched():
    device = device_for_tests()
    logits = torch.randn(5, 70, device=device)
    target = _targets(5, 70).to(device)
    before = logits.clone()
    with torch.no_grad():
        got = cross_entropy_triton(logits, target, inplace_backward=True)
    torch.testing.assert_close(got, cross_entropy_ref(before, target))
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "launch",
    [
        (256, 2, 0, True),
        (256, 2, 0, False),
        (128, 1, 1, True),
        (512, 4, 2, False),
        (4096, 4, 1, True),
        (256, 2, 0, False, False, False),
        (128, 1, 1, True, True, False),
        (512, 4, 0, False, False, True),
        (256, 2, 0, False, False, False, True),
        (128, 1, 1, True, True, True, True),
        (4096, 4, 0, False, True, True, True),
    ],
    ids=[
        "lane",
        "block",
        "lane-persistent",
        "block-persistent",
        "one-block",
        "no-hints-forward",
        "hints-forward",
        "no-hints-reverse",
        "fixup",
        "fixup-lane-persistent",
        "fixup-one-block",
    ],
)
@pytest.mark.parametrize("options", [dict(), dict(softcap=7.0, logits_scaling=2.0, label_smoothing=0.1)])
def test_ce_row_kernel_launch_variants_agree(launch, options):
    """Every launch variant the benchmark sweeps (block, warps, persistent grid, per-lane or per-block
    statistics, L2 hints, pass-2 direction, target column written after pass 2) gives the reference loss and
    gradient, with several blocks per row; in place over the logits too."""
    from fms_acceleration_accelerate_kernels.cross_entropy import ce_forward_rows

    torch.manual_seed(0)
    device = device_for_tests()
    n, vocab = 7, 1001
    logits = torch.randn(n, vocab, device=device) * 5
    target = _targets(n, vocab).to(device)
    ref_logits = logits.clone().requires_grad_(True)
    want = cross_entropy_ref(ref_logits, target, reduction="sum", **options)
    want.backward()
    grad = torch.empty_like(logits)
    loss_rows, _lse = ce_forward_rows(
        logits, target, -100, options.get("softcap"), options.get("logits_scaling", 1.0),
        options.get("label_smoothing", 0.0), grad_out=grad, grad_scale=torch.ones(1, device=device), launch=launch,
    )  # fmt: skip
    torch.testing.assert_close(loss_rows.sum(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad, ref_logits.grad, atol=1e-6, rtol=1e-5)
    work = logits.clone()  # the gradient written over the logits (inplace_backward, fused linear CE)
    ce_forward_rows(
        work, target, -100, options.get("softcap"), options.get("logits_scaling", 1.0),
        options.get("label_smoothing", 0.0), grad_out=work, grad_scale=torch.ones(1, device=device), launch=launch,
    )  # fmt: skip
    torch.testing.assert_close(work, ref_logits.grad, atol=1e-6, rtol=1e-5)
    loss_only, _ = ce_forward_rows(
        logits, target, -100, options.get("softcap"), options.get("logits_scaling", 1.0),
        options.get("label_smoothing", 0.0), launch=launch,
    )  # fmt: skip
    torch.testing.assert_close(loss_only, loss_rows)


def test_launch_defaults_follow_the_gpu_sweeps(monkeypatch):
    """Per-GPU launch defaults: the H200 sweep's setting on an H200, the H100 one elsewhere (and on CPU)."""
    import importlib
    from types import SimpleNamespace

    ce = importlib.import_module("fms_acceleration_accelerate_kernels.cross_entropy")

    cuda = torch.device("cuda", 0)
    names = iter(["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H200"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(name=next(names)))
    assert ce.launch_defaults("fwd_grad", cuda) == ce._LAUNCH_BY_GPU["H200"]["fwd_grad"] != ce._LAUNCH["fwd_grad"]
    assert ce.launch_defaults("fwd_grad", cuda) == ce._LAUNCH["fwd_grad"]
    assert ce.launch_defaults("fwd", cuda) == ce._LAUNCH["fwd"]  # no H200 override for this kind
    assert ce.launch_defaults("fwd_grad", torch.device("cpu")) == ce._LAUNCH["fwd_grad"]
