"""The GPU suite (gpu_suite.py) against the CUDA kernels' own code, run on
the CPU under an emulation of the CUDA execution model (emulated_gpu.py), so
that CI, which has no GPU, checks the kernels' results, their launch paths
(a warp per row, a block per row, split rows) and the suite's own tolerances.

The first run builds the emulated ops (about 20 s).  The emulation's
schedules are random per run; a failing test's report shows the seed
(CSD_EMU_SEED) that replays them.  Tests about the device
itself skip here with the reason; test_cuda.py runs them on a real GPU.
"""

import sys

import pytest

from emulated_gpu import EmulatedGpu, emulation_seed
from gpu_suite import *  # noqa: F401,F403  (the tests)


@pytest.fixture(autouse=True)
def _report_emulation_seed():
    """Every failing test's report shows the seed that replays its schedules
    (blocks and threads interleave in a seeded random order)."""
    seed = emulation_seed()
    sys.stderr.write(f"cuda_emulation: seed {seed}; CSD_EMU_SEED={seed} with the same command replays it\n")


@pytest.fixture(scope="module")
def gpu():
    with EmulatedGpu() as emulated:
        yield emulated
    # The routing ends with this module: later modules get the CPU kernels.
    import torch

    before = emulated.launches
    torch.ops.csd_ext.csd_forward(torch.zeros(1, 3), torch.zeros(1, 3), None, "SS", 0.5, 1.0)
    assert emulated.launches == before, "csd_ext's CPU ops still reach the emulated kernels after the module"


def test_the_suite_reaches_the_emulated_kernels(gpu):
    """csd_loss (forward and backward) goes to the emulated CUDA kernels, and
    gpu.cpu_kernel() to the real CPU kernel, so the suite's CUDA-vs-CPU
    comparisons compare two different kernels."""
    import torch

    from csd_ext import csd_loss
    from csd_testing import make_logits

    z, t = make_logits((3, 5000), seed=2)
    z.requires_grad_(True)
    before = gpu.launches
    csd_loss(z, t).backward()
    assert gpu.launches == before + 2
    with gpu.cpu_kernel():
        csd_loss(z, t).backward()
        torch.ops.csd_ext.csd_forward(z.detach(), t, None, "SS", 0.5, 1.0)
    assert gpu.launches == before + 2
    torch.ops.csd_ext.csd_forward(z.detach(), t, None, "SS", 0.5, 1.0)
    assert gpu.launches == before + 3


def test_eager_training_takes_the_fused_kernel(gpu, monkeypatch):
    """As on an sm_90 GPU: a mean or sum whose student needs a gradient runs
    csd_loss_grad (the fused kernel's single launch, emulated) and
    csd_scale_grad_; reduction="none" runs csd_forward_grad and
    csd_backward_reuse_; CSD_EXT_CUDA_PATH=two_pass gives the same results
    through the two-pass kernels; forward-only calls keep the forward kernel."""
    import torch

    from csd_ext import csd_loss
    from csd_testing import make_logits

    z, t = make_logits((4, 6000), seed=3)
    z = z.to(torch.bfloat16)
    t = t.to(torch.bfloat16)
    labels = torch.tensor([1, -100, 2, 3])
    before = dict(gpu.calls)
    zf = z.clone().requires_grad_(True)
    loss = csd_loss(zf, t, labels, weighting="TS")
    loss.backward()
    assert gpu.calls.get("loss_grad", 0) == before.get("loss_grad", 0) + 1
    assert gpu.calls.get("scale_grad_", 0) == before.get("scale_grad_", 0) + 1
    assert gpu.calls.get("forward_grad", 0) == before.get("forward_grad", 0)
    assert gpu.calls.get("forward", 0) == before.get("forward", 0)
    zn = z.clone().requires_grad_(True)
    csd_loss(zn, t, labels, weighting="TS", reduction="none").sum().backward()
    assert gpu.calls.get("forward_grad", 0) == before.get("forward_grad", 0) + 1
    assert gpu.calls.get("backward_reuse_", 0) == before.get("backward_reuse_", 0) + 1
    torch.testing.assert_close(zn.grad.float(), zf.grad.float() * 3, rtol=2e-2, atol=1e-6)  # mean over 3 rows
    monkeypatch.setenv("CSD_EXT_CUDA_PATH", "two_pass")
    z2 = z.clone().requires_grad_(True)
    loss2 = csd_loss(z2, t, labels, weighting="TS")
    loss2.backward()
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z2.grad.float(), zf.grad.float(), rtol=2e-2, atol=1e-6)
    monkeypatch.setenv("CSD_EXT_CUDA_PATH", "neither")
    with pytest.raises(ValueError, match="CSD_EXT_CUDA_PATH"):
        csd_loss(z.clone().requires_grad_(True), t)
    with torch.no_grad():
        csd_loss(z, t)
    assert gpu.calls.get("forward", 0) == before.get("forward", 0) + 1


def test_the_emulated_ops_reject_what_the_real_ops_reject(gpu):
    """The emulated ops share the real CUDA ops' checks (csrc/cuda/csd_cuda_ops.h
    with csd_ops.cpp's checks): stats that are not the contiguous tensor of the
    accumulation dtype that csd_forward returned are refused, not converted."""
    import torch

    from csd_testing import make_logits

    z, t = make_logits((4, 300), seed=5)
    before = gpu.launches
    _, stats = torch.ops.csd_ext.csd_forward(z, t, None, "TS", 0.5, 1.0)
    assert gpu.launches == before + 1
    g = torch.ones(4)
    for bad in (stats.double(), stats.t().contiguous().t(), stats[:, :-1]):
        with pytest.raises(ValueError, match="stats must be the contiguous"):
            torch.ops.csd_ext.csd_backward(g, z, t, bad, "TS", 0.5, 1.0)
    with pytest.raises(TypeError, match="row_mask must be a bool"):
        torch.ops.csd_ext.csd_forward(z, t, torch.ones(4), "TS", 0.5, 1.0)
    with pytest.raises(ValueError, match="temperature must be"):
        torch.ops.csd_ext.csd_forward(z, t, None, "TS", 0.5, 0.0)
    # Each refusal came from the emulated op itself (the routing counts its calls).
    assert gpu.launches == before + 6
