"""The CPU suite's properties for the CUDA kernels: against the float64
reference and against the CPU kernel, across dtypes (mixed included), odd and
large vocabularies (up to 256k), misaligned and strided rows, few rows (the
split-row path), all weightings, masks, reductions, torch.compile (also with
CUDA graphs) and opcheck.

Every test takes the `gpu` fixture, which two modules provide:
  * test_cuda.py: a real CUDA device (the module skips without one);
  * test_cuda_emulated.py: the CUDA kernels' own code run on the CPU under
    an emulation of the CUDA execution model (emulated_gpu.py), so CI, which
    has no GPU, runs these assertions against the kernels.  Tests that are
    about the device itself (streams, CUDA graphs, opcheck and torch.compile
    of the CUDA registration, 13 GB inputs) skip there, via `require_real`.
`gpu.device` is where the kernels under test take their inputs, and
`gpu.cpu_kernel()` the context in which the CPU kernel runs instead.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from hypothesis import given
from hypothesis import strategies as st

import csd_ext
from csd_ext import CSDLoss, csd_loss
from csd_ext.reference import csd_loss_reference
from csd_testing import (
    ALL_WEIGHTINGS,
    agreement_tolerances,
    FLOAT_DTYPES,
    check_against_reference,
    make_labels,
    make_logits,
)


class RealGpu:
    """The current CUDA device."""

    device = torch.device("cuda")
    emulated = False

    def sm_count(self):
        return torch.cuda.get_device_properties(self.device).multi_processor_count

    def cpu_kernel(self):
        return contextlib.nullcontext()  # CPU tensors reach the CPU kernel anyway

    def require_real(self, why):
        pass


def acc_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def agree(got, want, tol):
    """|got - want| <= tol element-wise, NaN matching NaN and inf matching inf."""
    got, want = got.double(), want.double()
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    return (same | ((got - want).abs() <= tol)).all()


def assert_kernels_agree(loss_a, grad_a, loss_b, grad_b, z, t, labels, grad_output, **kw):
    """Two kernels' losses (reduction="none") and gradients for the same inputs
    and per-row grad_output agree within the sum of their error bounds
    (csd_testing.agreement_tolerances)."""
    vocab = z.shape[-1]
    loss_tol, grad_tol = agreement_tolerances(z, t, labels, grad_output, **kw)
    la, lb = loss_a.detach().cpu().reshape(-1), loss_b.detach().cpu().reshape(-1)
    assert agree(la, lb, loss_tol), (
        f"losses differ: max |diff| {(la.double() - lb.double()).abs().nan_to_num().max().item():.3g}, "
        f"worst diff/tol {((la.double() - lb.double()).abs() / loss_tol).nan_to_num().max().item():.3g}")
    ga, gb = grad_a.detach().cpu().reshape(-1, vocab), grad_b.detach().cpu().reshape(-1, vocab)
    assert agree(ga, gb, grad_tol), (
        f"gradients differ: max |diff| {(ga.double() - gb.double()).abs().nan_to_num().max().item():.3g}, "
        f"worst diff/tol {((ga.double() - gb.double()).abs() / grad_tol).nan_to_num().max().item():.3g}")


def cuda_vs_cpu(gpu, z, t, labels=None, **kw):
    """Loss (reduction="none", random per-row grad_output) and gradient of the
    same inputs from the CUDA kernel and from the CPU kernel.  Inputs already
    on the GPU keep their layout (strides, storage offset); the CPU gets
    copies.  Both accumulate in fp32 (fp64) but in different orders (and the
    GPU fuses multiply-adds), so they agree within the sum of their error
    bounds against exact arithmetic, not bitwise."""
    kw = dict(kw, reduction="none")
    g = torch.randn(z.shape[:-1], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = {}
    for side in ("cpu", "gpu"):
        dev = gpu.device if side == "gpu" else torch.device("cpu")
        src = z if z.device == dev else z.to(dev)
        zd = src.detach().requires_grad_(True)  # a leaf with the same layout
        td = t if t.device == dev else t.to(dev)
        ld = None if labels is None else labels.to(dev)
        with gpu.cpu_kernel() if side == "cpu" else contextlib.nullcontext():
            loss = csd_loss(zd, td.detach(), ld, **kw)
            (loss * g.to(dev, loss.dtype)).sum().backward()
        out[side] = (loss.detach().cpu(), zd.grad.cpu())
    (lc, gc), (lg, gg) = out["cpu"], out["gpu"]
    acc = acc_dtype(z.dtype, t.dtype)
    assert lg.dtype == lc.dtype == acc and gg.dtype == gc.dtype == z.dtype
    kw.pop("reduction")
    assert_kernels_agree(lg, gg, lc, gc, z, t, labels, g, **kw)
    return lg, gg


def test_cuda_kernels_are_compiled_and_registered(gpu):
    gpu.require_real("checks the build's CUDA registration")
    assert "cuda" in csd_ext.compiled_backends(), (
        "a CUDA device is present but csd_ext was built without its CUDA kernels; rebuild with FORCE_CUDA=1"
    )
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("csd_ext::csd_forward", "CUDA") and has("csd_ext::csd_backward", "CUDA")


# ---------------------------------------------------------------------------
# Against the float64 reference (the CPU suite's property test, on CUDA)
# ---------------------------------------------------------------------------
lead_shapes = st.one_of(st.tuples(st.integers(0, 9)), st.tuples(st.integers(1, 3), st.integers(1, 5)))
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
def test_cuda_matches_reference(gpu, lead, vocab, dtypes, weighting, temperature, alpha, mask_frac, ignore_frac, scale,
                                offset, seed):
    shape = (*lead, vocab)
    if math.prod(shape) > 150_000:
        vocab = max(1, 150_000 // max(1, math.prod(lead)))
        shape = (*lead, vocab)
    z, _ = make_logits(shape, scale=scale, dtype=dtypes[0], seed=seed, mask_frac=mask_frac, device=gpu.device)
    _, t = make_logits(shape, scale=scale, offset=offset, dtype=dtypes[1], seed=seed, mask_frac=mask_frac,
                       device=gpu.device)
    labels = make_labels(lead, ignore_frac=ignore_frac, seed=seed, device=gpu.device)
    check_against_reference(z, t, labels, weighting=weighting, alpha=alpha, temperature=temperature)


@pytest.mark.parametrize("zdt", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("tdt", FLOAT_DTYPES, ids=str)
def test_every_dtype_pair_against_cpu_and_reference(gpu, zdt, tdt):
    # 5003 is odd (rows misaligned relative to each other) and > 4096 (block per row).
    z, _ = make_logits((6, 5003), scale=8.0, dtype=zdt, seed=1, mask_frac=0.05)
    _, t = make_logits((6, 5003), scale=8.0, dtype=tdt, seed=1, mask_frac=0.05)
    labels = torch.tensor([1, -100, 2, 3, 4, -100])
    cuda_vs_cpu(gpu, z, t, labels, weighting="MM", alpha=0.3, temperature=1.5)
    check_against_reference(z.to(gpu.device), t.to(gpu.device), labels.to(gpu.device), weighting="MM", alpha=0.3,
                            temperature=1.5)


@pytest.mark.parametrize("weighting", ALL_WEIGHTINGS)
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_all_weightings(gpu, weighting, temperature):
    for shape in ((33, 1000), (5, 32000)):  # warp per row, block per row
        z, t = make_logits(shape, scale=5.0, seed=len(weighting) + shape[1], mask_frac=0.02)
        cuda_vs_cpu(gpu, z, t, weighting=weighting, alpha=0.15, temperature=temperature)
        check_against_reference(z.to(gpu.device), t.to(gpu.device), weighting=weighting, alpha=0.15,
                                temperature=temperature)


# ---------------------------------------------------------------------------
# Launch paths: row length, few rows (split rows), huge vocabularies
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [1, 2, 7, 31, 33, 4095, 4096, 4097, 8192, 50257, 70001, 131072, 262144])
@pytest.mark.parametrize("weighting", ["SS", "TS", "US", "MM"])
def test_vocab_sizes_and_paths(gpu, vocab, weighting):
    rows = 3 if vocab > 10000 else 19
    for dtype in (torch.float32, torch.bfloat16):
        z, t = make_logits((rows, vocab), scale=10.0, seed=vocab, mask_frac=0.05, dtype=dtype)
        labels = make_labels((rows,), ignore_frac=0.3, seed=vocab)
        cuda_vs_cpu(gpu, z, t, labels, weighting=weighting, temperature=1.5)
    z, t = make_logits((rows, vocab), scale=10.0, seed=vocab, mask_frac=0.05, device=gpu.device)
    check_against_reference(z, t, weighting=weighting, temperature=1.5)


@pytest.mark.parametrize("vocab", [131072, 262144])
def test_single_row_huge_vocab(gpu, vocab):
    """N = 1: the row is split across many blocks and merged by a second kernel."""
    z, t = make_logits((1, vocab), scale=6.0, seed=3, dtype=torch.bfloat16)
    cuda_vs_cpu(gpu, z, t, weighting="SS")
    check_against_reference(z.to(gpu.device), t.to(gpu.device), weighting="TS", temperature=1.5)


def test_split_row_threshold(gpu):
    """Rows just below and at 2 x SM count (split and unsplit launches),
    with ignored rows, which the merge kernel writes."""
    sms = gpu.sm_count()
    for rows in (2 * sms - 1, 2 * sms):
        z, t = make_logits((rows, 8192), scale=4.0, seed=rows, dtype=torch.bfloat16, mask_frac=0.01)
        labels = make_labels((rows,), ignore_frac=0.2, seed=rows)
        cuda_vs_cpu(gpu, z, t, labels, weighting="MM", alpha=0.5)
    z, t = make_logits((sms // 2, 65536), scale=4.0, seed=9)
    labels = make_labels((sms // 2,), ignore_frac=0.5, seed=9)
    cuda_vs_cpu(gpu, z, t, labels, weighting="US")


# ---------------------------------------------------------------------------
# Layout: misaligned row starts, strides, broadcast rows
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float64)], ids=str)
@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (3, 3), (7, 7), (1, 0), (0, 5), (2, 6)], ids=str)
@pytest.mark.parametrize("vocab", [5, 1000, 5001])
def test_misaligned_and_sliced_rows(gpu, dtypes, offsets, vocab):
    """Rows starting at any element offset (sliced storage, row stride V + 13),
    read in place: equal offsets of student and teacher take the vector path
    after a prologue (the gradient is contiguous, so its alignment may differ
    again), different ones the element-wise path."""
    rows, pad = 4, 13
    wz, _ = make_logits((rows, vocab + pad), scale=5.0, seed=vocab, dtype=dtypes[0], mask_frac=0.02, device=gpu.device)
    _, wt = make_logits((rows, vocab + pad), scale=5.0, seed=vocab + 1, dtype=dtypes[1], mask_frac=0.02,
                        device=gpu.device)
    z = wz[:, offsets[0]:offsets[0] + vocab]
    t = wt[:, offsets[1]:offsets[1] + vocab]
    assert z.storage_offset() == offsets[0] and z.stride() == (vocab + pad, 1)
    cuda_vs_cpu(gpu, z, t, weighting="TS", temperature=1.5)
    cuda_vs_cpu(gpu, z, t, weighting="MM", alpha=0.5)
    check_against_reference(z, t, weighting="MM", alpha=0.5)


def test_non_contiguous_leading_dims_and_broadcast_teacher(gpu):
    wide_z, wide_t = make_logits((4, 3, 4130), seed=7, device=gpu.device)
    z = wide_z[:, :, 3:4103]               # vocabulary slice: row stride 4130, offset 3
    t = wide_t.transpose(0, 1).contiguous().transpose(0, 1)[:, :, 3:4103]
    za = z.detach().requires_grad_(True)  # a strided leaf: read in place
    zc = z.contiguous().requires_grad_(True)
    assert za.storage_offset() == 3 and za.stride(-2) == 4130
    # Different row alignments chunk the rows differently: equal to fp32 rounding.
    la, lc = csd_loss(za, t, reduction="none"), csd_loss(zc, t.contiguous(), reduction="none")
    la.sum().backward()
    lc.sum().backward()
    assert_kernels_agree(la, za.grad, lc, zc.grad, z, t, None, torch.ones(z.shape[:-1]))
    cuda_vs_cpu(gpu, z, t)
    tb = wide_t[:1, :1, 3:4103].expand(4, 3, 4100)  # a teacher row broadcast with stride 0
    torch.testing.assert_close(csd_loss(z, tb), csd_loss(z, tb.contiguous()), rtol=1e-5, atol=1e-6)
    cuda_vs_cpu(gpu, z, tb, weighting="TS")
    # A vocabulary dimension with stride != 1 is made contiguous first.
    x = torch.randn(5000, 4, device=gpu.device).t()
    y = torch.randn(5000, 4, device=gpu.device).t()
    assert x.stride() == (1, 4)
    torch.testing.assert_close(csd_loss(x, y), csd_loss(x.contiguous(), y.contiguous()), rtol=1e-5, atol=1e-6)


def test_row_offsets_past_2_to_31_elements(gpu):
    """Rows 2^30 + 5 elements apart, so the last row starts past element 2^31
    of its storage: a row offset computed in 32 bits would read elsewhere.
    The storage is 4 GiB of bf16; on the CPU (the emulation) it is virtual
    memory, of which only the rows' pages are touched."""
    vocab, stride = 5003, 2**30 + 5
    if not gpu.emulated:
        free, _ = torch.cuda.mem_get_info(gpu.device)
        if free < 6 * 2**30:
            pytest.skip(f"needs 6 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    storage = torch.empty(2 * stride + vocab, dtype=torch.bfloat16, device=gpu.device)
    z = storage.as_strided((3, vocab), (stride, 1))
    zv, tv = make_logits((3, vocab), scale=5.0, dtype=torch.bfloat16, seed=31, mask_frac=0.02)
    z.copy_(zv)
    assert z.storage_offset() + 2 * z.stride(0) > 2**31
    for weighting in ("SS", "TS", "MU"):
        cuda_vs_cpu(gpu, z, tv.to(gpu.device), weighting=weighting)
    del storage, z


def test_64bit_offsets(gpu):
    """N * V > 2^31: row offsets overflow 32 bits (needs ~13 GB of GPU memory)."""
    gpu.require_real("2^31 elements (13 GB) are beyond the emulation's time and memory")
    rows, vocab = 8200, 262144
    free, _ = torch.cuda.mem_get_info(gpu.device)
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device=gpu.device).manual_seed(0)
    z = torch.randn(rows, vocab, device=gpu.device, dtype=torch.bfloat16, generator=gen).mul_(4)
    t = torch.randn(rows, vocab, device=gpu.device, dtype=torch.bfloat16, generator=gen).mul_(4)
    assert z.numel() > 2**31
    z.requires_grad_(True)
    loss = csd_loss(z, t, weighting="TS", reduction="none")
    loss.sum().backward()
    for r in (0, rows // 2, rows - 1):  # the last rows live past 2^31 elements
        zc, tc = z[r:r + 1].detach().cpu().requires_grad_(True), t[r:r + 1].cpu()
        lc = csd_loss(zc, tc, weighting="TS", reduction="none")
        lc.sum().backward()
        assert_kernels_agree(loss[r:r + 1], z.grad[r:r + 1], lc, zc.grad, zc, tc, None, torch.ones(1),
                             weighting="TS")
    del z, t, loss
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Masks, reductions, invariances, gradients
# ---------------------------------------------------------------------------
def test_masked_vocab_rows_and_nan(gpu):
    z, t = make_logits((5, 6000), seed=1, mask_frac=0.3)
    z[1] = -math.inf                      # a fully masked row: loss 0, gradient 0
    t[2, :3000] = -math.inf
    z[2, 3000:] = -math.inf
    t[3, 4321] = math.nan                 # NaN propagates to its row only
    loss, grad = cuda_vs_cpu(gpu, z, t, weighting="MM")
    assert loss[1] == 0 and loss[2] == 0 and (grad[1:3] == 0).all()
    assert torch.isnan(loss[3]) and torch.isfinite(loss[[0, 1, 2, 4]]).all()
    assert (grad[torch.isneginf(z) | torch.isneginf(t)] == 0).all()


def test_reductions_and_ignore_index(gpu):
    z, t = make_logits((4, 6, 3000), seed=1, device=gpu.device)
    labels = make_labels((4, 6), seed=1, device=gpu.device)
    none = csd_loss(z, t, labels, reduction="none")
    valid = labels != -100
    torch.testing.assert_close(csd_loss(z, t, labels, reduction="sum"), none.sum())
    torch.testing.assert_close(csd_loss(z, t, labels), none.sum() / valid.sum())
    assert (none[~valid] == 0).all()
    for reduction in ("mean", "sum"):
        a = z.clone().requires_grad_(True)
        ac = z.cpu().clone().requires_grad_(True)
        out = csd_loss(a, t, labels, reduction=reduction)
        (out * 3.5).backward()
        with gpu.cpu_kernel():
            outc = csd_loss(ac, t.cpu(), labels.cpu(), reduction=reduction)
            (outc * 3.5).backward()
        torch.testing.assert_close(out.cpu(), outc, rtol=1e-5, atol=1e-7)
        # Each row's gradient is scaled by 3.5 (/ the valid count for a mean).
        # An element-wise relative bound would be unsound: the kernels' E_w d
        # differ by ~eps*|d|, which moves entries where d_k ~ E_w d by far more
        # than their own size (agreement_tolerances).
        row_scale = torch.full(labels.shape, 3.5 / (valid.sum().item() if reduction == "mean" else 1.0))
        _, grad_tol = agreement_tolerances(z, t, labels, row_scale)
        ga, gc = a.grad.cpu().reshape(grad_tol.shape), ac.grad.reshape(grad_tol.shape)
        assert agree(ga, gc, grad_tol), f"worst diff/tol {((ga.double() - gc.double()).abs() / grad_tol).max():.3g}"
        assert (a.grad[~valid] == 0).all()


# Ops that read a device value back to the host (or size an output by the
# data), so the host waits for the GPU: .item(), bool(t), int(t) (all
# _local_scalar_dense), nonzero, masked_select, unique, equal, ...
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
                 "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal",
                 "aten::repeat_interleave", "aten::bincount"}


