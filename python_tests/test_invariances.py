"""Invariances and limits that follow from the definition."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from csd_ext import csd_loss
from csd_testing import ALL_WEIGHTINGS, make_logits


@given(weighting=st.sampled_from(ALL_WEIGHTINGS), seed=st.integers(0, 1000),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_shift_invariance(weighting, seed, temperature):
    """Adding a per-row constant to z or t changes neither loss nor gradient."""
    z, t = make_logits((4, 257), scale=3.0, dtype=torch.float64, seed=seed, mask_frac=0.1)
    cz = torch.randn(4, 1, dtype=torch.float64) * 50
    ct = torch.randn(4, 1, dtype=torch.float64) * 50
    kw = dict(weighting=weighting, temperature=temperature, reduction="none")
    a, b = z.clone().requires_grad_(True), (z + cz).requires_grad_(True)
    la, lb = csd_loss(a, t, **kw), csd_loss(b, t + ct, **kw)
    torch.testing.assert_close(la, lb, rtol=1e-8, atol=1e-9)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-11)


@pytest.mark.parametrize("weighting", ALL_WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_loss_and_gradient_at_optimum(weighting, dtype):
    """z = t + c is optimal for every weighting: loss 0, gradient 0."""
    _, t = make_logits((5, 1000), scale=5.0, seed=3)
    # Quarter steps below 32 plus shifts of 4k stay exact in bf16 and fp32, so
    # d = z - t is exactly the row constant and the loss must be exactly 0.
    t = (t * 4).round().clamp(-127, 127) / 4
    z = (t + torch.arange(5.0).unsqueeze(1) * 4).to(dtype).requires_grad_(True)
    t = t.to(dtype)
    loss = csd_loss(z, t, weighting=weighting, reduction="none")
    assert (loss == 0).all()
    loss.sum().backward()
    assert (z.grad == 0).all()


@given(weighting=st.sampled_from(ALL_WEIGHTINGS), seed=st.integers(0, 1000), scale=st.sampled_from([0.01, 1.0, 50.0]))
def test_non_negative(weighting, seed, scale):
    z, t = make_logits((8, 333), scale=scale, seed=seed, mask_frac=0.2)
    assert (csd_loss(z, t, weighting=weighting, reduction="none") >= 0).all()


@pytest.mark.parametrize("weighting", ALL_WEIGHTINGS)
def test_masking_a_column_equals_slicing_it_off(weighting):
    z, t = make_logits((6, 64), scale=4.0, dtype=torch.float64, seed=11)
    keep = torch.ones(64, dtype=torch.bool)
    keep[[0, 5, 17, 63]] = False
    zm = z.clone()
    zm[:, ~keep] = -math.inf          # masked in the student ...
    tm = t.clone()
    tm[:, 17] = -math.inf             # ... or in the teacher
    zm = zm.requires_grad_(True)
    zs = z[:, keep].clone().requires_grad_(True)
    lm = csd_loss(zm, tm, weighting=weighting, reduction="none")
    ls = csd_loss(zs, t[:, keep], weighting=weighting, reduction="none")
    torch.testing.assert_close(lm, ls, rtol=1e-10, atol=1e-12)
    lm.sum().backward()
    ls.sum().backward()
    assert (zm.grad[:, ~keep] == 0).all()
    torch.testing.assert_close(zm.grad[:, keep], zs.grad, rtol=1e-10, atol=1e-13)


def test_fully_masked_row_gives_zero():
    z, t = make_logits((3, 10), seed=1)
    z[1] = -math.inf
    t[2, :5] = -math.inf
    z[2, 5:] = -math.inf
    z.requires_grad_(True)
    for weighting in ALL_WEIGHTINGS:
        loss = csd_loss(z, t, weighting=weighting, reduction="none")
        assert torch.isfinite(loss).all() and loss[1] == 0 and loss[2] == 0
        z.grad = None
        loss.sum().backward()
        assert torch.isfinite(z.grad).all() and (z.grad[1:] == 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("weighting", ["SS", "TS", "US", "MM", "UU"])
def test_nan_or_pos_inf_gives_nan_not_crash(bad, where, weighting):
    z, t = make_logits((3, 4099), seed=2)
    (z if where == "student" else t)[1, 1234] = bad
    loss = csd_loss(z, t, weighting=weighting, reduction="none")
    assert torch.isnan(loss[1])
    assert torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(csd_loss(z, t, weighting=weighting))
