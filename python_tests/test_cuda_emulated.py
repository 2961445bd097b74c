"""The GPU suite (gpu_suite.py) against the CUDA kernels' own code, run on
the CPU under an emulation of the CUDA execution model (emulated_gpu.py), so
that CI, which has no GPU, checks the kernels' results, their launch paths
(a warp per row, a block per row, split rows) and the suite's own tolerances.

The first run builds the emulated ops (about 20 s).  Tests about the device
itself skip here with the reason; test_cuda.py runs them on a real GPU.
"""

import pytest

from emulated_gpu import EmulatedGpu
from gpu_suite import *  # noqa: F401,F403  (the tests)


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
