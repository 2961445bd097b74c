"""The ONE place in csd_ext.parallel that knows the compiled kernels' stats layout.

Two functions depend on it: `kernel_partial_states` reads the forward kernel's
stats to get each rank's partial states, and `kernel_stats` writes global stats
for the backward kernel.

The vocab-parallel loss merges the row statistics across ranks itself and
then calls the compiled backward `csd_ext::csd_backward` on the local shard,
handing it a stats tensor of the *global* row.  That tensor must follow
csd::StatsColumn in csrc/csd_math.h (max_s, log_sum_s, max_t, log_sum_t,
1/count, mean1, mean2, row weight: each softmax's max and log-sum are kept
apart, so a merged max of ~1e4 never meets the log-sum in one fp32 number).
If that layout changes, only this file changes; tests in
python_tests/test_parallel.py compare against single-process csd_loss, so a
stale layout fails them.
"""

import torch

from .._ops import NUM_STATS, STATS

# csd::StatsColumn (csrc/csd_math.h)
kMaxS, kLogSumS, kMaxT, kLogSumT = STATS["max_s"], STATS["log_sum_s"], STATS["max_t"], STATS["log_sum_t"]
kInvCount, kMean1, kMean2 = STATS["inv_count"], STATS["mean1"], STATS["mean2"]


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

    columns = [None] * NUM_STATS
    columns[kMaxS] = col(need[0], max_s)
    columns[kLogSumS] = col(need[0], torch.log(sum_s))
    columns[kMaxT] = col(need[1], max_t)
    columns[kLogSumT] = col(need[1], torch.log(sum_t))
    columns[kInvCount] = col(need[2], 1.0 / count)
    columns[kMean1] = col(True, mean1)
    columns[kMean2] = col(True, mean2)
    columns[STATS["row_weight"]] = row_weight
    stats = torch.stack(columns, dim=-1)
    assert stats.shape[-1] == NUM_STATS, "csd_ext.parallel._kernel_stats is out of date with csrc/csd_math.h"
    return stats


def kernel_partial_states(student, teacher, row_mask, need, temperature, acc):
    """Partial states [N, B, 4] of this rank's shard from the compiled forward kernel.

    csd_forward with the weighting "bb" (one base distribution b on both sides) gives per
    row lse_b, E_b d (mean1) and a loss of Var_b(d) / 2; as a state relative to its own
    max and log-sum that is (max_b, sum = exp(log_sum_b), mean = E_b d, m2 = Var_b d * sum),
    which merges by
    the same Chan formula.  A "UU" pass is always made: its 1/count tells the rows with no
    unmasked column on this shard (the kernel writes zeros there; they become the empty
    state) and gives U's state (max 0, sum = count).  Rows with row_mask False are skipped
    by the kernel and come back empty; their loss is zeroed by the caller anyway.
    """
    from ._moments import STATE_WIDTH

    rows = student.shape[0]
    bases = [i for i in range(3) if need[i]]
    out = student.new_empty((rows, len(bases), STATE_WIDTH), dtype=acc)
    if student.shape[1] == 0:
        out[..., 0] = float("-inf")
        out[..., 1:] = 0
        return out
    fwd = torch.ops.csd_ext.csd_forward
    loss_u, st_u = fwd(student, teacher, row_mask, "UU", 0.5, temperature)
    inv_count = st_u[:, kInvCount]
    empty = inv_count == 0
    one = torch.ones_like(inv_count)
    count = torch.round(one / torch.where(empty, one, inv_count))
    for j, b in enumerate(bases):
        if b == 2:
            state = (torch.zeros_like(count), count, st_u[:, kMean1], 2 * loss_u * count)
        else:
            loss_b, st_b = fwd(student, teacher, row_mask, "SS" if b == 0 else "TT", 0.5, temperature)
            # max and sum = exp(log-sum) of the shard's normaliser; m2 = Var_b(d) * sum
            shift, log_sum = (kMaxS, kLogSumS) if b == 0 else (kMaxT, kLogSumT)
            total = torch.exp(st_b[:, log_sum])
            state = (st_b[:, shift], total, st_b[:, kMean1], 2 * loss_b * total)
        out[:, j] = torch.stack(state, dim=-1)
    out[empty] = torch.tensor([float("-inf"), 0.0, 0.0, 0.0], dtype=acc, device=out.device)
    return out


# Whether the loss takes its partial states from the kernel (fast: one kernel pass per base
# distribution) or from plain PyTorch (_moments.partial_states: several passes, exact max).
# False until the stats keep each row's max and log-sum apart: today the kernel stores
# lse = max + log(sum) in fp32, which at |logit| ~ 1e4 is only good to ~5e-4 absolute, so
# the weights exp(a - lse) of merged states carry ~5e-4 relative error (measured: a 1e-3
# relative gradient difference at a common offset of 1e4, python_tests/test_parallel.py).
# With the layout change, read max and log-sum apart in kernel_partial_states and set True.
KERNEL_STATES = False


def local_partial_states(student, teacher, row_mask, need, temperature, acc):
    """This rank's partial states [N, B, 4] of shards [N, V_local], by the path chosen above."""
    if KERNEL_STATES:
        return kernel_partial_states(student, teacher, row_mask, need, temperature, acc)
    from ._moments import partial_states

    return partial_states(student, teacher, need, temperature, acc)
