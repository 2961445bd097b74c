"""The GPU suite (gpu_suite.py) on a real CUDA device.

Without one the module skips with the reason below.  CI has no GPU: there
test_cuda_emulated.py runs the same suite against the CUDA kernels' code on
the CPU, and .ci/cuda_build_check.sh checks that the CUDA build compiles and
links without register spills.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device: test_cuda_emulated.py runs this suite against the CUDA kernels emulated on the CPU, "
        "and .ci/cuda_build_check.sh checks the CUDA build",
        allow_module_level=True,
    )

from gpu_suite import *  # noqa: E402,F401,F403  (the tests)
from gpu_suite import RealGpu  # noqa: E402

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu():
    return RealGpu()
