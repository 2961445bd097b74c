"""The ops as torch sees them: opcheck, torch.compile without graph breaks, backends."""

import pytest
import torch

import csd_ext
from csd_ext import CSDLoss, csd_loss
from csd_ext.reference import csd_loss_reference
from compile_testing import fresh_compile
from csd_testing import make_labels, make_logits


def sample_inputs():
    cases = []
    for dtypes in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                   (torch.float64, torch.float32)]:
        for weighting, mask in [("SS", True), ("TS", False), ("MM", True), ("UU", False)]:
            z, _ = make_logits((6, 37), dtype=dtypes[0], seed=1, mask_frac=0.1)
            _, t = make_logits((6, 37), dtype=dtypes[1], seed=1, mask_frac=0.1)
            row_mask = torch.tensor([True, False, True, True, False, True]) if mask else None
            cases.append((z.requires_grad_(True), t, row_mask, weighting, 0.3, 1.5))
    return cases


@pytest.mark.parametrize("args", sample_inputs())
def test_opcheck_forward(args):
    torch.library.opcheck(torch.ops.csd_ext.csd_forward.default, args)


def test_opcheck_backward():
    z, t = make_logits((5, 33), seed=3)
    _, stats = torch.ops.csd_ext.csd_forward(z, t, None, "TS", 0.5, 1.0)
    grad_loss = torch.randn(5)
    torch.library.opcheck(torch.ops.csd_ext.csd_backward.default, (grad_loss, z, t, stats, "TS", 0.5, 1.0))


class TinyDistiller(torch.nn.Module):
    def __init__(self, vocab=97, hidden=16):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab)
        self.loss = CSDLoss(weighting="TS", temperature=1.5)

    def forward(self, h, teacher_logits, labels):
        return self.loss(self.head(h), teacher_logits, labels)


@pytest.fixture
def no_compile_caches():
    with fresh_compile():
        yield


def reference_head(model, h, t, labels):
    """The model's loss and parameter gradients in float64, with the reference
    CSD (detached weights) in place of the op."""
    head = torch.nn.Linear(h.shape[-1], t.shape[-1]).double()
    head.load_state_dict(model.head.state_dict())
    loss = csd_loss_reference(head(h.double()), t.double(), labels, weighting="TS", temperature=1.5)
    loss.backward()
    return loss.detach(), [p.grad for p in head.parameters()]


def test_torch_compile_fullgraph_matches_reference(no_compile_caches):
    torch.manual_seed(0)
    model = TinyDistiller()
    h = torch.randn(2, 5, 16)
    _, t = make_logits((2, 5, 97), seed=2)
    labels = make_labels((2, 5), seed=2)
    ref, ref_grads = reference_head(model, h, t, labels)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(h, t, labels)
    out.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(ref_grads, model.parameters()):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


def test_compiled_function_with_dynamic_shapes(no_compile_caches):
    f = torch.compile(lambda z, t, l: csd_loss(z, t, l, weighting="SS"), fullgraph=True, dynamic=True)
    for n in (3, 7):
        z, t = make_logits((n, 41), seed=n)
        labels = make_labels((n,), seed=n)
        zk, zr = z.clone().requires_grad_(True), z.double().requires_grad_(True)
        out = f(zk, t, labels)
        out.backward()
        ref = csd_loss_reference(zr, t.double(), labels, weighting="SS")
        ref.backward()
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(zk.grad.double(), zr.grad, rtol=1e-4, atol=1e-5 * zr.grad.abs().max().item())


def test_version_and_backends():
    assert isinstance(csd_ext.__version__, str) and csd_ext.__version__.count(".") == 2
    backends = csd_ext.compiled_backends()
    assert "cpu" in backends
    assert torch.ops.csd_ext.cpu_kernel_isa() in ("default", "avx2", "avx512")
