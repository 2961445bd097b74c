"""sparse_csd_loss and fused_linear_sparse_csd against csd_loss on the -inf-masked full teacher."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from csd_ext import csd_loss, fused_linear_sparse_csd, sparse_csd_loss

WEIGHTINGS = [a + b for a in "STUM" for b in "STUM"]


def support(n, v, k, *, pad_frac=0.0, seed=0):
    """Distinct ids per row (a random permutation's first k), some replaced by -1 padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    if pad_frac:
        ids[torch.rand(ids.shape, generator=g) < pad_frac] = -1
    return ids


def masked_full(ids, values, v):
    """The full teacher sparse_csd_loss stands for: -inf off the support."""
    t = torch.full((*ids.shape[:-1], v), float("-inf"), dtype=values.dtype)
    valid = ids >= 0
    rows = torch.arange(ids[..., 0].numel()).reshape(ids.shape[:-1]).unsqueeze(-1).expand(ids.shape)
    t.view(-1, v)[rows[valid], ids[valid]] = values[valid]
    return t


def both(z, ids, values, labels=None, **kw):
    """(loss, grad) of the sparse loss and of csd_loss on the masked full teacher."""
    out = []
    for fn in (lambda x: sparse_csd_loss(x, ids, values, labels, **kw),
               lambda x: csd_loss(x, masked_full(ids, values, z.shape[-1]), labels, **kw)):
        x = z.detach().clone().requires_grad_(True)
        loss = fn(x)
        loss.backward(torch.ones_like(loss))
        out.append((loss.detach(), x.grad))
    return out


@given(n=st.integers(1, 6), v=st.integers(1, 40), k_frac=st.floats(0, 1), weighting=st.sampled_from(WEIGHTINGS),
       tau=st.sampled_from([0.5, 1.0, 2.3]), alpha=st.floats(0, 1), pad=st.sampled_from([0.0, 0.3]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), ignore=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 1000))
def test_sparse_equals_csd_on_the_masked_full_teacher(n, v, k_frac, weighting, tau, alpha, pad, dtype, ignore,
                                                       reduction, seed):
    k = max(1, round(k_frac * v))
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(2, n, v, generator=g)).to(dtype)
    ids = support(2 * n, v, k, pad_frac=pad, seed=seed).reshape(2, n, k)
    values = 3 * torch.randn(2, n, k, generator=g, dtype=torch.float32)
    labels = torch.where(torch.rand(2, n, generator=g) < 0.3, -100, 1) if ignore else None
    (ls, gs), (lf, gf) = both(z, ids, values, labels, weighting=weighting, temperature=tau, alpha=alpha,
                              reduction=reduction)
    # Same kernel on the same finite entries, summed in another order: rounding-level differences.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ls, lf, **tol)
    if dtype == torch.bfloat16:  # the gradient is rounded to bf16 once, from fp32 values that may differ by 1 ulp
        tol = dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(gs.float(), gf.float(), **tol)
    off = masked_full(ids, torch.zeros(ids.shape), v) == float("-inf")
    assert torch.all(gs[off] == 0), "gradient off the support must be exactly zero"


@pytest.mark.parametrize("k", [1, 17])
def test_k_1_and_k_equals_v(k):
    v, n = 17, 5
    z = torch.randn(n, v, dtype=torch.float64)
    ids = support(n, v, k, seed=k)
    values = torch.randn(n, k, dtype=torch.float64)
    (ls, gs), (lf, gf) = both(z, ids, values, weighting="TS")
    torch.testing.assert_close(ls, lf, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gs, gf, rtol=1e-13, atol=1e-13)
    if k == v:  # the full support: plain csd_loss with the teacher's logits permuted into place
        t = torch.empty(n, v, dtype=torch.float64).scatter(-1, ids, values)
        torch.testing.assert_close(ls, csd_loss(z, t, weighting="TS"), rtol=1e-13, atol=1e-13)
    if k == 1:  # one entry: d minus its own mean is 0
        assert ls.item() == 0 and torch.all(gs == 0)


def test_padding_is_ignored_and_an_empty_support_gives_zero():
    z = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[4, -1, 2, -1], [-1, -1, -1, -1], [0, 9, -1, 5]])
    values = torch.randn(3, 4, dtype=torch.float64)
    per_row = sparse_csd_loss(z, ids, values, weighting="SS", reduction="none")
    ref = sparse_csd_loss(z[0:1], torch.tensor([[4, 2]]), values[0:1, [0, 2]], reduction="none")
    torch.testing.assert_close(per_row[0:1], ref)
    assert per_row[1].item() == 0
    per_row.sum().backward()
    assert torch.all(z.grad[1] == 0)
    z.grad = None
    empty = sparse_csd_loss(z, torch.full((3, 4), -1), values)
    empty.backward()
    assert empty.item() == 0 and torch.all(z.grad == 0)


