"""Loads the compiled ops and gives them fake (meta) and autograd rules.

The ops themselves are defined in C++ (csrc/csd_ops.cpp, TORCH_LIBRARY):

    csd_ext::csd_forward(student [N,V], teacher [N,V], row_mask [N]?, weighting,
                         alpha, temperature) -> (loss [N], stats [N, 6])
    csd_ext::csd_backward(grad_loss [N], student, teacher, stats, weighting,
                          alpha, temperature) -> grad_student [N,V]

The backward is itself a registered op, so torch.compile traces through the
whole loss without a graph break and the compiled backward calls our kernel.
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

NUM_STATS = 6  # csd::kNumStats in csrc/csd_math.h


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


def compiled_backends() -> tuple:
    """The devices csd_ext was compiled for, e.g. ("cpu",) or ("cpu", "cuda")."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return tuple(
        name for name, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has("csd_ext::csd_forward", key)
    )
