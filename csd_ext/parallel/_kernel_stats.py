"""The ONE place in csd_ext.parallel that knows the compiled kernels' stats layout.

The vocab-parallel loss merges the row statistics across ranks itself and
then calls the compiled backward `csd_ext::csd_backward` on the local shard,
handing it a stats tensor of the *global* row.  That tensor must follow
csd::StatsColumn in csrc/csd_math.h (today: lse_s, lse_t, 1/count, mean1,
mean2, row weight).  If that layout changes (e.g. keeping each row's max and
log-sum apart), only `kernel_stats` below changes; tests in
python_tests/test_parallel.py compare against single-process csd_loss, so a
stale layout fails them.
"""

import torch

from .._ops import NUM_STATS


def kernel_stats(max_s, sum_s, max_t, sum_t, count, mean1, mean2, row_weight, need, empty):
    """Stats [N, NUM_STATS] of global rows for csd_ext::csd_backward.

    max_*/sum_*: the merged S / T normalisers (max of a = logit/tau and sum of
    exp(a - max)); count: unmasked entries; mean1/mean2: E_w1 d, E_w2 d;
    row_weight: 1 for a counted row, 0 for an ignored one; need: (s, t, u)
    bools; empty: rows with no unmasked entry (every column then 0, as the
    kernels' finalize_row writes it, hence a zero gradient).
    """
    zero = torch.zeros_like(mean1)

    def col(use, value):
        return torch.where(empty, zero, value) if use else zero

    lse_s = col(need[0], max_s + torch.log(sum_s))
    lse_t = col(need[1], max_t + torch.log(sum_t))
    inv_count = col(need[2], 1.0 / count)
    stats = torch.stack([lse_s, lse_t, inv_count, col(True, mean1), col(True, mean2), row_weight], dim=-1)
    assert stats.shape[-1] == NUM_STATS, "csd_ext.parallel._kernel_stats is out of date with csrc/csd_math.h"
    return stats
