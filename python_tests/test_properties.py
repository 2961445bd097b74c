"""Property tests: the kernel against the plain PyTorch reference in float64,
and the reference against the O(V^2) pairwise definition."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from csd_ext import csd_loss
from csd_ext.reference import csd_pairwise_per_row, csd_per_row
from csd_testing import ALL_WEIGHTINGS, FLOAT_DTYPES, check_against_reference, make_labels, make_logits

lead_shapes = st.one_of(
    st.tuples(st.integers(0, 9)),
    st.tuples(st.integers(1, 3), st.integers(1, 5)),
)
vocab_sizes = st.one_of(st.integers(1, 40), st.integers(41, 3000), st.sampled_from([4095, 4096, 4097, 8191, 32000]))


@given(
    lead=lead_shapes,
    vocab=vocab_sizes,
    dtypes=st.tuples(st.sampled_from(FLOAT_DTYPES), st.sampled_from(FLOAT_DTYPES)),
    weighting=st.sampled_from(ALL_WEIGHTINGS),
    temperature=st.sampled_from([0.5, 1.0, 1.5, 3.0]),
    alpha=st.floats(0.0, 1.0),
    mask_frac=st.sampled_from([0.0, 0.0, 0.1, 0.6]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    scale=st.sampled_from([0.1, 3.0, 30.0, 100.0]),
    offset=st.sampled_from([0.0, 7.5, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(lead, vocab, dtypes, weighting, temperature, alpha, mask_frac, ignore_frac,
                                  scale, offset, seed):
    shape = (*lead, vocab)
    if math.prod(shape) > 150_000:
        vocab = max(1, 150_000 // max(1, math.prod(lead)))
        shape = (*lead, vocab)
    z, _ = make_logits(shape, scale=scale, dtype=dtypes[0], seed=seed, mask_frac=mask_frac)
    _, t = make_logits(shape, scale=scale, offset=offset, dtype=dtypes[1], seed=seed, mask_frac=mask_frac)
    labels = make_labels(lead, ignore_frac=ignore_frac, seed=seed)
    check_against_reference(z, t, labels, weighting=weighting, alpha=alpha, temperature=temperature)


@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 48),
    weighting=st.sampled_from(ALL_WEIGHTINGS),
    temperature=st.sampled_from([0.7, 1.0, 2.0]),
    alpha=st.floats(0.0, 1.0),
    mask_frac=st.sampled_from([0.0, 0.3]),
    scale=st.sampled_from([1.0, 20.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_pairwise_definition(rows, vocab, weighting, temperature, alpha, mask_frac, scale, seed):
    """An independent check: 1/4 sum_y sum_x w1(y) w2(x) (d_x - d_y)^2 in float64."""
    z, t = make_logits((rows, vocab), scale=scale, dtype=torch.float64, seed=seed, mask_frac=mask_frac)
    pairwise = csd_pairwise_per_row(z, t, weighting, alpha, temperature)
    torch.testing.assert_close(csd_per_row(z, t, weighting, alpha, temperature), pairwise, rtol=1e-10, atol=1e-10)
    kernel = csd_loss(z, t, weighting=weighting, alpha=alpha, temperature=temperature, reduction="none")
    torch.testing.assert_close(kernel, pairwise, rtol=1e-9, atol=1e-9)
    check_against_reference(z.float(), t.float(), weighting=weighting, alpha=alpha, temperature=temperature)


@pytest.mark.parametrize("vocab", [1, 7, 17, 4097, 50257, 70001])
@pytest.mark.parametrize("weighting", ["SS", "TS", "US", "MM"])
def test_large_and_odd_vocab(vocab, weighting):
    rows = 3 if vocab > 10000 else 11
    z, t = make_logits((rows, vocab), scale=10.0, seed=vocab, mask_frac=0.05)
    check_against_reference(z, t, weighting=weighting, temperature=1.5)
