"""csd_ext::csd_loss_grad and csd_ext::csd_scale_grad_ on the CPU: the op
that CUDA runs as one launch of the fused kernel (a reduced loss, its
labels, count and gradient), here a composition of the CPU ops.  opcheck,
torch.compile(fullgraph=True), its autograd rules, and that it gives the
values of csd_loss's op-pair path.  The CUDA kernel itself is checked by the
GPU suite (gpu_suite.py: emulated in CI, real on a GPU) and by
tests/cpp/test_csd_cuda_fused_emulated.cpp."""

import pytest
import torch

from csd_ext import _ops, csd_loss
from csd_testing import make_labels, make_logits

OP = torch.ops.csd_ext.csd_loss_grad


def _case(dtype=torch.float32, seed=0, shape=(6, 700)):
    z, t = make_logits(shape, seed=seed, dtype=dtype)
    labels = torch.tensor([1, -100, 2, 3, -100, 4])[: shape[0]]
    return z, t, labels


@pytest.mark.parametrize("args", [
    lambda: (*_case()[:2], _case()[2], -100, "SS", 0.5, 1.0, "mean"),
    lambda: (*_case()[:2], None, -100, "TS", 0.3, 1.5, "sum"),
    lambda: (*_case(torch.bfloat16)[:2], _case()[2].int(), -100, "MM", 0.5, 1.0, "mean"),
    lambda: (*_case(torch.float64)[:2], torch.tensor([7, 7, 1, 7, 2, 3]), 7, "US", 0.5, 1.0, "sum"),
    lambda: (*_case()[:2], torch.full((6,), -100), -100, "SS", 0.5, 1.0, "mean"),
])
def test_opcheck_loss_grad(args):
    torch.library.opcheck(OP.default, args())


def test_opcheck_scale_grad():
    g = torch.randn(4, 9)
    for s in (torch.tensor(1.0), torch.tensor(2.5)):
        torch.library.opcheck(torch.ops.csd_ext.csd_scale_grad_.default, (g.clone(), s))
    gb = torch.randn(4, 9).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.csd_ext.csd_scale_grad_.default, (gb, torch.tensor(0.5)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("labels_kind", ["some", "all", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_values_as_the_op_pair_path(reduction, labels_kind, dtype):
    """On the CPU the op is csd_forward_grad with the reduction's scale and
    reduce_rows' sum: the loss and gradient csd_loss's eager path gives, to
    the bit."""
    z, t = make_logits((2, 5, 900), seed=3, dtype=dtype)
    labels = {"some": make_labels((2, 5), seed=3), "all": torch.full((2, 5), -100), "none": None}[labels_kind]
    a = z.clone().requires_grad_(True)
    want = csd_loss(a, t, labels, weighting="TS", reduction=reduction)
    want.backward()
    loss, grad = OP(z.reshape(-1, 900), t.reshape(-1, 900), None if labels is None else labels.reshape(-1), -100,
                    "TS", 0.5, 1.0, reduction)
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.equal(loss, want.detach())
    assert torch.equal(grad.reshape(a.grad.shape), a.grad)
    if labels_kind == "all":
        assert loss.item() == 0 and (grad == 0).all()


def test_errors_name_the_argument():
    z, t, labels = _case()
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        OP(z, t, labels, -100, "SS", 0.5, 1.0, "none")
    with pytest.raises(ValueError, match=r"labels must have shape \[6\]"):
        OP(z, t, labels[:5], -100, "SS", 0.5, 1.0, "mean")
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        OP(z, t, labels.float(), -100, "SS", 0.5, 1.0, "mean")
    with pytest.raises(ValueError, match="grad_output must be a one-element tensor"):
        torch.ops.csd_ext.csd_scale_grad_(torch.randn(2, 3), torch.ones(2))


@pytest.fixture
def one_launch_on_cpu(monkeypatch):
    """csd_loss takes csd_loss_grad on the CPU too, as it does on CUDA."""
    monkeypatch.setattr(_ops, "ONE_LAUNCH_DEVICES", {"cpu", "cuda"})


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_eager_autograd_any_grad_output_and_retain_graph(one_launch_on_cpu, monkeypatch, reduction):
    """The eager rule (_FusedCSDLoss): the stored gradient is for a backward
    of 1.0; grad_output scales it (csd_scale_grad_); the teacher gets its
    negative; a second backward through a retained graph recomputes it."""
    z, t = make_logits((3, 4, 800), seed=5)
    labels = make_labels((3, 4), seed=5)
    calls = []
    real = _ops._FusedCSDLoss.apply
    monkeypatch.setattr(_ops._FusedCSDLoss, "apply", lambda *a: calls.append(1) or real(*a))
    a, b = z.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = csd_loss(a, b, labels, weighting="TS", reduction=reduction)
    assert calls, "csd_loss did not take csd_loss_grad"
    (loss * 3.0).backward(retain_graph=True)
    g3 = a.grad.clone()
    a.grad = None
    loss.backward()
    with monkeypatch.context() as m:
        m.setattr(_ops, "ONE_LAUNCH_DEVICES", set())
        r = z.clone().requires_grad_(True)
        csd_loss(r, t, labels, weighting="TS", reduction=reduction).backward()
    assert torch.equal(a.grad, r.grad)
    assert torch.equal(g3, r.grad * 3.0)
    assert torch.equal(b.grad, -(g3 + r.grad))


def test_reduction_none_keeps_the_fused_pair(one_launch_on_cpu, monkeypatch):
    """reduction="none" has per-row outputs: it keeps csd_forward_grad and
    csd_backward_reuse_ (per-row grad_output honoured)."""
    z, t = make_logits((4, 500), seed=6)
    monkeypatch.setattr(_ops._FusedCSDLoss, "apply", lambda *a: pytest.fail("csd_loss_grad for reduction='none'"))
    seen = []
    real = _ops._FusedCSD.apply
    monkeypatch.setattr(_ops._FusedCSD, "apply", lambda *a: seen.append(1) or real(*a))
    a = z.clone().requires_grad_(True)
    out = csd_loss(a, t, reduction="none")
    assert out.shape == (4,) and seen
    w = torch.tensor([0.5, 1.0, 2.0, 0.0])
    (out * w).sum().backward()
    loss, stats = torch.ops.csd_ext.csd_forward(z, t, None, "SS", 0.5, 1.0)
    want = torch.ops.csd_ext.csd_backward(w, z, t, stats, "SS", 0.5, 1.0)
    torch.testing.assert_close(out.detach(), loss)
    torch.testing.assert_close(a.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_compile_fullgraph(reduction):
    """The op and its registered autograd rule trace without a graph break;
    the compiled forward and backward (csd_scale_grad_ on the saved
    gradient) match eager."""
    z, t, labels = _case(seed=8)

    def step(a, b, y):
        loss, _grad = OP(a, b, y, -100, "TS", 0.5, 1.0, reduction)
        return loss * 1.5

    def run(fn):
        a, b = z.clone().requires_grad_(True), t.clone().requires_grad_(True)
        out = fn(a, b, labels)
        out.backward()
        return out.detach(), a.grad, b.grad

    torch._dynamo.reset()
    want = run(step)
    got = run(torch.compile(step, fullgraph=True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
