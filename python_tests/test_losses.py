"""Baseline losses (csd_ext.losses) against their textbook definitions, in float64.

The textbook forms below are written directly in probabilities (p = teacher,
q = student), independently of the implementation's log-space code.
"""

import math

import pytest
import torch

from csd_ext import csd_loss
from csd_ext.losses import LOSSES, get_loss, loss_names

F64 = torch.float64


def kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def ab_textbook(p, q, a, b):
    if a == 0 and b == 0:
        return 0.5 * ((p.log() - q.log()) ** 2).sum(-1)
    if b == 0:
        return (p**a * (p**a / q**a).log() - p**a + q**a).sum(-1) / a**2
    if a == 0:
        return (q**b * (q**b / p**b).log() - q**b + p**b).sum(-1) / b**2
    if a + b == 0:
        return ((q**a / p**a).log() + (q**a / p**a) ** -1 - 1).sum(-1) / a**2
    return -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)


def dld_textbook(z, t, weight, norm):
    def nrm(x):
        if norm == "none":
            return x
        if norm == "mean":
            return x - x.mean(-1, keepdim=True)
        if norm == "min":
            return x - x.min(-1, keepdim=True).values
        if norm == "max":
            return x - x.max(-1, keepdim=True).values
        if norm == "std":
            return (x - x.mean(-1, keepdim=True)) / x.std(-1, correction=0, keepdim=True)
        lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        return (x - lo) / (hi - lo)
    w = {"S": torch.softmax(z, -1), "T": torch.softmax(t, -1), "U": torch.full_like(z, 1 / z.shape[-1])}[weight]
    return (w * (nrm(z) - nrm(t)) ** 2).sum(-1) / 4


def textbook(name, z, t, **hp):
    """Per-row value of each baseline, straight from its definition."""
    p, q = torch.softmax(t, -1), torch.softmax(z, -1)
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "skl":
        lam = hp.get("lam", 0.9)
        return (1 - lam) * kl(p, q) + lam * kl(q, p)
    if name == "jeffreys":
        return ((p - q) * (p.log() - q.log())).sum(-1)
    if name == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "js":
        lam = hp.get("lam", 0.9)
        m = (1 - lam) * p + lam * q
        return lam * kl(q, m) + (1 - lam) * kl(p, m)
    if name == "sfkl":
        lam = hp.get("lam", 0.1)
        # The paper's -sum p log(lam p + (1-lam) q) plus the teacher constant sum p log p.
        return -(p * (lam * p + (1 - lam) * q).log()).sum(-1) + (p * p.log()).sum(-1)
    if name == "srkl":
        lam = hp.get("lam", 0.1)
        return kl(q, (1 - lam) * p + lam * q)
    if name == "ab":
        return ab_textbook(p, q, hp.get("alpha", 0.2), hp.get("beta", 0.7))
    if name == "dld":
        return dld_textbook(z, t, hp.get("weight", "U"), hp.get("norm", "none"))
    raise KeyError(name)


BASELINES = [n for n in loss_names() if n != "csd"]
CASES = [(n, {}) for n in BASELINES] + [
    ("skl", {"lam": 0.3}), ("js", {"lam": 0.5}), ("sfkl", {"lam": 0.0}), ("srkl", {"lam": 1.0}),
    ("ab", {"alpha": 0.0, "beta": 0.0}), ("ab", {"alpha": 0.5, "beta": 0.0}), ("ab", {"alpha": 0.0, "beta": 0.5}),
    ("ab", {"alpha": 0.6, "beta": -0.6}), ("ab", {"alpha": 1.5, "beta": -0.4}),
] + [("dld", {"weight": w, "norm": n}) for w in "STU" for n in ("none", "mean", "min", "max", "std", "range")]


def logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


@pytest.mark.parametrize("name,hp", CASES, ids=lambda x: str(x))
def test_matches_textbook_definition(name, hp):
    z, t = logits(6, 11, seed=1), logits(6, 11, seed=2)
    got = get_loss(name, **hp)(z, t, reduction="none")
    want = textbook(name, z, t, **hp)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,hp", CASES, ids=lambda x: str(x))
def test_zero_at_equal_and_nonnegative(name, hp):
    fn = get_loss(name, **hp)
    t = logits(8, 13, seed=3)
    # p = q exactly; for the shift-invariant losses also under a per-row shift of the logits.
    torch.testing.assert_close(fn(t.clone(), t, reduction="none"), torch.zeros(8, dtype=F64), atol=1e-12, rtol=0)
    if not (name == "dld" and hp.get("norm", "none") == "none"):
        shifted = t + torch.arange(8, dtype=F64)[:, None]
        torch.testing.assert_close(fn(shifted, t, reduction="none"), torch.zeros(8, dtype=F64), atol=1e-10, rtol=0)
    for seed in range(5):
        z = logits(8, 13, seed=10 + seed, scale=3.0)
        assert (fn(z, t, reduction="none") >= -1e-12).all()


def test_ab_known_special_cases():
    z, t = logits(5, 9, seed=4), logits(5, 9, seed=5)
    fkl, rkl = get_loss("fkl"), get_loss("rkl")
    torch.testing.assert_close(get_loss("ab", alpha=1.0, beta=0.0)(z, t), fkl(z, t))
    torch.testing.assert_close(get_loss("ab", alpha=0.0, beta=1.0)(z, t), rkl(z, t))
    # The limit branches are the limits of the general formula.
    for a, b, a_eps, b_eps in [(0.0, 0.0, 1e-5, 2e-5), (0.7, 0.0, 0.7, 1e-5), (0.0, 0.7, 1e-5, 0.7),
                               (0.5, -0.5, 0.5, -0.5 + 1e-5)]:
        exact = get_loss("ab", alpha=a, beta=b)(z, t)
        near = get_loss("ab", alpha=a_eps, beta=b_eps)(z, t)
        torch.testing.assert_close(near, exact, rtol=1e-3, atol=0)


