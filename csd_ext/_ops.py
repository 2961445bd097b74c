"""Loads the compiled ops and gives them fake (meta) and autograd rules.

The ops themselves are defined in C++ (csrc/csd_ops.cpp, TORCH_LIBRARY):

    csd_ext::csd_forward(student [N,V], teacher [N,V], row_mask [N]?, weighting,
                         alpha, temperature) -> (loss [N], stats [N, 6])
    csd_ext::csd_backward(grad_loss [N], student, teacher, stats, weighting,
                          alpha, temperature) -> grad_student [N,V]

The backward is itself a registered op, so torch.compile traces through the
whole loss without a graph break and the compiled backward calls our kernel.

In eager mode, when the student requires grad, csd_loss uses the fused pair
instead (see `fused_csd`):

    csd_ext::csd_forward_grad(..., grad_scale) -> (loss, stats, grad_student)
    csd_ext::csd_backward_reuse_(grad_loss, ..., grad_student(a!), ..., grad_scale)

The forward writes the gradient for grad_loss = grad_scale while each row is
still in cache; the backward hands that tensor over, recomputing in place
only the rows whose grad_loss differs (for a mean or sum backward from 1.0,
none).  This saves re-reading both [N, V] logit tensors in the backward.
"""

import torch

try:
    from . import _C  # noqa: F401  (loading it registers the ops)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "csd_ext's compiled extension (csd_ext._C) is missing or does not match this torch "
        f"({torch.__version__}). Build it against your installed torch with:\n"
        "    pip install --no-build-isolation .\n"
        f"Original error: {exc}"
    ) from exc

# The per-row statistics csd_forward saves for csd_backward: csd::StatsColumn
# in csrc/csd_math.h.  Each softmax's normaliser is kept as its max and its
# log-sum apart: their fp32 sum (one log-sum-exp) would round to the ulp of
# the logits, 2^-10 at 1e4, and scale the row's gradient by up to 4.9e-4.
STATS = {"max_s": 0, "log_sum_s": 1, "max_t": 2, "log_sum_t": 3, "inv_count": 4, "mean1": 5, "mean2": 6,
         "row_weight": 7}
NUM_STATS = len(STATS)  # csd::kNumStats


def accumulate_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """fp64 when either input is fp64, else fp32: the dtype of loss and stats."""
    if torch.float64 in (student.dtype, teacher.dtype):
        return torch.float64
    return torch.float32


@torch.library.register_fake("csd_ext::csd_forward")
def _csd_forward_fake(student, teacher, row_mask, weighting, alpha, temperature):
    acc = accumulate_dtype(student, teacher)
    rows = student.shape[0]
    return student.new_empty((rows,), dtype=acc), student.new_empty((rows, NUM_STATS), dtype=acc)


@torch.library.register_fake("csd_ext::csd_backward")
def _csd_backward_fake(grad_loss, student, teacher, stats, weighting, alpha, temperature):
    return student.new_empty(student.shape)


@torch.library.register_fake("csd_ext::csd_forward_grad")
def _csd_forward_grad_fake(student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
    loss, stats = _csd_forward_fake(student, teacher, row_mask, weighting, alpha, temperature)
    return loss, stats, student.new_empty(student.shape)


@torch.library.register_fake("csd_ext::csd_backward_reuse_")
def _csd_backward_reuse_fake(grad_loss, student, teacher, stats, grad_student, weighting, alpha, temperature,
                             grad_scale):
    return None


def _setup_context(ctx, inputs, output):
    student, teacher, _row_mask, weighting, alpha, temperature = inputs
    _loss, stats = output
    ctx.save_for_backward(student, teacher, stats)
    ctx.params = (weighting, alpha, temperature)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, stats = ctx.saved_tensors
    needs_student, needs_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_student = grad_teacher = None
    if needs_student or needs_teacher:
        grad = torch.ops.csd_ext.csd_backward(grad_loss, student, teacher, stats, *ctx.params)
        if needs_student:
            grad_student = grad
        if needs_teacher:
            # d/dt of the stop-gradient objective is the negative of d/dz.
            grad_teacher = grad.neg().to(teacher.dtype)
    return grad_student, grad_teacher, None, None, None, None


torch.library.register_autograd("csd_ext::csd_forward", _backward, setup_context=_setup_context)


def has_fused_kernel(device: torch.device) -> bool:
    """Whether csd_forward_grad / csd_backward_reuse_ have a kernel for `device`."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return key is not None and has("csd_ext::csd_forward_grad", key) and has("csd_ext::csd_backward_reuse_", key)


class _FusedCSD(torch.autograd.Function):
    """Eager-mode autograd of the fused pair (module docstring).  The
    precomputed gradient is held by ctx and handed over exactly once, so
    autograd can adopt it as .grad without a copy.  A second backward through
    the same graph (retain_graph=True) reruns csd_forward_grad, which gives
    bit-identical results (the first may since have been modified in place
    as .grad)."""

    @staticmethod
    def forward(ctx, student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
        loss, stats, grad = torch.ops.csd_ext.csd_forward_grad(
            student, teacher, row_mask, weighting, alpha, temperature, grad_scale)
        ctx.save_for_backward(student, teacher, row_mask, stats)
        ctx.grad = grad
        ctx.params = (weighting, alpha, temperature)
        ctx.grad_scale = grad_scale
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, row_mask, stats = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            _, stats, grad = torch.ops.csd_ext.csd_forward_grad(student, teacher, row_mask, *ctx.params,
                                                                ctx.grad_scale)
        torch.ops.csd_ext.csd_backward_reuse_(grad_loss, student, teacher, stats, grad, *ctx.params,
                                              ctx.grad_scale)
        grad_student = grad if ctx.needs_input_grad[0] else None
        # d/dt of the stop-gradient objective is the negative of d/dz.
        grad_teacher = grad.neg().to(teacher.dtype) if ctx.needs_input_grad[1] else None
        return grad_student, grad_teacher, None, None, None, None, None


def fused_csd(student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
    """Per-row loss through the fused pair; grad_scale is the grad_loss the
    caller expects for every row (1/count for a mean, 1 for a sum)."""
    return _FusedCSD.apply(student, teacher, row_mask, weighting, alpha, temperature, grad_scale)


def use_fused(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Eager mode, grad enabled, an input that needs it, and a fused kernel
    for the device.  Under torch.compile the op pair is traced instead."""
    return (
        torch.is_grad_enabled()
        and (student.requires_grad or teacher.requires_grad)
        and not torch.compiler.is_compiling()
        and has_fused_kernel(student.device)
    )


def compiled_backends() -> tuple:
    """The devices csd_ext was compiled for, e.g. ("cpu",) or ("cpu", "cuda")."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return tuple(
        name for name, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has("csd_ext::csd_forward", key)
    )
