"""Loads a csd_ext library built by CMake and checks its loss against plain torch.

    python tests/cpp/extension_smoke.py path/to/_C.cpython-*.so

Run by ctest (CMakeLists.txt), so the CMake build is known to produce a
library that registers the ops and computes the right numbers, not merely
one that links.  Standalone: it does not import the csd_ext package.
"""

import sys

import torch


def csd_ss(z, t):
    """Per-row CSD with SS weights, tau = 1: 1/2 Var_s(z - t)."""
    s = torch.softmax(z, dim=-1)
    d = z - t
    mean = (s * d).sum(-1, keepdim=True)
    return 0.5 * (s * (d - mean) ** 2).sum(-1)


def main(path):
    torch.ops.load_library(path)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 1001, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(5, 1001, generator=gen, dtype=torch.float64) * 3
    loss, stats = torch.ops.csd_ext.csd_forward(z, t, None, "SS", 0.5, 1.0)
    torch.testing.assert_close(loss, csd_ss(z, t), rtol=1e-10, atol=1e-12)
    assert stats.shape == (5, 8), stats.shape  # csd::kNumStats: each softmax's max and log-sum apart
    grad = torch.ops.csd_ext.csd_backward(torch.ones(5, dtype=torch.float64), z, t, stats, "SS", 0.5, 1.0)
    s = torch.softmax(z, dim=-1)
    d = z - t
    want = s * (d - (s * d).sum(-1, keepdim=True))
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    backends = [k for k in ("CPU", "CUDA") if has("csd_ext::csd_forward", k)]
    print(f"extension_smoke: {path} loaded; backends {backends}; loss and gradient match plain torch")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