def test_js_half_is_symmetric_js():
    z, t = logits(4, 7, seed=6), logits(4, 7, seed=7)
    js = get_loss("js", lam=0.5)
    torch.testing.assert_close(js(z, t), js(t, z))
    assert float(js(z, t)) <= math.log(2)


def test_jeffreys_is_sum_of_kls():
    z, t = logits(4, 7, seed=8), logits(4, 7, seed=9)
    torch.testing.assert_close(get_loss("jeffreys")(z, t), get_loss("fkl")(z, t) + get_loss("rkl")(z, t))


@pytest.mark.parametrize("name", loss_names())
def test_masked_entries_equal_a_smaller_vocabulary(name):
    """-inf in either input removes that entry: same value as dropping the column, no NaN anywhere."""
    z, t = logits(3, 4, 10, seed=11), logits(3, 4, 10, seed=12)
    z[..., 2] = float("-inf")
    t[0, 1, 7] = float("-inf")
    t[..., 9] = float("-inf")
    z.requires_grad_(True)
    fn = get_loss(name)
    full = fn(z, t, reduction="none")
    full.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[..., 2] == 0).all() and (z.grad[..., 9] == 0).all() and z.grad[0, 1, 7] == 0
    for i in range(3):
        for j in range(4):
            keep = torch.isfinite(z[i, j]) & torch.isfinite(t[i, j])
            small = fn(z[i, j][keep].detach()[None], t[i, j][keep][None], reduction="none")
            torch.testing.assert_close(full[i, j].detach(), small[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", loss_names())
def test_fully_masked_row_and_all_ignored_batch(name):
    fn = get_loss(name)
    z, t = logits(2, 3, 6, seed=13).requires_grad_(True), logits(2, 3, 6, seed=14)
    t2 = t.clone()
    t2[0, 0] = float("-inf")  # a row with nothing left
    labels = torch.ones(2, 3, dtype=torch.long)
    out = fn(z, t2, labels, reduction="none")
    assert torch.isfinite(out).all() and out[0, 0] == 0
    ignored = torch.full((2, 3), -100)
    loss = fn(z, t, ignored)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all() and (z.grad == 0).all()


@pytest.mark.parametrize("name", loss_names())
def test_mean_over_counted_positions(name):
    fn = get_loss(name)
    z, t = logits(2, 5, 8, seed=15), logits(2, 5, 8, seed=16)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [4, -100, -100, -100, 5]])
    rows = fn(z, t, reduction="none")
    keep = labels != -100
    torch.testing.assert_close(fn(z, t, labels), rows[keep].mean())
    torch.testing.assert_close(fn(z, t, labels, reduction="sum"), rows[keep].sum())
    torch.testing.assert_close(fn(z, t, labels, reduction="none"), torch.where(keep, rows, 0.0))
    torch.testing.assert_close(fn(z, t, labels, ignore_index=5), rows[labels != 5].mean())


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(name, dtype):
    # GPT-2-sized logits (~100) that fp16 stores but whose softmax it would ruin.
    z, t = logits(4, 50, seed=17, scale=30.0) + 60, logits(4, 50, seed=18, scale=30.0) + 60
    zh, th = z.to(dtype), t.to(dtype)
    got = get_loss(name)(zh, th)
    assert got.dtype == torch.float32
    want = get_loss(name)(zh.double(), th.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_gradient_of_fkl_and_rkl():
    z, t = logits(3, 6, seed=19).requires_grad_(True), logits(3, 6, seed=20)
    p, q = torch.softmax(t, -1), torch.softmax(z.detach(), -1)
    get_loss("fkl")(z, t, reduction="sum").backward()
    torch.testing.assert_close(z.grad, q - p)  # d/dz KL(p||softmax z) = q - p
    z.grad = None
    # RKL's gradient is SS-CSD's at tau = 1 (method note, section 1).
    get_loss("rkl")(z, t, reduction="sum").backward()
    g_rkl = z.grad.clone()
    z.grad = None
    csd_loss(z, t, weighting="SS", reduction="sum").backward()
    torch.testing.assert_close(z.grad, g_rkl)


def test_registry_names_and_errors():
    assert set(loss_names()) == set(LOSSES) >= {"csd", "fkl", "rkl", "skl", "jeffreys", "tv", "js", "sfkl",
                                                "srkl", "ab", "dld"}
    assert get_loss("KL").loss_name == "fkl" and get_loss("reverse-kl").loss_name == "rkl"
    z, t = logits(2, 5, seed=21), logits(2, 5, seed=22)
    torch.testing.assert_close(get_loss("csd", weighting="TS", temperature=1.5)(z, t),
                               csd_loss(z, t, weighting="TS", temperature=1.5))
    with pytest.raises(ValueError, match=r"unknown loss 'nope'.*csd.*srkl"):
        get_loss("nope")
    with pytest.raises(ValueError, match="has no hyper-parameter 'lam'"):
        get_loss("fkl", lam=0.1)
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\]"):
        get_loss("srkl", lam=1.5)
    with pytest.raises(ValueError, match="weighting must be two letters"):
        get_loss("csd", weighting="XX")
    with pytest.raises(ValueError, match="norm of DLD"):
        get_loss("dld", norm="l2")
    with pytest.raises(ValueError, match="alpha of the AB-divergence"):
        get_loss("ab", alpha=float("nan"))
    with pytest.raises(ValueError, match="vocabulary size"):
        get_loss("fkl")(logits(2, 5), logits(2, 6))
