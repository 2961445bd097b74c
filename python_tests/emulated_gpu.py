"""csd_ext's CUDA kernels on the CPU, for the GPU suite in CI (no GPU there).

`load_emulated_ops()` builds tests/cpp/torch_emulated_ops.cpp: torch ops
that run the CUDA kernels' own source under the strict emulation of
tests/cpp/cuda_emulation.h (a fiber per GPU thread, blocks interleaved in a
seeded random order, CUB's reduction order without its result's barrier,
aborts on misaligned vector accesses, the GPU's ``ex2.approx`` error bound
for ``exp_fast``) with the real ops' checks and launchers' host code
(csrc/cuda/csd_cuda_ops.h, csd_cuda_host.h).  The emulation prints its seed
to stderr; CSD_EMU_SEED=<n> replays a schedule.  `EmulatedGpu`
routes csd_ext's ops for CPU tensors to them, as a GPU would run them:

    with EmulatedGpu() as gpu:
        csd_loss(z, t)               # the CUDA kernels, emulated
        with gpu.cpu_kernel():
            csd_loss(z, t)           # the real CPU kernel

What this cannot show: the real compiler's code generation, races between
two synchronisation points, the memory model, and speed.  Those need a GPU
(scripts/gpu_check.sh).
"""

import contextlib
import functools
import hashlib
import os
from pathlib import Path

import pytest
import torch

import csd_ext._ops as csd_ops

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = REPO_ROOT / "tests" / "cpp" / "torch_emulated_ops.cpp"
# The real ops' argument checks, built without the module and the schemas.
CHECKS_SOURCE = REPO_ROOT / "csrc" / "csd_ops.cpp"
H200_SM_COUNT = 132  # the SM count the emulated launches plan for (split rows below 2 x SMs)


def _cpu_has_fma():
    try:
        return " fma " in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def emulation_seed():
    """The seed of the emulation's schedules (block order and interleaving) in
    this process: CSD_EMU_SEED if set, else a random one, put into the
    environment before the emulation's first launch reads it.  The same seed
    with the same command replays the same schedules."""
    if "CSD_EMU_SEED" not in os.environ:
        os.environ["CSD_EMU_SEED"] = str(int.from_bytes(os.urandom(8), "little"))
    return int(os.environ["CSD_EMU_SEED"], 0)


@functools.lru_cache(maxsize=None)
def load_emulated_ops():
    """Builds (once per build directory and source version) and loads the ops
    csd_emulated::forward / backward / forward_grad / backward_reuse_ /
    loss_grad / scale_grad_."""
    from torch.utils.cpp_extension import load

    emulation_seed()
    # nvcc contracts a*b+c into one fused multiply-add.  With -mfma and
    # -ffp-contract=fast (off by default under -std=c++20) GCC does the same,
    # at -O2 (its contraction pass does not run at -O1), so the emulation
    # rounds like the GPU, not like an FMA-free build.
    fma = ["-mfma", "-ffp-contract=fast"] if _cpu_has_fma() else []
    flags = ["-O2", "-pthread", "-DCSD_OPS_CHECKS_ONLY", *fma]
    # CSD_EMULATED_PLANTED_BUG=cluster_reduce builds the kernels with the fused
    # kernel's planted cluster-reduction bug (the suite must then fail).
    if os.environ.get("CSD_EMULATED_PLANTED_BUG") == "cluster_reduce":
        flags.append("-DCSD_PLANTED_BUG_CLUSTER_REDUCE")
    # torch's JIT build notices changes of the .cpp only, and of the flags only
    # within one process; the kernels are in headers.  So the build directory
    # is named after the flags and every header.
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted([SOURCE, CHECKS_SOURCE, *(REPO_ROOT / "csrc").rglob("*.h"),
                        *(REPO_ROOT / "csrc").rglob("*.cuh"), *(REPO_ROOT / "tests" / "cpp").glob("*.h")]):
        digest.update(path.read_bytes())
    root = Path(os.environ.get("CSD_EMULATED_OPS_BUILD", REPO_ROOT / "build" / "emulated_ops"))
    build_dir = root / digest.hexdigest()[:16]
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name="csd_emulated_ops", sources=[str(SOURCE), str(CHECKS_SOURCE)], extra_cflags=flags,
         extra_ldflags=["-pthread"], build_directory=str(build_dir), is_python_module=False, verbose=False)
    return torch.ops.csd_emulated


