"""Per-token loss entry points (a trainer's own loss from token log-probabilities, plus entropy / top-1 metrics):
cross_entropy_per_token and fused_linear_cross_entropy_per_token against their references, forward and the
gradients for uniform and per-token incoming gradients."""

import pytest
import torch
from fms_acceleration_accelerate_kernels.cross_entropy import (
    cross_entropy_per_token,
    cross_entropy_per_token_ref,
    cross_entropy_per_token_triton,
)
from fms_acceleration_accelerate_kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy_per_token,
    fused_linear_cross_entropy_per_token_ref,
    fused_linear_cross_entropy_per_token_triton,
)

from tests.kernels.harness import device_for_tests

# (loss/entropy atol, gradient atol) per dtype; the dtype rounds the logits (or the gradients' GEMM inputs) once
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 4e-2)}


def _targets(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[1::4] = -100
    return target


def _with_ties(logits, target):
    """Rows whose target is the maximum, alone (top-1), tied with an earlier column (not top-1, as argmax
    picks the first) and tied with a later column (top-1)."""
    vocab = logits.shape[1]
    for row, other in ((0, None), (2, 0), (3, vocab - 1)):
        t = int(target[row])
        if t in (0, vocab - 1):
            target[row] = t = vocab // 2
        logits[row, t] = 40.0
        if other is not None:
            logits[row, other] = 40.0
    return logits, target


def _compare(got, want, dtype, grads_got=(), grads_want=()):
    atol, gatol = TOL[dtype]
    loss, entropy, top1 = got
    want_loss, want_entropy, want_top1 = want
    torch.testing.assert_close(loss, want_loss, atol=atol, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=atol, rtol=1e-5)
    assert top1.dtype == torch.bool and torch.equal(top1, want_top1)
    for g, w in zip(grads_got, grads_want, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g.float(), w.float(), atol=gatol, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options", [dict(), dict(softcap=7.0, logits_scaling=2.0), dict(logits_scaling=0.5)], ids=["plain", "cap", "scale"]
)
def test_cross_entropy_per_token_matches_reference(dtype, options):
    device = device_for_tests()
    n, vocab = 9, 1001  # several blocks per row
    torch.manual_seed(0)
    logits, target = _with_ties(torch.randn(n, vocab) * 3, _targets(n, vocab))
    logits, target = logits.to(device=device, dtype=dtype), target.to(device)
    weights = torch.randn(n, device=device)  # a loss weighting every token differently
    results = []
    for fn in (cross_entropy_per_token_ref, cross_entropy_per_token_triton):
        x = logits.clone().requires_grad_(True)
        out = fn(x, target, **options)
        (out[0] * weights).sum().backward()
        results.append((tuple(t.detach() for t in out), x.grad))
    (want, want_grad), (got, got_grad) = results
    assert want[2][[0, 2, 3]].tolist() == [True, False, True]  # the tie rule itself
    assert torch.all(got[0][target == -100] == 0) and torch.all(got[1][target == -100] == 0)
    _compare(got, want, dtype, (got_grad,), (want_grad,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("incoming", ["uniform", "per_token"])
@pytest.mark.parametrize("chunk_rows", [4, None])
def test_fused_linear_per_token_matches_reference(dtype, incoming, chunk_rows):
    device = device_for_tests()
    n, hidden_size, vocab = 13, 24, 301
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, hidden_size, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / 4).to(device, dtype)
    bias = (torch.randn(vocab, generator=g) * 0.1).to(device, dtype)
    target = _targets(n, vocab, seed=2).to(device)
    # a token mean (one value on every row: the weight gradient is scaled as a whole) or per-token weights
    # (the weight gradient is recomputed from the stored log-sum-exp)
    weights = torch.full((n,), 0.37) if incoming == "uniform" else torch.rand(n, generator=g)
    weights = weights.to(device)
    results = []
    for fn, extra in (
        (fused_linear_cross_entropy_per_token_ref, {}),
        (fused_linear_cross_entropy_per_token_triton, {"chunk_rows": chunk_rows}),
    ):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        out = fn(h, w, target, b, softcap=9.0, logits_scaling=1.5, **extra)
        (out[0] * weights).sum().backward()
        results.append((tuple(t.detach() for t in out), (h.grad, w.grad, b.grad)))
    (want, want_grads), (got, got_grads) = results
    _compare(got, want, dtype, got_grads, want_grads)


def test_fused_linear_per_token_frozen_weight_and_no_grad():
    device = device_for_tests()
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 16, generator=g).to(device)
    weight = torch.randn(50, 16, generator=g).to(device)
    target = _targets(7, 50).to(device)
    h = hidden.clone().requires_grad_(True)
    loss, _entropy, _top1 = fused_linear_cross_entropy_per_token_triton(h, weight, target, chunk_rows=3)
    (loss * torch.arange(7.0, device=device)).sum().backward()
    ref_h = hidden.clone().requires_grad_(True)
    ref_loss = fused_linear_cross_entropy_per_token_ref(ref_h, weight, target)[0]
    (ref_loss * torch.arange(7.0, device=device)).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, ref_h.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        got = fused_linear_cross_entropy_per_token_triton(hidden, weight, target, chunk_rows=3)
    _compare(got, fused_linear_cross_entropy_per_token_ref(hidden, weight, target), torch.float32)


def test_no_scored_row_gives_zero_gradients():
    device = device_for_tests()
    hidden = torch.randn(4, 8, device=device, requires_grad=True)
    weight = torch.randn(20, 8, device=device, requires_grad=True)
    target = torch.full((4,), -100, device=device)
    loss, entropy, top1 = fused_linear_cross_entropy_per_token(hidden, weight, target)
    assert torch.all(loss == 0) and torch.all(entropy == 0) and not top1.any()
    loss.sum().backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("which", ["cross_entropy", "fused_linear"])
@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_entropy_gradient_is_refused_not_dropped(which, implementation, monkeypatch):
    """The entropy is for metrics: a loss that uses it (an entropy bonus) raises instead of training silently
    without that term."""
    device = device_for_tests()
    if implementation == "reference" and device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden = torch.randn(5, 8, device=device, requires_grad=True)
    weight = torch.randn(30, 8, device=device)
    target = _targets(5, 30).to(device)
    if which == "cross_entropy":
        loss, entropy, _ = cross_entropy_per_token(hidden @ weight.t(), target)
    else:
        loss, entropy, _ = fused_linear_cross_entropy_per_token(hidden, weight, target)
    with pytest.raises(RuntimeError, match="entropy"):
        (loss.sum() - 0.1 * entropy.sum()).backward()


def test_fused_linear_per_token_second_backward_refused():
    device = device_for_tests()
    hidden = torch.randn(5, 8, device=device, requires_grad=True)
    loss = fused_linear_cross_entropy_per_token_triton(
        hidden, torch.randn(30, 8, device=device), _targets(5, 30).to(device)
    )[0]
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.sum().backward()
