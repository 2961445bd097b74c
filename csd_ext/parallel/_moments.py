"""Per-rank partial row statistics of CSD, their merge, and the row loss.

For one row and one base distribution w ∝ exp(a) (a = z/τ for S, t/τ for T,
0 for U) over this rank's unmasked columns, the partial state is

    max  = max_i a_i                          (-inf when there is none)
    sum  = Σ_i exp(a_i - max)                 (for U: the count)
    mean = Σ_i exp(a_i - max) d_i / sum       (d = z - t)
    m2   = Σ_i exp(a_i - max) (d_i - mean)^2  (centred, on the scale of sum)

exactly csd::Moments of csrc/csd_math.h, and two states merge by the same
Chan formula (`merge` there), here vectorised over rows.

`partial_states` below computes them in plain PyTorch, in the accumulation
dtype (fp32, fp64 for fp64 inputs), a block of rows at a time, so no [N, V]
tensor and only a few [block, V_local] temporaries exist.  The kernel-derived
alternative, and why it is not used yet, is in _kernel_stats.py.
"""

import torch

# Columns of a packed state: [N, B, 4] for the B base distributions in use.
MAX, SUM, MEAN, M2 = range(4)
STATE_WIDTH = 4
BASES = "STU"
PARTIAL_BLOCK_BYTES = 32 << 20


def mixture_of(letter, alpha):
    """(cS, cT, cU) of a weighting letter: M = α T + (1-α) S."""
    return {"S": (1.0, 0.0, 0.0), "T": (0.0, 1.0, 0.0), "U": (0.0, 0.0, 1.0), "M": (1.0 - alpha, alpha, 0.0)}[letter]


def needs_of(weighting, alpha):
    """Which of S, T, U the pair of weightings uses (a zero coefficient is not a use)."""
    w1, w2 = mixture_of(weighting[0], alpha), mixture_of(weighting[1], alpha)
    return tuple(w1[i] != 0.0 or w2[i] != 0.0 for i in range(3))


def _dot_rows(x, y):
    """Σ_i x_i y_i per row, as a batched GEMV: no [rows, V] temporary."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).reshape(x.shape[0])


def _block_moments(a, d):
    """Moments of d under exp(a) per row of a block: a = -inf, d = 0 at masked columns.

    `a` is consumed (overwritten in place) to save [block, V] temporaries."""
    mx = a.amax(dim=-1)
    shift = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
    e = a.sub_(shift[:, None]).exp_()
    s = e.sum(dim=-1)
    mean = _dot_rows(e, d) / s
    c = d - mean[:, None]
    m2 = _dot_rows(e.mul_(c), c)
    # A row with no unmasked column: the canonical empty state (sum 0 is false for NaN,
    # so a NaN row stays NaN and is never mistaken for empty).
    empty = s == 0
    zero = torch.zeros_like(s)
    return torch.stack([
        torch.where(empty, torch.full_like(mx, float("-inf")), mx),
        torch.where(empty, zero, s),
        torch.where(empty, zero, mean),
        torch.where(empty, zero, m2),
    ], dim=-1)


def partial_states(student, teacher, need, temperature, acc):
    """Partial states [N, B, 4] (acc dtype) of this rank's shard [N, V_local] for the bases in `need`."""
    rows, width = student.shape
    bases = [i for i in range(3) if need[i]]
    out = student.new_empty((rows, len(bases), STATE_WIDTH), dtype=acc)
    if width == 0:  # an empty shard contributes the empty state
        out[..., MAX] = float("-inf")
        out[..., SUM:] = 0
        return out
    per_row = width * torch.empty((), dtype=acc).element_size() * 4
    block = max(1, PARTIAL_BLOCK_BYTES // per_row)
    inv_t = 1.0 / temperature
    for s in range(0, rows, block):
        e = min(rows, s + block)
        z = student[s:e].to(acc)
        t = teacher[s:e].to(acc)
        masked = torch.isneginf(z).logical_or_(torch.isneginf(t))
        d = torch.sub(z, t).masked_fill_(masked, 0.0)
        for j, base in enumerate(bases):
            if base == 2:
                a = torch.zeros_like(d)
            else:
                a = torch.mul(z if base == 0 else t, inv_t)
            out[s:e, j] = _block_moments(a.masked_fill_(masked, float("-inf")), d)
    return out


def merge(a, b):
    """Chan's parallel merge of two packed states [..., 4] (csd::merge, vectorised)."""
    a_max, a_sum, a_mean, a_m2 = a.unbind(-1)
    b_max, b_sum, b_mean, b_m2 = b.unbind(-1)
    mx = torch.maximum(a_max, b_max)  # propagates NaN, like csd::max_nan
    ca = torch.exp(a_max - mx)
    cb = torch.exp(b_max - mx)
    sa, sb = a_sum * ca, b_sum * cb
    s = sa + sb
    frac_b = sb / s
    delta = b_mean - a_mean
    merged = torch.stack([mx, s, a_mean + delta * frac_b, a_m2 * ca + b_m2 * cb + delta * delta * sa * frac_b], -1)
    # Empty operands (sum == 0) pass the other side through unchanged, as in csd::merge.
    out = torch.where((a_sum == 0)[..., None], b, merged)
    return torch.where((b_sum == 0)[..., None], a, out)


def merge_ranks(gathered):
    """Left fold over ranks in rank order of gathered states [R, N, B, 4]: the same
    operations in the same order on every rank, hence bitwise the same result."""
    state = gathered[0]
    for r in range(1, gathered.shape[0]):
        state = merge(state, gathered[r])
    return state


def _mixture_mean_var(w, means, variances):
    """Mean and variance under cS S + cT T + cU U, by Σ c_i Var_i + Σ c_i (E_i - E)^2 (csd::mixture_mean_var)."""
    mean = 0.0
    for c, m in zip(w, means):
        if c != 0.0:
            mean = mean + c * m
    var = 0.0
    for c, m, v in zip(w, means, variances):
        if c != 0.0:
            dev = m - mean
            var = var + c * (v + dev * dev)
    return mean, var


def finalize(state, need, weighting, alpha):
    """Row loss and the per-base merged moments from merged states [N, B, 4].

    Returns (loss [N], mean1 [N], mean2 [N], per-base (max, sum) list, count [N], empty [N]).
    """
    cols = iter(range(state.shape[1]))
    per_base = [state[:, next(cols)] if need[i] else None for i in range(3)]
    zero = torch.zeros_like(state[:, 0, 0])
    means = [zero if b is None else b[:, MEAN] for b in per_base]
    variances = [zero if b is None else b[:, M2] / b[:, SUM] for b in per_base]
    empty = torch.zeros_like(zero, dtype=torch.bool)
    for b in per_base:
        if b is not None:
            empty = empty | (b[:, SUM] == 0)
    mean1, var1 = _mixture_mean_var(mixture_of(weighting[0], alpha), means, variances)
    mean2, var2 = _mixture_mean_var(mixture_of(weighting[1], alpha), means, variances)
    gap = mean1 - mean2
    loss = torch.where(empty, zero, 0.25 * (var1 + var2 + gap * gap))
    mean1 = torch.where(empty, zero, mean1 + zero)
    mean2 = torch.where(empty, zero, mean2 + zero)
    return loss, mean1, mean2, per_base, empty
