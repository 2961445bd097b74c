"""Every CPU kernel variant (default / avx2 / avx512) against the reference.

The kernel is compiled once per instruction set and the variant is chosen
at start-up from ATen's CPU capability, so a plain test run only exercises
the best one this machine has.  Here each variant runs in its own
subprocess with ATEN_CPU_CAPABILITY forcing it, and is compared with the
float64 reference (values and gradients) on inputs that hit the awkward
paths: vocabularies shorter than a vector, odd lengths (scalar tails),
several tiles, rows split across threads, -inf masks (single entries, whole
rows, a whole tile), NaN, a large common offset, mixed dtypes, temperature,
and every weighting; rows without masks whose later tiles take the one-pass
"AB" path (relative to the row's max so far), with a lone -inf, a max jump
past its window and tiles far below the max (all redone in two passes), and
a jump inside the window (weights above 1, rescaled to the true max); gradients both from csd_loss (the fused forward that
computes them in the forward) and from the standalone backward op.

Run directly (`python test_cpu_kernel_variants.py --check`) it performs the
checks for whatever variant the environment selects and prints a JSON
summary; pytest drives that once per variant.
"""

import json
import math
import os
import subprocess
import sys

import pytest

VARIANTS = ["default", "avx2", "avx512"]
ATEN_NAME = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
EPS32 = 2.0**-23


# ---------------------------------------------------------------------------
# The checks (run inside the subprocess).
# ---------------------------------------------------------------------------
def _cases():
    """(name, N, V, dtype_z, dtype_t, weighting, temperature, alpha, special)."""
    import torch

    weightings = [a + b for a in "STUM" for b in "STUM"]
    shapes = [(3, 1), (4, 7), (5, 33), (3, 1000), (2, 4097), (3, 9001), (1, 70001)]
    cases = []
    for i, w in enumerate(weightings):
        n, v = shapes[i % len(shapes)]
        cases.append((f"{w}-fp32-{n}x{v}", n, v, torch.float32, torch.float32, w, 1.0, 0.5, "mask"))
    for w in ["SS", "TS", "US", "MM"]:
        for n, v in shapes:
            cases.append((f"{w}-bf16-{n}x{v}", n, v, torch.bfloat16, torch.bfloat16, w, 1.0, 0.15, "mask"))
        cases.append((f"{w}-fp64", 3, 5003, torch.float64, torch.float64, w, 1.0, 0.5, "mask"))
        cases.append((f"{w}-fp16", 3, 5003, torch.float16, torch.float16, w, 1.0, 0.5, "mask"))
        cases.append((f"{w}-bf16/fp32", 3, 5003, torch.bfloat16, torch.float32, w, 1.0, 0.5, "mask"))
        cases.append((f"{w}-tau1.7", 3, 9001, torch.float32, torch.float32, w, 1.7, 0.5, "mask"))
        cases.append((f"{w}-offset", 3, 9001, torch.float32, torch.float32, w, 1.0, 0.5, "offset"))
        cases.append((f"{w}-masked-tile", 2, 13000, torch.float32, torch.float32, w, 1.0, 0.5, "tile"))
        cases.append((f"{w}-split-row", 1, 70001, torch.bfloat16, torch.bfloat16, w, 1.3, 0.5, "mask"))
        cases.append((f"{w}-bf16-late", 3, 20000, torch.bfloat16, torch.bfloat16, w, 1.0, 0.5, "late"))
        cases.append((f"{w}-fp32-late", 4, 20001, torch.float32, torch.float32, w, 1.3, 0.5, "late"))
    return cases


