"""Gradient identities: gradcheck where it applies, and the reverse-KL identity."""

import pytest
import torch
import torch.nn.functional as F

from csd_ext import csd_loss
from csd_ext.reference import csd_loss_reference
from csd_testing import make_logits


@pytest.mark.parametrize("weighting", ["TT", "UU", "TU", "UT"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_gradcheck_when_weights_do_not_depend_on_student(weighting, temperature):
    """T and U weights are constants of z, so the stop-gradient gradient is the
    true derivative of the value and finite differences must agree."""
    z, t = make_logits((3, 2, 11), scale=2.0, dtype=torch.float64, seed=5, mask_frac=0.1)
    z.requires_grad_(True)
    labels = torch.tensor([[1, -100], [2, 3], [-100, 4]])
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x: csd_loss(x, t, labels, weighting=weighting, temperature=temperature, reduction=reduction),
            (z,), eps=1e-6, atol=1e-8,
        )


def test_gradcheck_teacher_gets_negative_gradient():
    z, t = make_logits((4, 9), dtype=torch.float64, seed=2)
    t.requires_grad_(True)
    # With U weights the loss is a function of d = z - t only, so the teacher's
    # gradient (the negative of the student's) is exact and gradcheck applies.
    assert torch.autograd.gradcheck(lambda y: csd_loss(z, y, weighting="UU"), (t,), eps=1e-6, atol=1e-8)
    z.requires_grad_(True)
    t.grad = None
    csd_loss(z, t, weighting="SS").backward()
    torch.testing.assert_close(t.grad, -z.grad)


@pytest.mark.parametrize("weighting", ["SS", "SM", "MS", "ST", "TS", "SU", "MM"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_student_weight_gradients_match_the_detached_weight_reference(weighting, temperature):
    """For S and M weights the gradient is the paper's stop-gradient gradient,
    not the derivative of the value (so gradcheck does not apply): compare it
    with float64 autograd of the reference, whose weights are detached."""
    z, t = make_logits((3, 2, 11), scale=2.0, dtype=torch.float64, seed=1, mask_frac=0.1)
    labels = torch.tensor([[1, -100], [2, 3], [-100, 4]])
    grad_out = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kw = dict(weighting=weighting, alpha=0.3, temperature=temperature)
    for reduction in ("mean", "sum", "none"):
        zk, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        loss = csd_loss(zk, t, labels, reduction=reduction, **kw)
        ref = csd_loss_reference(zr, t, labels, reduction=reduction, **kw)
        (loss * (grad_out if reduction == "none" else 1.0)).sum().backward()
        (ref * (grad_out if reduction == "none" else 1.0)).sum().backward()
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(zk.grad, zr.grad, rtol=1e-10, atol=1e-13)
    # ...and it is indeed not the derivative of the value (the documented caveat).
    zc = z.clone().requires_grad_(True)
    assert not torch.autograd.gradcheck(lambda x: csd_loss(x, t, labels, **kw), (zc,), eps=1e-6, atol=1e-8,
                                        raise_exception=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ss_at_unit_temperature_is_reverse_kl_gradient(dtype):
    """For SS at tau = 1, s_k (d_k - E_s d) is the gradient of KL(softmax z || softmax t)."""
    z, t = make_logits((6, 301), scale=4.0, dtype=dtype, seed=9)
    zc = z.clone().requires_grad_(True)
    csd_loss(zc, t, weighting="SS", reduction="sum").backward()
    zk = z.double().clone().requires_grad_(True)
    log_q, log_p = F.log_softmax(zk, -1), F.log_softmax(t.double(), -1)
    (log_q.exp() * (log_q - log_p)).sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(zc.grad.double(), zk.grad, rtol=tol * 100, atol=tol)


def test_tt_and_uu_gradients_closed_form():
    z, t = make_logits((5, 50), scale=3.0, dtype=torch.float64, seed=4)
    d = z - t
    for weighting, w in (("TT", torch.softmax(t, -1)), ("UU", torch.full_like(z, 1 / 50))):
        zc = z.clone().requires_grad_(True)
        csd_loss(zc, t, weighting=weighting, reduction="sum").backward()
        expected = w * (d - (w * d).sum(-1, keepdim=True))
        torch.testing.assert_close(zc.grad, expected, rtol=1e-10, atol=1e-13)
