"""Issue 13 item 6: a row's max and log-sum are kept apart in the saved
statistics, so a large logit offset shared by student and teacher (both
~1e4, in fp32) costs the gradient nothing.  One fp32 log-sum-exp of ~1e4
(rounded to 2^-10) scaled each row's gradient by up to 4.9e-4."""

import pytest
import torch

from csd_testing import check_common_offset_gradient, make_labels, make_logits

OFFSET = 1e4


def _shared_offset(shape, seed):
    z, t = make_logits(shape, dtype=torch.float64, seed=seed)
    # Fractional offsets per row, so max + log-sum lands anywhere in an ulp of 1e4.
    g = torch.Generator().manual_seed(seed + 5)
    c = OFFSET + torch.rand(shape[:-1] + (1,), generator=g, dtype=torch.float64)
    return (z + c).float(), (t + c).float()


@pytest.mark.parametrize("weighting", ["SS", "TS", "ST", "MM", "SU", "TT"])
@pytest.mark.parametrize("shape", [(8, 3000), (1, 20000)], ids=["rows", "split-row"])
def test_common_offset_training_step(weighting, shape):
    """The training step (mean over valid tokens; on CPU the fused
    forward+gradient, or the two-sweep form when a row is split over threads)."""
    z, t = _shared_offset(shape, seed=11)
    labels = make_labels(shape[:-1], ignore_frac=0.2, seed=11)
    labels.view(-1)[0] = 1
    check_common_offset_gradient(z, t, labels, weighting=weighting, alpha=0.3)


@pytest.mark.parametrize("weighting", ["SS", "TS", "MU"])
def test_common_offset_backward_with_per_row_grad_output(weighting):
    """reduction="none" with a different grad_output per row: the backward op
    rebuilds the weights from the saved statistics alone."""
    z, t = _shared_offset((2, 5, 2000), seed=12)
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(4))
    check_common_offset_gradient(z, t, grad_output=g, weighting=weighting, alpha=0.3)


def test_stats_keep_max_and_log_sum_apart():
    """The stats columns hold S's and T's max and log-sum separately (csd_math.h's
    StatsColumn): max + log-sum is the log-sum-exp, and the max is the row's
    largest z (resp. t) itself, exactly."""
    from csd_ext._ops import NUM_STATS, STATS

    z, t = _shared_offset((4, 777), seed=13)
    _, stats = torch.ops.csd_ext.csd_forward(z, t, None, "TS", 0.5, 1.0)
    assert stats.shape == (4, NUM_STATS)
    assert torch.equal(stats[:, STATS["max_s"]], z.amax(-1))
    assert torch.equal(stats[:, STATS["max_t"]], t.amax(-1))
    for m, ls, x in (("max_s", "log_sum_s", z), ("max_t", "log_sum_t", t)):
        lse = stats[:, STATS[m]].double() + stats[:, STATS[ls]].double()
        torch.testing.assert_close(lse, torch.logsumexp(x.double(), -1), rtol=0, atol=1e-5)
