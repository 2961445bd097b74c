"""Gradients on the op pair (csd_forward + csd_backward through
register_autograd), the path torch.compile traces and eager mode takes when
no fused kernel is registered for the device: the student's and the
teacher's gradients against the float64 reference with detached weights."""

import pytest
import torch

from csd_ext import _ops, csd_loss
from csd_ext.reference import csd_loss_reference
from compile_testing import fresh_compile
from csd_testing import make_labels, make_logits


def reference_grads(z, t, labels, grad_out, **kw):
    """d(sum grad_out * loss)/dz and /dt of the float64 reference, whose
    weights are detached, so d/dt = -d/dz exactly as the paper's objective."""
    zr = z.detach().double().requires_grad_(True)
    tr = t.detach().double().requires_grad_(True)
    loss = csd_loss_reference(zr, tr, labels, **kw)
    (loss * grad_out.double()).sum().backward()
    return loss.detach(), zr.grad, tr.grad


def check(run, weighting, reduction):
    z, t = make_logits((3, 4, 301), scale=3.0, seed=11, mask_frac=0.05)
    labels = make_labels((3, 4), seed=11)
    kw = dict(weighting=weighting, alpha=0.3, temperature=1.4, reduction=reduction)
    grad_out = torch.randn((3, 4) if reduction == "none" else (), generator=torch.Generator().manual_seed(1))
    zk, tk = z.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = run(zk, tk, labels, kw)
    (loss * grad_out).sum().backward()
    ref_loss, ref_gz, ref_gt = reference_grads(z, t, labels, grad_out, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    scale = ref_gz.abs().max().item()
    torch.testing.assert_close(zk.grad.double(), ref_gz, rtol=1e-4, atol=1e-5 * scale)
    assert tk.grad is not None and tk.grad.dtype == t.dtype
    torch.testing.assert_close(tk.grad.double(), ref_gt, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("weighting,reduction", [("SS", "mean"), ("TS", "none"), ("MM", "none")])
def test_teacher_and_student_gradients_through_torch_compile(weighting, reduction, monkeypatch):
    def refuse(*args):
        raise AssertionError("torch.compile must trace the op pair, not the fused path")

    monkeypatch.setattr(_ops, "fused_csd", refuse)
    with fresh_compile():  # no on-disk caches (compile_testing.py)
        compiled = torch.compile(lambda z, t, labels, kw: csd_loss(z, t, labels, **kw), fullgraph=True)
        check(compiled, weighting, reduction)


@pytest.mark.parametrize("weighting", ["SS", "TS", "MM"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_teacher_and_student_gradients_through_the_op_pair_in_eager_mode(weighting, reduction, monkeypatch):
    """With the fused kernel reported missing (as on a device without one),
    eager csd_loss runs csd_forward and the registered backward."""
    monkeypatch.setattr(_ops, "has_fused_kernel", lambda device: False)
    seen = []
    real_backward = torch.ops.csd_ext.csd_backward

    class Spy:
        def __call__(self, *args):
            seen.append(True)
            return real_backward(*args)

    monkeypatch.setattr(torch.ops.csd_ext, "csd_backward", Spy())
    check(lambda z, t, labels, kw: csd_loss(z, t, labels, **kw), weighting, reduction)
    assert seen, "the op pair's backward did not run"
