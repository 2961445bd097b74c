"""Input generators and tolerances for the CSD tests."""

import math
import os

import torch

ALL_WEIGHTINGS = [a + b for a in "STUM" for b in "STUM"]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_logits(shape, *, scale=3.0, offset=0.0, dtype=torch.float32, seed=0, mask_frac=0.0, device="cpu"):
    """Student/teacher logits of `shape`, teacher correlated with the student so
    the loss is in a realistic range; `mask_frac` of entries set to -inf in
    one of the two (randomly which)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    z = base + 0.5 * scale * torch.randn(shape, generator=g, dtype=torch.float64)
    t = base + offset
    if mask_frac > 0:
        m = torch.rand(shape, generator=g) < mask_frac
        which = torch.rand(shape, generator=g) < 0.5
        z = z.masked_fill(m & which, -math.inf)
        t = t.masked_fill(m & ~which, -math.inf)
    return z.to(dtype).to(device), t.to(dtype).to(device)


def make_labels(lead_shape, *, ignore_frac=0.3, seed=0, ignore_index=-100, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, 1000, lead_shape, generator=g)
    labels[torch.rand(lead_shape, generator=g) < ignore_frac] = ignore_index
    return labels.to(device)


def as_f64(x):
    return x.detach().to(torch.float64)


def _row_magnitude(z, t):
    """max(|z|, |t|) over the unmasked entries of each row, [N, 1]."""
    z, t = as_f64(z), as_f64(t)
    masked = torch.isneginf(z) | torch.isneginf(t)
    mag = torch.maximum(z.abs(), t.abs()).masked_fill(masked, 0)
    mag = torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag))
    return mag.amax(dim=-1, keepdim=True) if mag.shape[-1] else mag.sum(-1, keepdim=True)


EPS32 = torch.finfo(torch.float32).eps


def loss_tolerance(z, t, ref_loss, ref_grad_unit, eps=EPS32):
    """Per-row absolute tolerance for an fp32-accumulated loss against fp64 math
    on the same input values.

    The kernel rounds d = z - t to fp32 (|delta d_k| <= eps * max(|z_k|, |t_k|)),
    which moves L by at most sum_k |dL/dd_k| * |delta d_k|; the fp32 exp and
    sums add a few tens of eps relative to L.  This is ~1e-6 relative -- four
    orders tighter than bf16 accumulation could meet (eps_bf16 = 7.8e-3).  The
    weights' rounding, which grows with |logits| / tau, is weight_error's;
    the callers add it.
    `ref_grad_unit` is the reference gradient of the per-row losses (2-D)."""
    z2, t2 = as_f64(z).reshape(ref_grad_unit.shape), as_f64(t).reshape(ref_grad_unit.shape)
    mag = _row_magnitude(z2, t2).squeeze(-1)
    d_rounding = 4 * eps * (ref_grad_unit.abs() * mag.unsqueeze(-1)).sum(-1)
    # Second order: at an optimum (L = 0, dL/dd = 0) the first-order terms
    # vanish, but the means' rounding, ~eps * mag each, still enters squared
    # through (E_w1 d - E_w2 d)^2 (one vocabulary entry under SM: E1 - E2 =
    # 6.8e-7 in fp32 where it is exactly 0).
    second_order = (8 * eps * mag) ** 2
    # The fp64 reference's own rounding (it is not exact either): ~eps64 * |d|^2.
    reference_noise = 1e-14 * (1 + mag ** 2)
    return d_rounding + second_order + 64 * eps * ref_loss.reshape(-1).abs() + reference_noise


def grad_tolerance(z, t, ref_grad, w1, w2, eps=EPS32):
    """Element-wise absolute tolerance for the fp32-accumulated gradient
    1/2 [w1 (d - E_w2 d) + w2 (d - E_w1 d)] (2-D inputs): rounding d and the
    means moves it by ~ eps * (w1 + w2) * max|z|,|t| of the row; the fp32 exp
    and sums by a few tens of eps relative to the gradient itself."""
    z2, t2 = as_f64(z).reshape(ref_grad.shape), as_f64(t).reshape(ref_grad.shape)
    mag = _row_magnitude(z2, t2)
    return 8 * eps * (w1 + w2) * mag + 64 * eps * ref_grad.abs() + 1e-30


def weight_error(z, t, temperature, eps=EPS32):
    """[N, 1] bound on the relative error of each weight exp(a_k - lse) as a
    kernel computes it in the accumulation dtype (eps).

    a_k = z_k / tau (or t_k / tau) and lse are up to ~ mag / tau + ln V in
    size, so rounding them, their difference and (on the GPU) its product
    with log2 e moves the exponent by a few eps times that: a relative error
    of the weight of ~8 * eps * (mag / tau + ln V + 1), on top of the exp's
    own few ulp.  At |logits| / tau ~ 800 in fp32 that is ~8e-4, far more than
    a fixed number of ulp, and it reaches the gradient where a weight
    multiplies a large |d_k - E d|."""
    vocab = z.shape[-1]
    return 8 * eps * (_row_magnitude(z, t) / temperature + math.log(max(vocab, 1)) + 1)


def weight_error_grad(z, t, w1, w2, rho):
    """Element-wise bound on how relative errors rho of every weight move the
    gradient 1/2 [w1_k (d_k - E2) + w2_k (d_k - E1)] for a unit grad_output
    (2-D inputs): directly, rho * w1_k * |d_k - E2|, and through the means,
    |delta E1| <= rho * sum_j w1_j |d_j - E1| (likewise for w2)."""
    z2, t2 = as_f64(z).reshape(w1.shape), as_f64(t).reshape(w1.shape)
    masked = torch.isneginf(z2) | torch.isneginf(t2)
    d = torch.where(masked, torch.zeros_like(z2), z2 - t2)
    e1, e2 = (w1 * d).sum(-1, keepdim=True), (w2 * d).sum(-1, keepdim=True)
    s1, s2 = (w1 * (d - e1).abs()).sum(-1, keepdim=True), (w2 * (d - e2).abs()).sum(-1, keepdim=True)
    return 0.5 * rho * (w1 * ((d - e2).abs() + s2) + w2 * ((d - e1).abs() + s1))


def centred(z, t):
    """z and t (float64) each shifted by its row's largest finite entry, for
    evaluating the float64 reference.  CSD's loss and gradient do not change
    when z or t gains a constant per row (softmax ignores it, and d only
    moves by a constant), but the reference's rounding does: with teacher
    logits ~1e4 its weighted means of d ~ 1e4 were off by 20-60 ulp, 1e-11 in
    the gradient, where an fp64 kernel was within 7e-13 of the exact value
    (long double).  The error bounds keep using the unshifted magnitudes."""
    def shift(x):
        finite = torch.where(torch.isfinite(x), x, torch.full_like(x, -math.inf))
        top = finite.amax(dim=-1, keepdim=True) if x.shape[-1] else finite.sum(-1, keepdim=True)
        return x - torch.where(torch.isfinite(top), top, torch.zeros_like(top))

    return shift(z), shift(t)


def check_against_reference(z, t, labels=None, **kw):
    """Asserts csd_loss (values and gradients, reduction="none" with a random
    per-row grad_output) matches the float64 reference on the same values,
    within the error bounds above for the accumulation dtype (fp32, or fp64
    when an input is fp64).  Works for any device."""
    from csd_ext import csd_loss
    from csd_ext.reference import csd_loss_reference, csd_weights

    vocab = z.shape[-1]
    zk = z.clone().requires_grad_(True)
    out = csd_loss(zk, t, labels, reduction="none", **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out * g.to(out.device, out.dtype)).sum().backward()

    zc, tc = as_f64(z).cpu(), as_f64(t).cpu()
    lab = None if labels is None else labels.cpu()
    zs, ts = centred(zc, tc)
    zr = zs.clone().requires_grad_(True)
    ref = csd_loss_reference(zr, ts, lab, reduction="none", **kw)
    (ref * g).sum().backward()
    zu = zs.clone().requires_grad_(True)  # unit grad_output: dL_row/dz for the loss tolerance
    csd_loss_reference(zu, ts, lab, reduction="none", **kw).sum().backward()

    acc = torch.float64 if torch.float64 in (z.dtype, t.dtype) else torch.float32
    assert out.dtype == acc and out.shape == z.shape[:-1]
    assert zk.grad.dtype == z.dtype and zk.grad.shape == z.shape
    eps = torch.finfo(acc).eps
    outc, gradc = out.detach().cpu().double(), zk.grad.cpu().double()
    ref_grad = zr.grad.reshape(-1, vocab)
    z2, t2 = zc.reshape(-1, vocab), tc.reshape(-1, vocab)
    w1, w2 = csd_weights(z2, t2, kw.get("weighting", "SS"), kw.get("alpha", 0.5), kw.get("temperature", 1.0))
    rho = weight_error(z2, t2, kw.get("temperature", 1.0), eps)
    ref_loss = ref.detach().reshape(-1)
    tol = loss_tolerance(zc, tc, ref_loss, zu.grad.reshape(-1, vocab), eps) + 4 * rho.reshape(-1) * ref_loss.abs()
    err = (outc.reshape(-1) - ref_loss).abs()
    assert (err <= tol).all(), f"loss error {err.max().item():.3g} > tol; worst row {int((err / tol).argmax())}"
    scale = g.reshape(-1, 1).abs()
    gtol = (grad_tolerance(zc, tc, ref_grad, w1 * scale, w2 * scale, eps)
            + scale * weight_error_grad(z2, t2, w1, w2, rho))
    # Final rounding to the student's dtype (relative, or the subnormal spacing
    # for tiny values: float16 flushes a 1e-8 gradient to a multiple of 6e-8).
    info = torch.finfo(z.dtype)
    gtol = gtol + info.eps * ref_grad.abs() + info.smallest_normal * info.eps
    gerr = (gradc.reshape(-1, vocab) - ref_grad).abs()
    assert (gerr <= gtol).all(), f"grad error {gerr.max().item():.3g}, worst ratio {(gerr / gtol).max().item():.3g}"
    if labels is not None:
        ignored = labels == kw.get("ignore_index", -100)
        assert (out[ignored] == 0).all() and (zk.grad[ignored] == 0).all()
    masked = torch.isneginf(z) | torch.isneginf(t)
    assert (zk.grad[masked] == 0).all()
    return out, zk.grad


def agreement_tolerances(z, t, labels, grad_output, **kw):
    """How far two correct kernels (CPU and CUDA, or two launch paths) may differ
    on these inputs, for reduction="none" with per-row `grad_output`: the sum of
    their error bounds against exact arithmetic (loss_tolerance and
    grad_tolerance, with the accumulation dtype's eps), plus the final rounding
    of each gradient to the student's dtype.  Returns ([N] loss tolerance,
    [N, V] gradient tolerance).

    A bound scaled by the row's largest gradient would be too tight: the two
    kernels sum the row in different orders, so their E_w d differ by ~eps*|d|,
    which moves every gradient entry by ~eps*w_k*|d|, also where w_k*|d_k - E d|
    (the gradient itself) is tiny."""
    from csd_ext.reference import csd_loss_reference, csd_weights

    vocab = z.shape[-1]
    acc = torch.float64 if torch.float64 in (z.dtype, t.dtype) else torch.float32
    eps = torch.finfo(acc).eps
    zc, tc = as_f64(z).cpu().reshape(-1, vocab), as_f64(t).cpu().reshape(-1, vocab)
    lab = None if labels is None else labels.cpu().reshape(-1)
    g = as_f64(grad_output).cpu().reshape(-1)
    zr = zc.clone().requires_grad_(True)
    ref = csd_loss_reference(zr, tc, lab, reduction="none", **kw)
    ref.sum().backward()  # unit grad_output: dL_row/dz
    unit = zr.grad
    w1, w2 = csd_weights(zc, tc, kw.get("weighting", "SS"), kw.get("alpha", 0.5), kw.get("temperature", 1.0))
    scale = g.abs().unsqueeze(-1)
    ref_grad = unit * g.unsqueeze(-1)
    info = torch.finfo(z.dtype)
    rho = weight_error(zc, tc, kw.get("temperature", 1.0), eps)
    loss_tol = 2 * (loss_tolerance(zc, tc, ref.detach(), unit, eps) + 4 * rho.reshape(-1) * ref.detach().abs())
    grad_tol = (2 * grad_tolerance(zc, tc, ref_grad, w1 * scale, w2 * scale, eps)
                + 2 * scale * weight_error_grad(zc, tc, w1, w2, rho)
                + 2 * info.eps * ref_grad.abs() + 2 * info.smallest_normal * info.eps)
    return loss_tol, grad_tol


def package_root():
    """The directory holding the csd_ext this test run imported: the installed copy
    under CI's ``python -P`` (the source tree there has no compiled ``_C``), or a
    worktree with an in-place build under ``PYTHONPATH=.``."""
    import csd_ext

    return os.path.dirname(os.path.dirname(os.path.abspath(csd_ext.__file__)))


def env_with_this_csd_ext(base=None):
    """A copy of ``base`` (default: os.environ) that makes a child Python import the
    same csd_ext as this process.  Children started with ``-c`` must also pass ``-P``,
    or the working directory (the source tree, in CI) shadows PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [package_root(), env.get("PYTHONPATH", "")] if p)
    return env


