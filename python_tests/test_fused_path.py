"""The fused forward (csd_forward_grad + csd_backward_reuse_), which eager
csd_loss uses when an input requires grad: same gradients as the op pair,
whatever the backward hands it, and the gradient is adopted without a copy."""

import pytest
import torch

from csd_ext import _ops, csd_loss
from csd_ext.reference import csd_loss_reference
from compile_testing import fresh_compile

pytestmark = pytest.mark.skipif(not _ops.has_fused_kernel(torch.device("cpu")),
                                reason="no fused CPU kernel in this build")


def _logits(n, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, v, generator=g) * 3
    z = base + 1.5 * torch.randn(n, v, generator=g)
    z[0, 3] = float("-inf")
    return z.to(dtype), base.to(dtype)


def _two_pass_grad(z, t, labels, grad_per_row, **kw):
    """The gradient from the standalone op pair for a given per-row grad_output."""
    row_mask = None if labels is None else labels != -100
    _, stats = torch.ops.csd_ext.csd_forward(z, t, row_mask, kw["weighting"], kw["alpha"], kw["temperature"])
    return torch.ops.csd_ext.csd_backward(grad_per_row.to(stats.dtype), z, t, stats, kw["weighting"], kw["alpha"],
                                          kw["temperature"])


def _close(a, b, dtype):
    # The fused pass scales each tile's stored weights instead of recomputing
    # exp per entry: a few fp32 roundings apart (relative to the row's largest
    # entries where g_k cancels near the mean), i.e. at most one ulp of bf16.
    scale = b.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6 * scale)
    else:
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighting", ["SS", "TS", "US", "MM", "UU", "TU"])
@pytest.mark.parametrize("shape", [(6, 9001), (1, 20000)])  # whole rows per thread / a row split across threads
def test_fused_gradient_equals_the_op_pair(dtype, weighting, shape):
    z, t = _logits(*shape, dtype)
    labels = torch.arange(shape[0])
    labels[-1] = -100 if shape[0] > 1 else 0
    kw = dict(weighting=weighting, alpha=0.3, temperature=1.3)
    zf = z.clone().requires_grad_(True)
    csd_loss(zf, t, labels, **kw).backward()
    counted = (labels != -100).float()
    expected = _two_pass_grad(z, t, labels, counted / counted.sum(), **kw)
    _close(zf.grad, expected, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_other_grad_outputs_are_recomputed_exactly(reduction):
    """reduction='none' with arbitrary per-row weights, or a scaled loss: rows
    whose grad_output is not the anticipated one are recomputed."""
    z, t = _logits(5, 5003, torch.float32)
    kw = dict(weighting="TS", alpha=0.5, temperature=1.0)
    w = torch.tensor([0.5, 2.0, 1.0, 0.0, -1.0])
    zf = z.clone().requires_grad_(True)
    loss = csd_loss(zf, t, reduction=reduction, **kw)
    (loss * w).sum().backward() if reduction == "none" else (0.25 * loss).backward()
    per_row = w if reduction == "none" else torch.full((5,), 0.25)
    _close(zf.grad, _two_pass_grad(z, t, None, per_row, **kw), torch.float32)


def test_retain_graph_backward_is_reentrant():
    """Backward through the same graph again gives bit-identical gradients,
    although the first one was handed over as .grad (and accumulated into)."""
    z, t = _logits(4, 3000, torch.float32)
    zf = z.clone().requires_grad_(True)
    loss = csd_loss(zf, t, weighting="TS")
    loss.backward(retain_graph=True)
    first = zf.grad.clone()
    (g2,) = torch.autograd.grad(loss, [zf], retain_graph=True)
    assert torch.equal(g2, first)
    loss.backward()
    torch.testing.assert_close(zf.grad, 2 * first, rtol=1e-6, atol=0)


def test_teacher_gradient_is_the_negative():
    z, t = _logits(4, 3000, torch.float32)
    zf, tf = z.clone().requires_grad_(True), t.clone().requires_grad_(True)
    csd_loss(zf, tf, weighting="MM").backward()
    torch.testing.assert_close(tf.grad, -zf.grad)


def test_autograd_grad_matches_backward():
    z, t = _logits(3, 4000, torch.bfloat16)
    a = z.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(csd_loss(a, t), [a])
    b = z.clone().requires_grad_(True)
    csd_loss(b, t).backward()
    assert torch.equal(ga, b.grad)


def test_the_precomputed_gradient_becomes_grad_without_a_copy(monkeypatch):
    seen = {}
    real = torch.ops.csd_ext.csd_backward_reuse_

    class Spy:
        def __call__(self, grad_loss, student, teacher, stats, grad, *rest):
            seen["ptr"] = grad.data_ptr()
            return real(grad_loss, student, teacher, stats, grad, *rest)

    monkeypatch.setattr(torch.ops.csd_ext, "csd_backward_reuse_", Spy())
    z, t = _logits(8, 5000, torch.bfloat16)
    zf = z.clone().requires_grad_(True)
    csd_loss(zf, t).backward()
    assert seen["ptr"] == zf.grad.data_ptr()


def test_no_grad_and_compile_use_the_op_pair(monkeypatch):
    def refuse(*args):
        raise AssertionError("the fused path must not run here")

    monkeypatch.setattr(_ops, "fused_csd", refuse)
    z, t = _logits(2, 100, torch.float32)
    with torch.no_grad():
        csd_loss(z.clone().requires_grad_(True), t)
    csd_loss(z, t)  # nothing requires grad
    zc = z.clone().requires_grad_(True)
    with fresh_compile():  # no on-disk caches (compile_testing.py)
        torch.compile(csd_loss, fullgraph=True)(zc, t).backward()  # traced: the op pair
    # Its values: the op pair's own gradient for a mean over 2 rows, and the
    # float64 reference's (detached weights).
    _close(zc.grad, _two_pass_grad(z, t, None, torch.full((2,), 0.5), weighting="SS", alpha=0.5, temperature=1.0),
           torch.float32)
    zr = z.double().requires_grad_(True)
    csd_loss_reference(zr, t.double()).backward()
    torch.testing.assert_close(zc.grad.double(), zr.grad, rtol=1e-4, atol=1e-5 * zr.grad.abs().max().item())


@pytest.mark.parametrize("args", [
    lambda: (*_logits(3, 1000, torch.bfloat16), torch.tensor([True, False, True]), "TS", 0.5, 1.5, 0.5),
    lambda: (*_logits(2, 77, torch.float32), None, "UU", 0.5, 1.0, 1.0),
])
def test_opcheck_forward_grad(args):
    torch.library.opcheck(torch.ops.csd_ext.csd_forward_grad.default, args())


def test_opcheck_backward_reuse():
    z, t = _logits(3, 1000, torch.float32)
    _, stats, grad = torch.ops.csd_ext.csd_forward_grad(z, t, None, "SS", 0.5, 1.0, 1.0 / 3)
    grad_loss = torch.tensor([1.0 / 3, 0.5, 1.0 / 3])
    torch.library.opcheck(torch.ops.csd_ext.csd_backward_reuse_.default,
                          (grad_loss, z, t, stats, grad, "SS", 0.5, 1.0, 1.0 / 3))


def test_rows_with_the_anticipated_grad_output_are_left_alone():
    z, t = _logits(3, 1000, torch.float32)
    _, stats, grad = torch.ops.csd_ext.csd_forward_grad(z, t, None, "SS", 0.5, 1.0, 0.25)
    before = grad.clone()
    torch.ops.csd_ext.csd_backward_reuse_(torch.tensor([0.25, 0.5, 0.25]), z, t, stats, grad, "SS", 0.5, 1.0, 0.25)
    assert torch.equal(grad[0], before[0]) and torch.equal(grad[2], before[2])
    _close(grad[1], 2 * before[1], torch.float32)
