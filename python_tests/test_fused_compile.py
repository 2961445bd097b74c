"""torch.compile routes a loss whose student needs a gradient through
csd_forward_grad (one kernel) on the devices in _ops.COMPILED_FUSED_DEVICES
(CUDA in a real run).  Here the CPU is put in that set so the traced graph,
its autograd rule (csd_backward_reuse_ in the compiled backward) and
fullgraph=True are checked without a GPU; test_cuda.py's suite covers CUDA."""

import pytest
import torch

from csd_ext import _ops, csd_loss

pytestmark = pytest.mark.skipif(not _ops.has_fused_kernel(torch.device("cpu")),
                                reason="no fused CPU kernel in this build")


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(_ops, "COMPILED_FUSED_DEVICES", {"cpu", "cuda"})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _logits(n, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 3).to(dtype), (torch.randn(n, v, generator=g) * 3).to(dtype)


def _graph_ops(fn, *args):
    """The ops of the graph dynamo traces for fn(*args) (fullgraph)."""
    seen = []

    def backend(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def test_the_compiled_graph_calls_forward_grad(fused_on_cpu):
    z, t = _logits(4, 300, torch.float32)
    ops = _graph_ops(lambda a, b: csd_loss(a, b), z.requires_grad_(True), t)
    assert any("csd_forward_grad" in o for o in ops), ops
    assert not any("csd_ext.csd_forward." in o for o in ops), ops


def test_forward_only_keeps_the_op_pair_and_a_masked_mean_scales_on_the_device(fused_on_cpu):
    z, t = _logits(4, 300, torch.float32)
    ops = _graph_ops(lambda a, b: csd_loss(a, b), z, t)  # nothing needs a gradient
    assert not any("csd_forward_grad" in o for o in ops), ops
    labels = torch.tensor([1, -100, 2, 3])
    ops = _graph_ops(lambda a, b, y: csd_loss(a, b, y), z.clone().requires_grad_(True), t, labels)
    assert any("csd_forward_grad_scaled" in o for o in ops), ops


@pytest.mark.parametrize("reduction,weighting,dtype", [
    ("mean", "SS", torch.float32), ("sum", "TS", torch.bfloat16), ("none", "MM", torch.float32),
    ("masked_mean", "US", torch.float32),
])
def test_compiled_fused_gradient_matches_eager(fused_on_cpu, reduction, weighting, dtype):
    z, t = _logits(6, 1000, dtype, seed=1)
    labels = torch.tensor([1, -100, 2, 3, 4, -100]) if reduction != "mean" else None
    reduction = "mean" if reduction == "masked_mean" else reduction
    # Per-row grad outputs that differ from the anticipated one exercise the
    # in-place recompute of csd_backward_reuse_ in the compiled backward.
    weights = torch.linspace(0.5, 2.0, 6) if reduction == "none" else None

    def run(fn):
        zc = z.clone().requires_grad_(True)
        tc = t.clone().requires_grad_(True)
        out = fn(zc, tc)
        (out * weights).sum().backward() if weights is not None else out.backward()
        return out.detach(), zc.grad, tc.grad

    def loss(a, b):
        return csd_loss(a, b, labels, weighting=weighting, reduction=reduction)

    want = run(loss)
    got = run(torch.compile(loss, fullgraph=True))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    torch.testing.assert_close(got[2], want[2], **tol)


def test_opcheck_scaled_ops():
    z, t = _logits(3, 1000, torch.bfloat16)
    scale = torch.tensor(0.5)
    torch.library.opcheck(torch.ops.csd_ext.csd_forward_grad_scaled.default,
                          (z, t, torch.tensor([True, False, True]), "TS", 0.5, 1.5, scale))
    zf = z.float()
    _, stats, grad = torch.ops.csd_ext.csd_forward_grad_scaled(zf, t.float(), None, "SS", 0.5, 1.0, scale)
    torch.library.opcheck(torch.ops.csd_ext.csd_backward_reuse_scaled_.default,
                          (torch.tensor([0.5, 1.0, 0.5]), zf, t.float(), stats, grad, "SS", 0.5, 1.0, scale))


def test_masked_mean_takes_the_device_scale_and_matches_the_float_scale(monkeypatch):
    """Eager: a mean over a label mask hands csd_forward_grad_scaled 1/count as
    a tensor (no host read on CUDA); gradient and loss equal the float path's."""
    z, t = _logits(5, 700, torch.float32, seed=4)
    labels = torch.tensor([1, -100, 2, -100, 3])
    seen = []
    real = torch.ops.csd_ext.csd_forward_grad_scaled

    class Spy:
        def __call__(self, *args):
            seen.append(args[-1])
            return real(*args)

    monkeypatch.setattr(torch.ops.csd_ext, "csd_forward_grad_scaled", Spy())
    zc = z.clone().requires_grad_(True)
    loss = csd_loss(zc, t, labels)
    loss.backward()
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    assert seen[0].dtype == torch.float32 and seen[0].item() == torch.tensor(1 / 3).item()
    want_loss, _, want_grad = torch.ops.csd_ext.csd_forward_grad(z, t, labels != -100, "SS", 0.5, 1.0, 1 / 3)
    torch.testing.assert_close(loss, want_loss.sum() / 3)
    torch.testing.assert_close(zc.grad, want_grad)