class RecordOps(TorchDispatchMode):
    """The names of the ops dispatched while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func._schema.name))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_sync_check(gpu):
    """On a real GPU, torch.cuda's sync debug mode raises on any synchronising call."""
    if gpu.emulated:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_no_host_syncs(gpu):
    """csd_loss (each reduction, with ignored tokens), its backward and
    fused_linear_csd never make the host wait for the device: the valid-token
    count stays on the device, so a training step queues its kernels ahead
    and CUDA graphs can capture it.  The dispatched ops are recorded (both
    backends); on a real GPU the sync debug mode also raises on any sync."""
    z, t = make_logits((4, 6, 5003), seed=5, device=gpu.device)
    labels = make_labels((4, 6), ignore_frac=0.3, seed=5, device=gpu.device)
    h = torch.randn(24, 16, device=gpu.device, requires_grad=True)
    w = torch.randn(5003, 16, device=gpu.device, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        zz = z.clone().requires_grad_(True)
        with RecordOps() as rec, cuda_sync_check(gpu):
            loss = csd_loss(zz, t, labels, weighting="TS", reduction=reduction)
            loss.sum().backward()
            fused = csd_ext.fused_linear_csd(h, w, teacher_logits=t.reshape(24, 5003), labels=labels.reshape(24),
                                             reduction=reduction)
            fused.sum().backward()
        # csd_loss with a student that needs a gradient runs the fused pair
        # (csd_forward_grad[_scaled] + csd_backward_reuse[_scaled]_) where the
        # backend has it, the op pair otherwise; fused_linear_csd the op pair.
        # A mean or sum runs csd_loss_grad + csd_scale_grad_ (one launch each on CUDA).
        pair = "csd_ext::csd_forward" in rec.ops and "csd_ext::csd_backward" in rec.ops
        fused_pair = (any(op.startswith("csd_ext::csd_forward_grad") for op in rec.ops)
                      and any(op.startswith("csd_ext::csd_backward_reuse") for op in rec.ops))
        one_launch = {"csd_ext::csd_loss_grad", "csd_ext::csd_scale_grad_"} <= rec.ops
        if reduction == "none":
            assert pair or fused_pair, sorted(rec.ops)
        else:
            assert one_launch, sorted(rec.ops)
        assert not rec.ops & HOST_SYNC_OPS, f"{reduction}: host syncs {sorted(rec.ops & HOST_SYNC_OPS)}"


@pytest.mark.parametrize("weighting", ["TT", "TU"])
@pytest.mark.parametrize("ignored", ["some", "all", "no labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_launch_reduced_loss(gpu, weighting, ignored, dtype):
    """csd_loss's training path for "mean" and "sum" (csd_loss_grad: the fused
    kernel reads the labels, counts them, writes the gradient and reduces, in
    one launch on CUDA): against float64 (T and U weights do not depend on z,
    so autograd of the reference is the kernel's gradient), bitwise the same
    on a rerun, the mean exactly the sum over max(count, 1), zero loss and
    gradient when every row is ignored, and a grad_output that scales the
    stored gradient with one rounding (csd_scale_grad_)."""
    z, t = make_logits((3, 5, 3001), seed=7, dtype=dtype, device=gpu.device)
    labels = None
    if ignored != "no labels":
        labels = make_labels((3, 5), ignore_frac=0.4, seed=7, device=gpu.device)
        labels[0, 0], labels[0, 1] = -100, 5
        if ignored == "all":
            labels.fill_(-100)
    count = 15 if labels is None else int((labels != -100).sum())
    results = {}
    for reduction in ("mean", "sum"):
        runs = []
        for _ in range(2):
            a = z.clone().requires_grad_(True)
            b = t.clone().requires_grad_(True)
            loss = csd_loss(a, b, labels, weighting=weighting, reduction=reduction)
            loss.backward()
            runs.append((loss.detach(), a.grad, b.grad))
        (loss, grad, tgrad), (loss2, grad2, _) = runs
        assert loss.shape == () and loss.dtype == torch.float32
        assert torch.equal(loss, loss2) and torch.equal(grad, grad2), "not bitwise reproducible"
        assert torch.equal(tgrad, -grad)
        results[reduction] = (loss, grad)
        zr = z.double().cpu().requires_grad_(True)
        ref = csd_loss_reference(zr, t.double().cpu(), None if labels is None else labels.cpu(),
                                 weighting=weighting, reduction=reduction)
        ref.backward()
        if count == 0:
            assert loss.item() == 0 and (grad == 0).all()
            continue
        rows = torch.ones(3, 5, dtype=torch.float64) if labels is None else (labels.cpu() != -100).double()
        row_scale = rows / (count if reduction == "mean" else 1)
        loss_tol, grad_tol = agreement_tolerances(z.cpu(), t.cpu(), None if labels is None else labels.cpu(),
                                                  row_scale, weighting=weighting)
        # The rows' bounds, reduced as the loss is, plus the fp32 sum's rounding.
        tol = float((loss_tol * row_scale.reshape(-1)).sum()) + 16 * 2**-24 * abs(ref.item())
        assert abs(loss.item() - ref.item()) <= tol, (loss.item(), ref.item(), tol)
        assert agree(grad.cpu().reshape(grad_tol.shape), zr.grad.reshape(grad_tol.shape), grad_tol)
        # grad_output != 1: the stored gradient times it, rounded once.
        a = z.clone().requires_grad_(True)
        (csd_loss(a, t, labels, weighting=weighting, reduction=reduction) * 2.5).backward()
        assert torch.equal(a.grad, grad * 2.5)
    mean, sum_ = results["mean"][0], results["sum"][0]
    assert torch.equal(mean, sum_ / max(count, 1))


def test_all_ignored_and_empty_batches(gpu):
    z, t = make_logits((3, 5, 5000), seed=3, device=gpu.device)
    z.requires_grad_(True)
    labels = torch.full((3, 5), -100, device=gpu.device)
    for reduction in ("mean", "sum", "none"):
        loss = csd_loss(z, t, labels, reduction=reduction)
        assert torch.isfinite(loss).all() and (loss == 0).all()
        z.grad = None
        loss.sum().backward()
        assert (z.grad == 0).all()
    e = torch.randn(0, 7, device=gpu.device, requires_grad=True)
    assert csd_loss(e, torch.randn(0, 7, device=gpu.device)).item() == 0
    csd_loss(e, torch.randn(0, 7, device=gpu.device)).backward()
    assert e.grad.shape == (0, 7)


@pytest.mark.parametrize("weighting", ALL_WEIGHTINGS)
def test_zero_loss_and_gradient_at_optimum(gpu, weighting):
    """z = t + c is optimal for every weighting.  d is exactly c, but the
    weighted mean of a chunk, sum(e*c)/sum(e), is c only up to fp32 rounding
    (~1e-6 here), so the loss is 0 up to its square and the gradient up to w*1e-6."""
    _, t = make_logits((5, 5000), scale=5.0, seed=3)
    t = (t * 4).round().clamp(-127, 127) / 4  # exact in bf16 and fp32, as is t + 4k
    for vocab in (1000, 5000):
        for dtype in (torch.float32, torch.bfloat16):
            tv = t[:, :vocab]
            z = (tv + torch.arange(5.0).unsqueeze(1) * 4).to(dtype).to(gpu.device).requires_grad_(True)
            loss = csd_loss(z, tv.to(dtype).to(gpu.device), weighting=weighting, reduction="none")
            assert (loss.abs() <= 1e-10).all(), loss
            loss.sum().backward()
            assert (z.grad.float().abs() <= 1e-5).all(), z.grad.abs().max()


@given(weighting=st.sampled_from(ALL_WEIGHTINGS), seed=st.integers(0, 1000))
def test_shift_invariance(gpu, weighting, seed):
    z, t = make_logits((4, 4500), scale=3.0, dtype=torch.float64, seed=seed, mask_frac=0.1, device=gpu.device)
    cz = torch.randn(4, 1, dtype=torch.float64, device=gpu.device) * 50
    ct = torch.randn(4, 1, dtype=torch.float64, device=gpu.device) * 50
    a, b = z.clone().requires_grad_(True), (z + cz).requires_grad_(True)
    la = csd_loss(a, t, weighting=weighting, temperature=1.5, reduction="none")
    lb = csd_loss(b, t + ct, weighting=weighting, temperature=1.5, reduction="none")
    torch.testing.assert_close(la, lb, rtol=1e-8, atol=1e-9)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-11)


@pytest.mark.parametrize("weighting", ["SS", "TS", "MU"])
@pytest.mark.parametrize("shape", [(6, 3000), (2, 40000)], ids=["rows", "split-rows"])
def test_common_offset_keeps_the_gradient_exact(gpu, weighting, shape):
    """Issue 13 item 6: student and teacher sharing an offset of 1e4 in fp32
    lose nothing (stats keep each max and log-sum apart; csd_testing.
    check_common_offset_gradient says why).  Per-row grad_output, so the
    backward kernel rebuilds the weights from the stats."""
    from csd_testing import check_common_offset_gradient

    z, t = make_logits(shape, dtype=torch.float64, seed=21)
    c = 1e4 + torch.rand(shape[0], 1, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    g = torch.randn(shape[0], generator=torch.Generator().manual_seed(23))
    check_common_offset_gradient((z + c).float().to(gpu.device), (t + c).float().to(gpu.device),
                                 grad_output=g.to(gpu.device), weighting=weighting, alpha=0.3)


@pytest.mark.parametrize("weighting", ["TT", "UU", "TU", "UT"])
def test_gradcheck_when_weights_do_not_depend_on_student(gpu, weighting):
    z, t = make_logits((3, 2, 11), scale=2.0, dtype=torch.float64, seed=5, mask_frac=0.1, device=gpu.device)
    z.requires_grad_(True)
    labels = torch.tensor([[1, -100], [2, 3], [-100, 4]], device=gpu.device)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x: csd_loss(x, t, labels, weighting=weighting, temperature=1.7, reduction=reduction),
            (z,), eps=1e-6, atol=1e-8,
        )


def test_ss_at_unit_temperature_is_reverse_kl_gradient(gpu):
    z, t = make_logits((6, 5001), scale=4.0, dtype=torch.float64, seed=9, device=gpu.device)
    zc = z.clone().requires_grad_(True)
    csd_loss(zc, t, weighting="SS", reduction="sum").backward()
    zk = z.clone().requires_grad_(True)
    log_q, log_p = F.log_softmax(zk, -1), F.log_softmax(t, -1)
    (log_q.exp() * (log_q - log_p)).sum().backward()
    torch.testing.assert_close(zc.grad, zk.grad, rtol=1e-10, atol=1e-13)


def test_teacher_gradient_is_negative_student_gradient(gpu):
    z, t = make_logits((4, 5000), seed=2, device=gpu.device)
    z.requires_grad_(True)
    t.requires_grad_(True)
    csd_loss(z, t, weighting="SS").backward()
    torch.testing.assert_close(t.grad, -z.grad)


def test_bf16_uses_fp32_accumulation(gpu):
    z, t = make_logits((16, 32000), scale=20.0, dtype=torch.bfloat16, seed=8, device=gpu.device)
    out = csd_loss(z, t, reduction="none")
    ref = csd_loss_reference(z.double(), t.double(), reduction="none")
    assert out.dtype == torch.float32
    assert ((out.double() - ref).abs() / ref).max().item() < 2e-5


# ---------------------------------------------------------------------------
# torch integration: opcheck, torch.compile, CUDA graphs, streams, devices
# ---------------------------------------------------------------------------
OPCHECK_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                  (torch.float64, torch.float32)]
OPCHECK_CASES = [("SS", 37, True), ("TS", 5000, False), ("MM", 70001, True)]


@pytest.mark.parametrize("dtypes", OPCHECK_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_opcheck_forward(gpu, dtypes, case):
    gpu.require_real("opcheck tests the CUDA registration (the CPU suite opchecks the CPU one)")
    weighting, vocab, mask = case
    rows = 6 if vocab < 70001 else 2
    z, _ = make_logits((rows, vocab), dtype=dtypes[0], seed=1, mask_frac=0.1, device=gpu.device)
    _, t = make_logits((rows, vocab), dtype=dtypes[1], seed=1, mask_frac=0.1, device=gpu.device)
    row_mask = (torch.arange(rows, device=gpu.device) % 3 != 1) if mask else None
    args = (z.requires_grad_(True), t, row_mask, weighting, 0.3, 1.5)
    torch.library.opcheck(torch.ops.csd_ext.csd_forward.default, args)


def test_opcheck_backward(gpu):
    gpu.require_real("opcheck tests the CUDA registration (the CPU suite opchecks the CPU one)")
    for vocab in (33, 5000):
        z, t = make_logits((5, vocab), seed=3, device=gpu.device)
        _, stats = torch.ops.csd_ext.csd_forward(z, t, None, "TS", 0.5, 1.0)
        grad_loss = torch.randn(5, device=gpu.device)
        torch.library.opcheck(torch.ops.csd_ext.csd_backward.default, (grad_loss, z, t, stats, "TS", 0.5, 1.0))


def test_opcheck_loss_grad(gpu):
    gpu.require_real("opcheck tests the CUDA registration (the CPU suite opchecks the CPU one)")
    z, t = make_logits((6, 3001), seed=4, dtype=torch.bfloat16, device=gpu.device)
    labels = torch.tensor([1, -100, 2, 3, -100, 4], device=gpu.device)
    for args in ((z, t, labels, -100, "TS", 0.5, 1.0, "mean"), (z.float(), t.float(), None, -100, "SS", 0.5, 1.0,
                                                                  "sum")):
        torch.library.opcheck(torch.ops.csd_ext.csd_loss_grad.default, args)
    torch.library.opcheck(torch.ops.csd_ext.csd_scale_grad_.default,
                          (torch.randn(4, 9, device=gpu.device), torch.tensor(2.5, device=gpu.device)))


def test_eager_step_is_cuda_graph_capturable(gpu):
    """csd_loss's eager training step (csd_loss_grad + csd_scale_grad_: no
    host sync, no memset; the launch counter is reset by the kernel) under
    torch.cuda.graph after a warm-up, replayed on new inputs: the same loss
    and gradient as eager, bitwise."""
    gpu.require_real("CUDA graph capture")
    z, t = make_logits((4, 6, 5003), seed=9, dtype=torch.bfloat16, device=gpu.device)
    labels = make_labels((4, 6), seed=9, device=gpu.device)
    zs = z.clone().requires_grad_(True)
    ts, ys = t.clone(), labels.clone()

    def step():
        zs.grad = None
        loss = csd_loss(zs, ts, ys, weighting="TS")
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for seed in (10, 11):
        z2, t2 = make_logits((4, 6, 5003), seed=seed, dtype=torch.bfloat16, device=gpu.device)
        y2 = make_labels((4, 6), seed=seed, device=gpu.device)
        with torch.no_grad():
            zs.copy_(z2)
            ts.copy_(t2)
            ys.copy_(y2)
        graph.replay()
        a = z2.clone().requires_grad_(True)
        want = csd_loss(a, t2, y2, weighting="TS")
        want.backward()
        torch.cuda.synchronize()
        assert torch.equal(loss, want.detach()) and torch.equal(zs.grad, a.grad)


def test_backward_reads_an_expanded_scalar_grad_loss(gpu):
    """An expanded scalar grad_loss (stride 0), as autograd hands over for a
    mean, gives exactly what its contiguous copy gives."""
    for vocab in (33, 5000):
        z, t = make_logits((5, vocab), seed=3, device=gpu.device)
        _, stats = torch.ops.csd_ext.csd_forward(z, t, None, "TS", 0.5, 1.0)
        g0 = torch.tensor(0.25, device=gpu.device).expand(5)
        got = torch.ops.csd_ext.csd_backward(g0, z, t, stats, "TS", 0.5, 1.0)
        want = torch.ops.csd_ext.csd_backward(g0.contiguous(), z, t, stats, "TS", 0.5, 1.0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class TinyDistiller(torch.nn.Module):
    def __init__(self, vocab=5003, hidden=16):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab)
        self.loss = CSDLoss(weighting="TS", temperature=1.5)

    def forward(self, h, teacher_logits, labels):
        return self.loss(self.head(h), teacher_logits, labels)


def test_torch_compile_fullgraph_matches_eager(gpu):
    gpu.require_real("torch.compile of the CUDA registration (the CPU suite compiles the CPU one)")
    torch.manual_seed(0)
    model = TinyDistiller().to(gpu.device)
    h = torch.randn(2, 5, 16, device=gpu.device)
    _, t = make_logits((2, 5, 5003), seed=2, device=gpu.device)
    labels = make_labels((2, 5), seed=2, device=gpu.device)
    eager = model(h, t, labels)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(h, t, labels)
    out.backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_torch_compile_reduce_overhead_cuda_graphs(gpu):
    """mode="reduce-overhead" records the ops into a CUDA graph: they must be
    capturable (no host syncs, no allocation outside the caching allocator)
    and give the eager numbers on every replay."""
    gpu.require_real("CUDA graphs")
    torch.manual_seed(1)
    model = TinyDistiller().to(gpu.device)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        h = torch.randn(2, 5, 16, device=gpu.device)
        _, t = make_logits((2, 5, 5003), seed=10 + step, device=gpu.device)
        labels = make_labels((2, 5), seed=10 + step, device=gpu.device)
        model.zero_grad()
        eager = model(h, t, labels)
        eager.backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        out = compiled(h, t, labels)
        out.backward()
        torch.testing.assert_close(out, eager)
        for g, p in zip(want, model.parameters()):
            torch.testing.assert_close(p.grad, g)


def test_compiled_with_dynamic_shapes_and_split_rows(gpu):
    gpu.require_real("torch.compile of the CUDA registration (the CPU suite compiles the CPU one)")
    f = torch.compile(lambda z, t, l: csd_loss(z, t, l, weighting="SS"), fullgraph=True, dynamic=True)
    for n, vocab in ((3, 70001), (7, 70001), (300, 1000)):
        z, t = make_logits((n, vocab), seed=n, device=gpu.device)
        labels = make_labels((n,), seed=n, device=gpu.device)
        torch.testing.assert_close(f(z, t, labels), csd_loss(z, t, labels))


def test_runs_on_the_current_stream(gpu):
    gpu.require_real("CUDA streams")
    z, t = make_logits((64, 50257), seed=4, dtype=torch.bfloat16, device=gpu.device)
    want = csd_loss(z, t, reduction="none")
    side = torch.cuda.Stream(device=gpu.device)
    side.wait_stream(torch.cuda.current_stream(gpu.device))
    with torch.cuda.stream(side):
        got = csd_loss(z, t, reduction="none")
    torch.cuda.current_stream(gpu.device).wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_inputs_device_not_the_current_one(gpu):
    gpu.require_real("two CUDA devices")
    z, t = make_logits((4, 5000), seed=5)
    want = csd_loss(z, t, reduction="none")
    with torch.cuda.device(0):
        got = csd_loss(z.to("cuda:1"), t.to("cuda:1"), reduction="none")
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-7)


def test_device_mismatch_is_named(gpu):
    gpu.require_real("tensors on two devices")
    z, t = make_logits((3, 50), seed=1)
    with pytest.raises(ValueError, match="teacher_logits is on"):
        torch.ops.csd_ext.csd_forward(z.to(gpu.device), t, None, "SS", 0.5, 1.0)
    with pytest.raises(ValueError, match="row_mask is on"):
        torch.ops.csd_ext.csd_forward(z.to(gpu.device), t.to(gpu.device), torch.ones(3, dtype=torch.bool), "SS", 0.5,
                                      1.0)
    _, stats = torch.ops.csd_ext.csd_forward(z.to(gpu.device), t.to(gpu.device), None, "SS", 0.5, 1.0)
    with pytest.raises(ValueError, match="grad_loss is on"):
        torch.ops.csd_ext.csd_backward(torch.ones(3), z.to(gpu.device), t.to(gpu.device), stats, "SS", 0.5, 1.0)


# ---------------------------------------------------------------------------
# The fused linear + CSD path on CUDA (it feeds chunks to the same kernels)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher", ["logits", "hidden"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_matches_materialised_logits(gpu, dtype, teacher, reduction):
    g = torch.Generator(device="cpu").manual_seed(3)
    n, hid, vocab = 37, 64, 5003
    h = torch.randn(n, hid, generator=g).to(gpu.device, dtype).requires_grad_()
    w = (torch.randn(vocab, hid, generator=g) * 0.2).to(gpu.device, dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(gpu.device, dtype).requires_grad_()
    th = torch.randn(n, hid, generator=g).to(gpu.device, dtype)
    tw = (torch.randn(vocab, hid, generator=g) * 0.2).to(gpu.device, dtype)
    labels = make_labels((n,), seed=3, device=gpu.device)
    t_logits = (th.float() @ tw.float().T)
    teacher_kw = ({"teacher_logits": t_logits} if teacher == "logits"
                  else {"teacher_hidden": th, "teacher_weight": tw})
    grad_out = torch.rand(n, generator=g).to(gpu.device) if reduction == "none" else torch.ones((), device=gpu.device)

    got = csd_ext.fused_linear_csd(h, w, labels=labels, student_bias=b, weighting="TS", temperature=1.5,
                                   reduction=reduction, chunk_size=7, **teacher_kw)
    got_grads = torch.autograd.grad((got * grad_out).sum(), (h, w, b))
    z = torch.addmm(b.float(), h.float(), w.float().T)  # fp32 logits, as the fused path computes them
    want = csd_loss(z, t_logits, labels, weighting="TS", temperature=1.5, reduction=reduction)
    want_grads = torch.autograd.grad((want * grad_out).sum(), (h, w, b))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    tol = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for a, e, name in zip(got_grads, want_grads, ("hidden", "weight", "bias")):
        torch.testing.assert_close(a.float(), e.float(), rtol=tol[0], atol=tol[1] * e.abs().max().item(),
                                   msg=lambda m, name=name: f"{name} gradient: {m}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_with_a_non_default_ignore_index(gpu, reduction):
    """fused_linear_csd and FusedLinearCSDLoss pass ignore_index through: the
    rows labelled 7 are dropped exactly as csd_loss drops them, and rows
    labelled -100 (an ordinary label here) are counted."""
    g = torch.Generator(device="cpu").manual_seed(5)
    n, hid, vocab, ignore_index = 29, 32, 3001, 7
    h = torch.randn(n, hid, generator=g).to(gpu.device).requires_grad_()
    w = (torch.randn(vocab, hid, generator=g) * 0.2).to(gpu.device)
    b = (torch.randn(vocab, generator=g) * 0.1).to(gpu.device)
    t_logits = (torch.randn(n, vocab, generator=g) * 2).to(gpu.device)
    labels = make_labels((n,), ignore_frac=0.4, ignore_index=ignore_index, seed=5, device=gpu.device)
    labels[:3] = -100
    assert (labels == ignore_index).any()
    z = torch.addmm(b, h.detach(), w.T).requires_grad_()  # the logits the fused path computes
    want = csd_loss(z, t_logits, labels, weighting="SS", ignore_index=ignore_index, reduction=reduction)
    (want_grad_z,) = torch.autograd.grad(want.sum(), (z,))
    want_grad_h = want_grad_z @ w
    loss_fn = csd_ext.FusedLinearCSDLoss(weighting="SS", ignore_index=ignore_index, reduction=reduction,
                                         chunk_size=8)
    for got in (csd_ext.fused_linear_csd(h, w, t_logits, labels, student_bias=b, weighting="SS",
                                         ignore_index=ignore_index, reduction=reduction, chunk_size=8),
                loss_fn(h, w, t_logits, labels=labels, student_bias=b)):
        (got_grad_h,) = torch.autograd.grad(got.sum(), (h,))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_grad_h, want_grad_h, rtol=1e-4, atol=1e-5 * want_grad_h.abs().max().item())
    if reduction == "none":
        assert (want[labels == ignore_index] == 0).all() and (want[labels == -100] > 0).all()
