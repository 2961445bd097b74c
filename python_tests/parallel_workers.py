"""Worker bodies of python_tests/test_parallel.py, run in spawned gloo processes.

Process start-up dominates the cost, so each spawned group runs many cases.
Every rank builds the same full logits from a fixed seed, takes its slice,
and compares the vocab-parallel result with single-process csd_ext on the
full tensors.  A failed check raises, which fails the spawn in the parent.
"""

import os
import traceback

import torch
import torch.distributed as dist

from csd_ext import csd_loss, fused_linear_csd
from csd_ext.distill.distributed import exit_program
from csd_ext.parallel import vocab_parallel_csd_loss

WEIGHTINGS = [a + b for a in "STUM" for b in "STUM"]
VOCAB = 1001


def spawn_main(rank, world, store_path, body, args):
    """mp.spawn entry: join the gloo group, run body(rank, world, *args), tear down."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    except Exception:
        dist.destroy_process_group()
        # Keep the case description in the message mp.spawn re-raises.
        raise RuntimeError(f"rank {rank}:\n{traceback.format_exc()}") from None
    # A finished rank skips interpreter teardown, where gloo's threads once aborted it
    # ("terminate called without an active exception") after every check had passed.
    exit_program(0, distributed=True)


def bounds(splits, rank):
    lo = sum(splits[:rank])
    return lo, lo + splits[rank]


def tolerances(dtype):
    """(rtol, atol scale) for 'equal to fp32 rounding' and 1e-12 in fp64."""
    if dtype == torch.float64:
        return 1e-12, 1e-12
    if dtype == torch.bfloat16:
        return 1e-5, 1e-6  # the loss is fp32; gradients are compared at bf16 rounding below
    return 1e-5, 1e-6


def assert_bitwise_equal_across_ranks(value, group=None):
    value = value.detach().reshape(-1).contiguous()
    out = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, value, group=group)
    for r, other in enumerate(out):
        # Compare bit patterns, so NaN == NaN and -0.0 != 0.0 would both be caught.
        assert torch.equal(other.view(torch.uint8) if other.dtype != torch.bfloat16 else other.view(torch.int16),
                           value.view(torch.uint8) if value.dtype != torch.bfloat16 else value.view(torch.int16)), \
            f"loss differs between ranks (rank {r}: {other} vs {value})"


def make_case(seed, dtype, lead=(3, 5), offset=0.0, inf_cols=None, all_ignored=False):
    """Full student/teacher logits [*lead, V], labels with ignored rows, -inf columns."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*lead, VOCAB, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    t = (torch.randn(*lead, VOCAB, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    labels = torch.randint(0, VOCAB, lead, generator=g)
    labels.view(-1)[::4] = -100
    if all_ignored:
        labels.fill_(-100)
    if inf_cols is not None:
        zc, tc = inf_cols
        z[..., zc] = float("-inf")  # masked through the student
        t[0, ..., tc] = float("-inf")  # masked through the teacher, first batch row only
    return z, t, labels


