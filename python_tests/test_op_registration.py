"""The ops as torch sees them: opcheck, torch.compile without graph breaks, backends."""

import pytest
import torch

import csd_ext
from csd_ext import CSDLoss, csd_loss
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


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyDistiller()
    h = torch.randn(2, 5, 16)
    _, t = make_logits((2, 5, 97), seed=2)
    labels = make_labels((2, 5), seed=2)
    eager = model(h, t, labels)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(h, t, labels)
    out.backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_compiled_function_with_dynamic_shapes():
    f = torch.compile(lambda z, t, l: csd_loss(z, t, l, weighting="SS"), fullgraph=True, dynamic=True)
    for n in (3, 7):
        z, t = make_logits((n, 41), seed=n)
        labels = make_labels((n,), seed=n)
        torch.testing.assert_close(f(z, t, labels), csd_loss(z, t, labels))


def test_version_and_backends():
    assert isinstance(csd_ext.__version__, str) and csd_ext.__version__.count(".") == 2
    backends = csd_ext.compiled_backends()
    assert "cpu" in backends
    assert torch.ops.csd_ext.cpu_kernel_isa() in ("default", "avx2", "avx512")