@pytest.mark.parametrize("ids, message", [
    ([[1, 3, 1]], "row 0 holds id 1 more than once"),
    ([[0, 1, 2], [5, 10, 2]], "row 1 holds id 10, outside \\[0, 10\\)"),
    ([[0, -2, 2]], "row 0 holds id -2, outside"),
])
def test_bad_ids_are_clear_errors(ids, message):
    ids = torch.tensor(ids)
    z = torch.randn(ids.shape[0], 10)
    with pytest.raises(ValueError, match=message):
        sparse_csd_loss(z, ids, torch.zeros(ids.shape))
    with pytest.raises(ValueError, match=message):
        fused_linear_sparse_csd(torch.randn(ids.shape[0], 4), torch.randn(10, 4), ids, torch.zeros(ids.shape))


def test_repeated_padding_is_not_a_duplicate_and_argument_errors_name_the_argument():
    z = torch.randn(2, 6)
    sparse_csd_loss(z, torch.tensor([[-1, -1, 3], [2, -1, -1]]), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="teacher_ids must be int64"):
        sparse_csd_loss(z, torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same shape"):
        sparse_csd_loss(z, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="leading shape"):
        sparse_csd_loss(z, torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 3))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    z = torch.randn(4, 12, dtype=torch.float32)
    ids, values = support(4, 12, 5, pad_frac=0.2, seed=3), torch.randn(4, 5)
    labels = torch.tensor([1, -100, 2, 3])
    fn = torch.compile(lambda x: sparse_csd_loss(x, ids, values, labels, weighting="MS"), fullgraph=True)
    x1, x2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    l1, l2 = fn(x1), sparse_csd_loss(x2, ids, values, labels, weighting="MS")
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)
    # Compiled, the id check is a device-side assert (no host sync, no graph break); on a CPU it raises at once.
    bad = ids.clone()
    bad[2, 1] = bad[2, 0] if bad[2, 0] >= 0 else 7
    bad[2, 0] = bad[2, 1]
    check = torch.compile(lambda x, i: sparse_csd_loss(x, i, values), fullgraph=True)
    with pytest.raises(RuntimeError, match="repeated id"):
        check(z, bad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias, chunk", [(False, None), (True, 3)])
def test_fused_sparse_equals_the_unfused_path(reduction, bias, chunk):
    g = torch.Generator().manual_seed(7)
    n, h, v, k = 10, 6, 50, 8
    hidden = torch.randn(2, n // 2, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    ids = support(n, v, k, pad_frac=0.25, seed=1).reshape(2, n // 2, k)
    ids[0, 1] = -1  # one empty support
    values = torch.randn(2, n // 2, k, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2, 3, 4], [5, 6, -100, 7, 8]])
    grad_out = None if reduction != "none" else torch.randn(2, n // 2, dtype=torch.float64, generator=g)
    outs = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
        bias_leaf = leaves[2] if bias else None
        if fused:
            loss = fused_linear_sparse_csd(leaves[0], leaves[1], ids, values, labels, student_bias=bias_leaf,
                                           weighting="SM", temperature=1.7, reduction=reduction, chunk_size=chunk)
        else:
            loss = sparse_csd_loss(F.linear(leaves[0], leaves[1], bias_leaf), ids, values, labels, weighting="SM",
                                   temperature=1.7, reduction=reduction)
        loss.backward(grad_out)
        outs.append((loss.detach(), [x.grad for x in leaves]))
    (lf, gf), (lu, gu) = outs
    torch.testing.assert_close(lf, lu, rtol=1e-12, atol=1e-12)
    for a, b_ in zip(gf, gu):
        torch.testing.assert_close(a, b_, rtol=1e-11, atol=1e-12)


def test_fused_sparse_fp32_matches_fp64_reference():
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(33, 16, generator=g), torch.randn(300, 16, generator=g) / 4
    ids, values = support(33, 300, 20, seed=2), torch.randn(33, 20, generator=g)
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    l32 = fused_linear_sparse_csd(h32, w32, ids, values, chunk_size=5)
    l64 = sparse_csd_loss(F.linear(h64, w64), ids, values.double())
    l32.backward()
    l64.backward()
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