def check_common_offset_gradient(z, t, labels=None, grad_output=None, **kw):
    """Asserts csd_loss's gradient on fp32 z, t that share a large common
    offset (z = c + a, t = c + b, |a|, |b| << c) is within the fp32 bound of
    the *offset-free* problem, against the float64 reference.

    At temperature 1 a kernel loses nothing to the offset: z_k - t_k and
    z_k - max_j z_j are exact in fp32 (Sterbenz: the operands are within a
    factor 2 of each other), so the weights exp(z_k - max) / sum and every
    moment of d see exactly the values of the centred problem, and so do the
    error bounds (magnitudes taken after centring).  A normaliser rebuilt as
    one fp32 log-sum-exp of ~c (max + log sum, rounded to the ulp of c:
    2^-10 at c = 1e4) scales a row's weights, hence its gradient, by up to
    exp(2^-11) - 1 = 4.9e-4: far outside this bound."""
    from csd_ext import csd_loss
    from csd_ext.reference import csd_loss_reference, csd_weights

    assert z.dtype == t.dtype == torch.float32 and kw.get("temperature", 1.0) == 1.0
    vocab = z.shape[-1]
    zk = z.clone().requires_grad_(True)
    reduction = "none" if grad_output is not None else "mean"
    out = csd_loss(zk, t, labels, reduction=reduction, **kw)
    (out * grad_output.to(out.device, out.dtype)).sum().backward() if grad_output is not None else out.backward()
    zs, ts = centred(as_f64(z).cpu(), as_f64(t).cpu())
    zr = zs.clone().requires_grad_(True)
    lab = None if labels is None else labels.cpu()
    ref = csd_loss_reference(zr, ts, lab, reduction=reduction, **kw)
    (ref * grad_output.double().cpu()).sum().backward() if grad_output is not None else ref.backward()
    ref_grad = zr.grad.reshape(-1, vocab)
    # Per-row |grad_output| as the reduction applies it (mean: 1 / valid rows).
    if grad_output is not None:
        scale = grad_output.double().cpu().reshape(-1, 1).abs()
    else:
        valid = torch.ones(ref_grad.shape[0], dtype=torch.bool) if labels is None else \
            (labels.cpu().reshape(-1) != kw.get("ignore_index", -100))
        scale = (valid.double() / valid.sum().clamp(min=1)).reshape(-1, 1)
    z2, t2 = zs.reshape(-1, vocab), ts.reshape(-1, vocab)
    w1, w2 = csd_weights(z2, t2, kw.get("weighting", "SS"), kw.get("alpha", 0.5), 1.0)
    rho = weight_error(z2, t2, 1.0)
    gtol = (grad_tolerance(z2, t2, ref_grad, w1 * scale, w2 * scale) + scale * weight_error_grad(z2, t2, w1, w2, rho)
            + EPS32 * ref_grad.abs() + torch.finfo(torch.float32).tiny)
    gerr = (zk.grad.cpu().double().reshape(-1, vocab) - ref_grad).abs()
    worst = (gerr / gtol).max().item()
    assert worst <= 1, f"grad error {gerr.max().item():.3g}, worst ratio to the fp32 bound {worst:.3g}"
    return worst