class EmulatedGpu:
    """Routes csd_ext::csd_forward / csd_backward and the fused pair
    csd_forward_grad / csd_backward_reuse_ on CPU tensors to the emulated
    CUDA kernels (the fused one on an emulated sm_90 GPU), while active.  Not reentrant.  It is also the GPU
    suite's `gpu` (gpu_suite.RealGpu's interface): inputs for the kernels
    under test stay on the CPU."""

    device = torch.device("cpu")
    emulated = True

    def __init__(self, sm_count=H200_SM_COUNT):
        self._sm_count = sm_count
        self._ops = load_emulated_ops()
        self._lib = None
        self._has_fused_kernel = None
        self.launches = 0  # emulated forward and backward calls, so tests can see the routing
        self.calls = {}  # the same, by csd_ext op name

    def _route(self):
        ops = self._ops
        sms = self._sm_count
        lib = torch.library.Library("csd_ext", "IMPL")  # noqa: TOR901 - overrides the CPU kernels while routed

        def forward(student, teacher, row_mask, weighting, alpha, temperature):
            self.launches += 1
            self.calls["forward"] = self.calls.get("forward", 0) + 1
            return ops.forward(student, teacher, row_mask, weighting, alpha, temperature, sms)

        def backward(grad_loss, student, teacher, stats, weighting, alpha, temperature):
            self.launches += 1
            self.calls["backward"] = self.calls.get("backward", 0) + 1
            return ops.backward(grad_loss, student, teacher, stats, weighting, alpha, temperature)

        def forward_grad(student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
            self.launches += 1
            self.calls["forward_grad"] = self.calls.get("forward_grad", 0) + 1
            return ops.forward_grad(student, teacher, row_mask, weighting, alpha, temperature, grad_scale, sms, None)

        def backward_reuse_(grad_loss, student, teacher, stats, grad, weighting, alpha, temperature, grad_scale):
            self.launches += 1
            self.calls["backward_reuse_"] = self.calls.get("backward_reuse_", 0) + 1
            ops.backward_reuse_(grad_loss, student, teacher, stats, grad, weighting, alpha, temperature, grad_scale,
                                None)

        def forward_grad_scaled(student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
            self.launches += 1
            self.calls["forward_grad"] = self.calls.get("forward_grad", 0) + 1
            return ops.forward_grad(student, teacher, row_mask, weighting, alpha, temperature, 1.0, sms, grad_scale)

        def backward_reuse_scaled_(grad_loss, student, teacher, stats, grad, weighting, alpha, temperature,
                                   grad_scale):
            self.launches += 1
            self.calls["backward_reuse_"] = self.calls.get("backward_reuse_", 0) + 1
            ops.backward_reuse_(grad_loss, student, teacher, stats, grad, weighting, alpha, temperature, 1.0,
                                grad_scale)

        def loss_grad(student, teacher, labels, ignore_index, weighting, alpha, temperature, reduction):
            self.launches += 1
            self.calls["loss_grad"] = self.calls.get("loss_grad", 0) + 1
            return ops.loss_grad(student, teacher, labels, ignore_index, weighting, alpha, temperature, reduction,
                                 sms)

        def scale_grad_(grad, grad_output):
            self.launches += 1
            self.calls["scale_grad_"] = self.calls.get("scale_grad_", 0) + 1
            ops.scale_grad_(grad, grad_output)

        with _quiet_override_warning():
            lib.impl("csd_forward", forward, "CPU")
            lib.impl("csd_backward", backward, "CPU")
            lib.impl("csd_forward_grad", forward_grad, "CPU")
            lib.impl("csd_backward_reuse_", backward_reuse_, "CPU")
            lib.impl("csd_forward_grad_scaled", forward_grad_scaled, "CPU")
            lib.impl("csd_backward_reuse_scaled_", backward_reuse_scaled_, "CPU")
            lib.impl("csd_loss_grad", loss_grad, "CPU")
            lib.impl("csd_scale_grad_", scale_grad_, "CPU")
        self._lib = lib
        # Eager training takes the fused pair (csd_forward_grad), as on a GPU:
        # it now reaches the emulated fused kernel.
        self._has_fused_kernel = csd_ops.has_fused_kernel
        csd_ops.has_fused_kernel = lambda device: device.type == "cpu"
        # ... and a reduced loss csd_loss_grad's one launch, as on a GPU.
        self._one_launch_devices = set(csd_ops.ONE_LAUNCH_DEVICES)
        csd_ops.ONE_LAUNCH_DEVICES.add("cpu")

    def _unroute(self):
        csd_ops.ONE_LAUNCH_DEVICES.clear()
        csd_ops.ONE_LAUNCH_DEVICES.update(self._one_launch_devices)
        csd_ops.has_fused_kernel = self._has_fused_kernel
        self._lib._destroy()  # the CPU kernels registered in C++ are current again
        self._lib = None

    def __enter__(self):
        self._route()
        return self

    def __exit__(self, *exc):
        self._unroute()
        return False

    def sm_count(self):
        return self._sm_count

    def require_real(self, why):
        pytest.skip(f"needs a real GPU: {why}")

    @contextlib.contextmanager
    def cpu_kernel(self):
        """The real CPU kernel (and its fused path) inside an emulated section."""
        self._unroute()
        try:
            yield
        finally:
            self._route()


@contextlib.contextmanager
def _quiet_override_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        yield