def _inputs(n, v, special, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    z = base + 1.5 * torch.randn(n, v, generator=g, dtype=torch.float64)
    t = base.clone()
    if special == "offset":  # d carries a large common offset
        z = z + 1000.0
    if special in ("mask", "tile") and v > 2:
        m = torch.rand(n, v, generator=g) < 0.1
        which = torch.rand(n, v, generator=g) < 0.5
        z = z.masked_fill(m & which, -math.inf)
        t = t.masked_fill(m & ~which, -math.inf)
        if n >= 3:
            z[1] = -math.inf  # a row with nothing unmasked
    if special == "tile":
        t[0, 4096:8192] = -math.inf  # a whole tile masked
    if special == "late":  # pass AB (tiles after the first, no masks) and its fallbacks
        z[0, 9000] = -math.inf  # one masked entry: its tile is redone with masks
        if n >= 2:  # a max jump of ~40 (past the window), then tiles ~40 below the max
            z[1, 8192:12288] += 40
            t[1, 8192:12288] += 40
        if n >= 3:  # a jump of 5, inside the window
            z[2, 4096:8192] += 5
            t[2, 4096:8192] += 5
    return z, t


def _check_case(case, seed):
    import torch
    from csd_ext import csd_loss
    from csd_ext.reference import csd_loss_reference, csd_weights

    name, n, v, dz, dt, w, tau, alpha, special = case
    z64, t64 = _inputs(n, v, special, seed)
    z, t = z64.to(dz), t64.to(dt)
    # The reference runs in fp64 on exactly the values the kernel sees.
    zr = z.detach().to(torch.float64).requires_grad_(True)
    tr = t.detach().to(torch.float64)
    zk = z.detach().clone().requires_grad_(True)
    g_out = torch.rand(n, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64) + 0.5
    kw = dict(weighting=w, alpha=alpha, temperature=tau, reduction="none")
    ref = csd_loss_reference(zr, tr, **kw)
    (ref * g_out).sum().backward()
    got = csd_loss(zk, t, **kw)  # requires grad: the fused forward (gradient in the forward)
    (got * g_out.to(got.dtype)).sum().backward()
    # The standalone backward op, as torch.compile's graphs and no-grad forwards use it.
    _, stats = torch.ops.csd_ext.csd_forward(z, t, None, w, alpha, tau)
    grad_op = torch.ops.csd_ext.csd_backward(g_out.to(stats.dtype), z, t, stats, w, alpha, tau)

    # Tolerances from fp32 accumulation (fp64 inputs: fp64 accumulation):
    # rounding d moves L by ~eps*|grad|*max|z,t| per entry, the exp and the
    # sums by tens of eps relative; the gradient is rounded to the student's
    # dtype at the end.
    eps = 2.0**-52 if torch.float64 in (dz, dt) else EPS32
    zz, tt = zr.detach(), tr
    masked = torch.isneginf(zz) | torch.isneginf(tt)
    mag = torch.maximum(zz.abs(), tt.abs()).masked_fill(masked, 0).amax(-1)
    gref = zr.grad / g_out[:, None]
    # (The last term: a mixture's mean is rounded once, an error ~eps*|d| that
    # enters L squared -- visible only when L is exactly 0, e.g. V = 1.)
    loss_tol = (8 * eps * (gref.abs().sum(-1) * mag) + 64 * eps * ref.detach().abs()
                + (4 * eps * mag) ** 2 + 1e-30)
    w1, w2 = csd_weights(zz, tt, w, alpha, tau)
    out_eps = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dz]
    grad_tol = (16 * eps * (w1 + w2) * mag[:, None] * g_out[:, None] + (64 * eps + out_eps) * zr.grad.abs()
                + 1e-30)
    if dz == torch.float16:  # fp16 gradients also flush below 6e-8 (subnormal steps)
        grad_tol = grad_tol + 6e-8
    loss_err = (got.detach().double() - ref.detach()).abs()
    problems = []
    if not torch.equal(torch.isnan(got.detach()), torch.isnan(ref.detach())):
        problems.append("NaN pattern of the loss differs")
    finite = ~torch.isnan(ref.detach())
    if (loss_err[finite] > loss_tol[finite]).any():
        problems.append(f"loss err {(loss_err / loss_tol)[finite].max().item():.3g}x tolerance")
    gfinite = ~torch.isnan(zr.grad)
    for label, grad in (("csd_loss", zk.grad), ("csd_backward op", grad_op)):
        grad_err = (grad.double() - zr.grad).abs()
        if (grad_err[gfinite] > grad_tol[gfinite]).any():
            problems.append(f"{label}: grad err {(grad_err / grad_tol)[gfinite].max().item():.3g}x tolerance")
        if (grad[masked] != 0).any():
            problems.append(f"{label}: masked entries got a nonzero gradient")
    return name, problems


def _check_nan_and_optimum():
    """NaN logits make their row NaN (also when a whole tile is NaN); z = t + c
    gives exactly zero loss and gradient."""
    import torch
    from csd_ext import csd_loss

    problems = []
    z, t = torch.randn(4, 9001), torch.randn(4, 9001)
    z[0, 17] = math.nan
    z[2, :] = math.nan
    z[3, 8500] = math.nan  # in a later tile (pass AB)
    loss = csd_loss(z, t, reduction="none")
    if not (torch.isnan(loss[0]) and torch.isfinite(loss[1]) and torch.isnan(loss[2])
            and torch.isnan(loss[3])):
        problems.append(f"NaN rows: {loss.tolist()}")
    t = (torch.randn(4, 9001) * 20).round() / 4
    for dtype in (torch.float32, torch.bfloat16):
        zc = (t + torch.arange(4.0)[:, None] * 4).to(dtype).requires_grad_(True)
        for w in ["SS", "TS", "US", "MM", "UU"]:
            zc.grad = None
            loss = csd_loss(zc, t.to(dtype), weighting=w, reduction="none")
            loss.sum().backward()
            if (loss != 0).any() or (zc.grad != 0).any():
                problems.append(f"optimum {w} {dtype}: loss {loss.tolist()}")
    return problems


def run_checks():
    import torch

    import csd_ext  # noqa: F401  (loads the ops)

    torch.set_num_threads(2)  # so that a single row is split across threads
    report = {"isa": torch.ops.csd_ext.cpu_kernel_isa(), "failures": {}, "cases": 0}
    for i, case in enumerate(_cases()):
        name, problems = _check_case(case, seed=i)
        report["cases"] += 1
        if problems:
            report["failures"][name] = problems
    extra = _check_nan_and_optimum()
    if extra:
        report["failures"]["nan/optimum"] = extra
    return report


# ---------------------------------------------------------------------------
# The pytest side: one subprocess per variant.
# ---------------------------------------------------------------------------
def _run(env_extra):
    from csd_testing import env_with_this_csd_ext  # here: the --check child imports this module too

    env = env_with_this_csd_ext()
    env.update(env_extra)
    proc = subprocess.run([sys.executable, __file__, "--check"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best_aten_capability():
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_reference(variant):
    best = _best_aten_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if best not in order or order.index(best) < order.index(ATEN_NAME[variant]):
        pytest.skip(f"this CPU's best ATen capability is {best}; cannot run {variant}")
    report = _run({"ATEN_CPU_CAPABILITY": variant})
    if report["isa"] != variant:
        pytest.skip(f"csd_ext was built without the {variant} variant (CSD_CPU_ISAS); got {report['isa']}")
    assert report["cases"] > 50
    assert not report["failures"], json.dumps(report["failures"], indent=1)


if __name__ == "__main__":
    if "--check" in sys.argv:
        print(json.dumps(run_checks()))