def check_loss_cases(rank, world, splits):
    """Every weighting x dtype, tau != 1, alpha, ignored rows, -inf in one shard, offset 1e4, reductions."""
    lo, hi = bounds(splits, rank)
    # -inf columns inside the first non-empty shard only.
    first = next(r for r in range(world) if splits[r] > 0)
    f_lo, f_hi = bounds(splits, first)
    inf_cols = (f_lo, f_hi - 1)
    cases = []
    for i, dtype in enumerate((torch.float32, torch.float64, torch.bfloat16)):
        for j, weighting in enumerate(WEIGHTINGS):
            k = i * len(WEIGHTINGS) + j
            cases.append(dict(
                dtype=dtype, weighting=weighting, seed=k,
                temperature=(1.0, 1.7, 0.6)[k % 3], alpha=(0.5, 0.3, 0.0, 1.0)[k % 4],
                reduction=("mean", "sum", "none")[k % 3],
                offset=1e4 if k % 5 == 0 else 0.0,
                inf_cols=inf_cols if k % 2 == 0 else None,
                all_ignored=(k % 13 == 7),
            ))
    for c in cases:
        desc = {k: v for k, v in c.items()}
        z, t, labels = make_case(c["seed"], c["dtype"], offset=c["offset"], inf_cols=c["inf_cols"],
                                 all_ignored=c["all_ignored"])
        kw = dict(weighting=c["weighting"], alpha=c["alpha"], temperature=c["temperature"],
                  reduction=c["reduction"])
        zs = z[..., lo:hi].clone().requires_grad_(True)
        ts = t[..., lo:hi].clone().requires_grad_(True)
        loss = vocab_parallel_csd_loss(zs, ts, labels, **kw)
        zf = z.clone().requires_grad_(True)
        tf = t.clone().requires_grad_(True)
        ref = csd_loss(zf, tf, labels, **kw)
        g = torch.Generator().manual_seed(1000 + c["seed"])
        grad_out = torch.randn(ref.shape, generator=g, dtype=ref.dtype) if c["reduction"] == "none" else None
        (loss if grad_out is None else loss * grad_out).sum().backward()
        (ref if grad_out is None else ref * grad_out).sum().backward()
        rtol, atol = tolerances(c["dtype"])
        scale = max(1.0, float(ref.detach().abs().max()))
        torch.testing.assert_close(loss.detach(), ref.detach(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{desc}: loss: {m}")
        assert_bitwise_equal_across_ranks(loss)
        gs, gref = zs.grad, zf.grad[..., lo:hi]
        gts, gtref = ts.grad, tf.grad[..., lo:hi]
        if c["dtype"] == torch.bfloat16:
            g_rtol, g_atol = 2 ** -7, 1e-7
        else:
            g_rtol, g_atol = rtol, atol * max(1e-30, float(zf.grad.abs().max()))
        torch.testing.assert_close(gs, gref, rtol=g_rtol, atol=g_atol, msg=lambda m: f"{desc}: student grad: {m}")
        torch.testing.assert_close(gts, gtref, rtol=g_rtol, atol=g_atol, msg=lambda m: f"{desc}: teacher grad: {m}")
        if c["all_ignored"]:
            assert float(loss.detach().abs().sum()) == 0.0 and not gs.any(), desc


def check_fused_cases(rank, world, splits):
    """fused_linear_csd(..., vocab_parallel_group) == unsharded fused_linear_csd."""
    lo, hi = bounds(splits, rank)
    hid, rows = 16, 13
    for k, (dtype, teacher_kind, reduction, weighting, chunk) in enumerate([
        (torch.float64, "hidden", "mean", "SS", 4),
        (torch.float64, "logits", "none", "TU", 5),
        (torch.float32, "hidden", "sum", "MS", None),
        (torch.float32, "logits", "mean", "UT", 3),
        (torch.bfloat16, "hidden", "mean", "ST", 6),
    ]):
        desc = f"fused case {k}: {dtype} teacher {teacher_kind} {reduction} {weighting} chunk {chunk}"
        g = torch.Generator().manual_seed(50 + k)
        h = torch.randn(2, rows, hid, generator=g, dtype=torch.float64).to(dtype)
        w = (torch.randn(VOCAB, hid, generator=g, dtype=torch.float64) * 0.3).to(dtype)
        b = (torch.randn(VOCAB, generator=g, dtype=torch.float64) * 0.1).to(dtype)
        th = torch.randn(2, rows, 12, generator=g, dtype=torch.float64).to(dtype)
        tw = (torch.randn(VOCAB, 12, generator=g, dtype=torch.float64) * 0.3).to(dtype)
        tl = (th.double() @ tw.double().t()).to(dtype)
        labels = torch.randint(0, VOCAB, (2, rows), generator=g)
        labels[0, :3] = -100
        kw = dict(weighting=weighting, temperature=1.3, alpha=0.4, reduction=reduction, chunk_size=chunk)

        def run(weight, bias, t_weight, t_logits, **extra):
            hh = h.clone().requires_grad_(True)
            ww = weight.clone().requires_grad_(True)
            bb = bias.clone().requires_grad_(True)
            teacher = dict(teacher_hidden=th, teacher_weight=t_weight) if teacher_kind == "hidden" else {}
            loss = fused_linear_csd(hh, ww, t_logits if teacher_kind == "logits" else None, labels,
                                    student_bias=bb, **teacher, **kw, **extra)
            go = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
            (loss * go).sum().backward()
            return loss.detach(), hh.grad, ww.grad, bb.grad

        ref = run(w, b, tw, tl)
        got = run(w[lo:hi], b[lo:hi], tw[lo:hi], tl[..., lo:hi], vocab_parallel_group=dist.group.WORLD)
        part = run(w[lo:hi], b[lo:hi], tw[lo:hi], tl[..., lo:hi], vocab_parallel_group=dist.group.WORLD,
                   vocab_parallel_reduce_hidden_grad=False)
        if dtype == torch.float64:
            rtol, atol = 1e-12, 1e-12
        elif dtype == torch.float32:
            rtol, atol = 1e-5, 1e-6
        else:
            rtol, atol = 2 ** -7, 1e-4
        close = lambda a, e, what: torch.testing.assert_close(  # noqa: E731
            a, e, rtol=rtol, atol=atol * max(1.0, float(e.abs().max())), msg=lambda m: f"{desc}: {what}: {m}")
        close(got[0], ref[0], "loss")
        assert_bitwise_equal_across_ranks(got[0])
        close(got[1], ref[1], "grad hidden (all-reduced)")
        close(got[2], ref[2][lo:hi], "grad weight shard")
        close(got[3], ref[3][lo:hi], "grad bias shard")
        summed = part[1].clone()
        dist.all_reduce(summed)
        close(summed, ref[1], "sum over ranks of the partial grad hidden")
        close(part[0], ref[0], "loss (partial hidden grad)")


def check_dtensor_cases(rank, world, mesh_shape, mesh_names):
    """DTensor logits Shard(-1) on a 1-D mesh, or on the last named dimension of a larger mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=mesh_names)
    placements = [Replicate()] * (len(mesh_shape) - 1) + [Shard(2)]
    for k, (dtype, weighting, reduction) in enumerate([(torch.float64, "SS", "mean"), (torch.float32, "MU", "none")]):
        z, t, labels = make_case(300 + k, dtype, inf_cols=(3, 4))
        dz = distribute_tensor(z, mesh, placements).requires_grad_(True)
        dt = distribute_tensor(t, mesh, placements)
        kw = dict(weighting=weighting, temperature=1.4, alpha=0.25, reduction=reduction)
        loss = vocab_parallel_csd_loss(dz, dt, labels, **kw)
        assert isinstance(loss, DTensor) and all(isinstance(p, Replicate) for p in loss.placements), loss
        zf = z.clone().requires_grad_(True)
        ref = csd_loss(zf, t, labels, **kw)
        go = torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
        (ref * go).sum().backward()
        go_d = distribute_tensor(go, mesh, [Replicate()] * len(mesh_shape))
        (loss * go_d).sum().backward()
        rtol, atol = tolerances(dtype)
        torch.testing.assert_close(loss.to_local(), ref.detach(), rtol=rtol, atol=atol)
        grad = dz.grad
        assert isinstance(grad, DTensor) and grad.placements == dz.placements
        torch.testing.assert_close(grad.full_tensor(), zf.grad, rtol=rtol, atol=atol * float(zf.grad.abs().max()))
    # A placement the loss cannot use gets a clear error.
    bad = distribute_tensor(z, mesh, [Shard(0)] + [Replicate()] * (len(mesh_shape) - 1))
    try:
        vocab_parallel_csd_loss(bad, bad)
    except ValueError as exc:
        assert "Shard(-1)" in str(exc), exc
    else:
        raise AssertionError("a DTensor sharded over rows was accepted")


def check_errors(rank, world):
    """Mismatched shard widths on a rank (local), then leading shapes that differ across ranks."""
    z = torch.randn(4, 6)
    try:
        vocab_parallel_csd_loss(z, torch.randn(4, 5))
    except ValueError as exc:
        assert "teacher_shard holds 5" in str(exc), exc
    else:
        raise AssertionError("mismatched shard widths were accepted")
    # (Without check_shapes a different row count aborts the process inside gloo.)
    rows = 4 + rank
    try:
        vocab_parallel_csd_loss(torch.randn(rows, 6), torch.randn(rows, 6), check_shapes=True)
    except ValueError as exc:
        assert "different leading shapes" in str(exc) and "rank 1: (5,)" in str(exc), exc
    else:
        raise AssertionError("different row counts across ranks were accepted")


def body_two_ranks(rank, world):
    check_loss_cases(rank, world, [1000, 1])
    check_fused_cases(rank, world, [1, 1000])
    check_dtensor_cases(rank, world, (2,), None)
    check_cross_entropy(rank, world, [1000, 1])
    check_errors(rank, world)


def body_three_ranks(rank, world):
    check_loss_cases(rank, world, [500, 0, 501])
    check_fused_cases(rank, world, [400, 1, 600])


def body_four_ranks(rank, world):
    check_loss_cases(rank, world, [300, 1, 450, 250])
    check_dtensor_cases(rank, world, (2, 2), ("dp", "tp"))


def check_kernel_states_match_pytorch_states():
    """The kernel-derived partial states equal the plain-PyTorch ones (no process group needed)."""
    from csd_ext.parallel._kernel_stats import kernel_partial_states
    from csd_ext.parallel._moments import partial_states

    z, t, labels = make_case(7, torch.float64, inf_cols=(5, 6))
    z, t = z.reshape(-1, VOCAB)[:, :40], t.reshape(-1, VOCAB)[:, :40]
    z[2, :] = float("-inf")  # a row with no unmasked column on this shard
    for need in ((True, False, False), (False, True, True), (True, True, True)):
        a = kernel_partial_states(z, t, None, need, 1.3, torch.float64)
        b = partial_states(z, t, need, 1.3, torch.float64)
        # Kernel states are relative to the log-sum-exp (sum 1); compare normalised forms.
        for s in (a, b):
            finite = s[..., 1] > 0
            s[..., 0] = torch.where(finite, s[..., 0] + torch.log(torch.where(finite, s[..., 1], 1.0)), s[..., 0])
            s[..., 3] = torch.where(finite, s[..., 3] / torch.where(finite, s[..., 1], 1.0), s[..., 3])
            s[..., 1] = torch.where(finite, torch.ones_like(s[..., 1]), s[..., 1])
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def check_cross_entropy(rank, world, splits):
    """vocab_parallel_cross_entropy == F.cross_entropy on the gathered logits, value and shard gradient."""
    import torch.nn.functional as F

    from csd_ext.parallel.cross_entropy import vocab_parallel_cross_entropy

    lo, hi = bounds(splits, rank)
    z, _t, labels = make_case(77, torch.float64, offset=50.0)
    labels.view(-1)[1] = VOCAB - 1  # owned by the last shard (a one-column shard in [1000, 1])
    labels.view(-1)[2] = 0
    zs = z[..., lo:hi].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(zs, labels, lo)
    loss.backward()
    zf = z.clone().requires_grad_(True)
    ref = F.cross_entropy(zf.float().reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zs.grad, zf.grad[..., lo:hi], rtol=1e-5, atol=1e-7)
