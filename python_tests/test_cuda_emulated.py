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
