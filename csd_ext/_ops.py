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

On CUDA, for a "mean" or "sum" reduction, eager training goes one step
further (`fused_csd_loss`):

    csd_ext::csd_loss_grad(student, teacher, labels?, ignore_index, ..., reduction)
        -> (loss [], grad_student)
    csd_ext::csd_scale_grad_(grad_student(a!), grad_output [])

The forward is ONE kernel launch (the fused kernel reads the labels, counts
them for a mean, writes the gradient for a backward of 1.0 and reduces the
per-row losses to the scalar, deterministically); the backward scales that
gradient by grad_output on the device (one launch, which reads nothing when
grad_output is exactly 1).
"""

import torch

from ._torch_support import check_torch

check_torch()  # a clear message for an unsupported or mismatched torch, before _C fails to load

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


@torch.library.register_fake("csd_ext::csd_forward_grad_scaled")
def _csd_forward_grad_scaled_fake(student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
    return _csd_forward_grad_fake(student, teacher, row_mask, weighting, alpha, temperature, 1.0)


@torch.library.register_fake("csd_ext::csd_backward_reuse_scaled_")
def _csd_backward_reuse_scaled_fake(grad_loss, student, teacher, stats, grad_student, weighting, alpha,
                                    temperature, grad_scale):
    return None


@torch.library.register_fake("csd_ext::csd_loss_grad")
def _csd_loss_grad_fake(student, teacher, labels, ignore_index, weighting, alpha, temperature, reduction):
    return student.new_empty((), dtype=accumulate_dtype(student, teacher)), student.new_empty(student.shape)


@torch.library.register_fake("csd_ext::csd_scale_grad_")
def _csd_scale_grad_fake(grad_student, grad_output):
    return None


# The *_scaled ops take grad_scale as a one-element tensor (1 / the valid-token
# count of a mean, computed on the device), so CUDA never syncs with the host.
# On the CPU reading it costs nothing: they run the float ops.
@torch.library.impl("csd_ext::csd_forward_grad_scaled", "cpu")
def _csd_forward_grad_scaled_cpu(student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
    return torch.ops.csd_ext.csd_forward_grad(student, teacher, row_mask, weighting, alpha, temperature,
                                              float(grad_scale))


@torch.library.impl("csd_ext::csd_backward_reuse_scaled_", "cpu")
def _csd_backward_reuse_scaled_cpu(grad_loss, student, teacher, stats, grad_student, weighting, alpha,
                                   temperature, grad_scale):
    torch.ops.csd_ext.csd_backward_reuse_(grad_loss, student, teacher, stats, grad_student, weighting, alpha,
                                          temperature, float(grad_scale))


def mean_scale(row_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(count, 1) of a row mask, on its device, as `reduce_rows` divides
    a mean (the same expression, so the value is bit-identical to the
    grad_loss autograd hands back, and csd_backward_reuse_scaled_ skips every
    counted row)."""
    return (torch.ones((), dtype=dtype, device=row_mask.device) / row_mask.sum().clamp(min=1)).to(dtype)


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


def _has_kernels(device: torch.device, ops) -> bool:
    """Whether every csd_ext op in `ops` has a kernel for `device`."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return key is not None and all(has("csd_ext::" + op, key) for op in ops)


def has_fused_kernel(device: torch.device) -> bool:
    """Whether csd_forward_grad / csd_backward_reuse_ have a kernel for `device`."""
    return _has_kernels(device, ("csd_forward_grad", "csd_backward_reuse_", "csd_forward_grad_scaled",
                                 "csd_backward_reuse_scaled_"))


def _hand_over(ctx, grad, teacher):
    """The backward's (student, teacher) gradients from the student's gradient
    ``grad``: d/dt of the stop-gradient objective is the negative of d/dz."""
    grad_student = grad if ctx.needs_input_grad[0] else None
    grad_teacher = grad.neg().to(teacher.dtype) if ctx.needs_input_grad[1] else None
    return grad_student, grad_teacher


class _FusedCSD(torch.autograd.Function):
    """Eager-mode autograd of the fused pair (module docstring).  The
    precomputed gradient is held by ctx and handed over exactly once, so
    autograd can adopt it as .grad without a copy.  A second backward through
    the same graph (retain_graph=True) reruns csd_forward_grad, which gives
    bit-identical results (the first may since have been modified in place
    as .grad)."""

    @staticmethod
    def forward(ctx, student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
        loss, stats, grad = _forward_grad(student, teacher, row_mask, weighting, alpha, temperature, grad_scale)
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
            _, stats, grad = _forward_grad(student, teacher, row_mask, *ctx.params, ctx.grad_scale)
        _backward_reuse(grad_loss, student, teacher, stats, grad, *ctx.params, ctx.grad_scale)
        return (*_hand_over(ctx, grad, teacher), None, None, None, None, None)


def _forward_grad(student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
    if isinstance(grad_scale, torch.Tensor):
        return torch.ops.csd_ext.csd_forward_grad_scaled(student, teacher, row_mask, weighting, alpha, temperature,
                                                         grad_scale)
    return torch.ops.csd_ext.csd_forward_grad(student, teacher, row_mask, weighting, alpha, temperature, grad_scale)


def _backward_reuse(grad_loss, student, teacher, stats, grad, weighting, alpha, temperature, grad_scale):
    if isinstance(grad_scale, torch.Tensor):
        torch.ops.csd_ext.csd_backward_reuse_scaled_(grad_loss, student, teacher, stats, grad, weighting, alpha,
                                                     temperature, grad_scale)
    else:
        torch.ops.csd_ext.csd_backward_reuse_(grad_loss, student, teacher, stats, grad, weighting, alpha,
                                              temperature, grad_scale)


def fused_csd(student, teacher, row_mask, weighting, alpha, temperature, grad_scale):
    """Per-row loss through the fused pair; grad_scale is the grad_loss the
    caller expects for every row (1/count for a mean, 1 for a sum): a float,
    or a one-element tensor on the device (mean_scale: no host sync)."""
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


# Devices whose torch.compile graphs use csd_forward_grad when the student
# needs a gradient (see `use_fused_compiled`).  On the CPU the compiled graph
# keeps the op pair: its fused kernel gains little there, and the CPU tests
# pin that behaviour; tests put "cpu" in here to trace the fused graph.
COMPILED_FUSED_DEVICES = {"cuda"}

# has_fused_kernel per device type, queried once at import (dynamo cannot
# trace the dispatcher query; the registrations are complete once _C loads).
_FUSED_KERNEL_AT_IMPORT = {name: has_fused_kernel(torch.device(name)) for name in ("cpu", "cuda")}


def _forward_grad_setup_context(ctx, inputs, output):
    student, teacher, _row_mask, weighting, alpha, temperature, grad_scale = inputs
    _loss, stats, grad = output
    scaled = isinstance(grad_scale, torch.Tensor)
    ctx.save_for_backward(student, teacher, stats, grad, grad_scale if scaled else None)
    ctx.params = (weighting, alpha, temperature)
    ctx.grad_scale = None if scaled else grad_scale
    ctx.mark_non_differentiable(stats, grad)


def _forward_grad_backward(ctx, grad_loss, _grad_stats, _grad_grad):
    """The compiled graph's backward of csd_forward_grad: the gradient the
    forward wrote is for grad_loss = grad_scale; csd_backward_reuse_
    recomputes (in place, on the device) only the rows whose grad_loss
    differs, so a mean or sum backward reads nothing.  In a compiled graph the
    saved gradient is an intermediate with no other use, so the functionalised
    in-place op can run in place.  Eager mode uses _FusedCSD instead (it hands
    the tensor over once, so this rule, which reuses a saved output, is not
    meant for retain_graph double backwards in eager mode)."""
    student, teacher, stats, grad, scale = ctx.saved_tensors
    needs_student, needs_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (needs_student or needs_teacher):
        return None, None, None, None, None, None, None
    _backward_reuse(grad_loss, student, teacher, stats, grad, *ctx.params,
                    scale if scale is not None else ctx.grad_scale)
    grad_student = grad if needs_student else None
    # d/dt of the stop-gradient objective is the negative of d/dz.
    grad_teacher = grad.neg().to(teacher.dtype) if needs_teacher else None
    return grad_student, grad_teacher, None, None, None, None, None


torch.library.register_autograd("csd_ext::csd_forward_grad", _forward_grad_backward,
                                setup_context=_forward_grad_setup_context)
torch.library.register_autograd("csd_ext::csd_forward_grad_scaled", _forward_grad_backward,
                                setup_context=_forward_grad_setup_context)


def _loss_grad_setup_context(ctx, inputs, output):
    _loss, grad = output
    ctx.save_for_backward(grad)
    ctx.teacher_dtype = inputs[1].dtype
    ctx.mark_non_differentiable(grad)


def _loss_grad_backward(ctx, grad_output, _grad_grad):
    """csd_loss_grad's registered backward (a direct call of the op, or a
    compiled graph): its gradient is for a backward of 1.0, so grad_output
    scales it, in place (the saved output has no other use there; eager
    csd_loss uses _FusedCSDLoss, which hands the tensor over once)."""
    (grad,) = ctx.saved_tensors
    needs_student, needs_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (needs_student or needs_teacher):
        return (None,) * 8
    torch.ops.csd_ext.csd_scale_grad_(grad, grad_output)
    grad_student = grad if needs_student else None
    # d/dt of the stop-gradient objective is the negative of d/dz.
    grad_teacher = grad.neg().to(ctx.teacher_dtype) if needs_teacher else None
    return grad_student, grad_teacher, None, None, None, None, None, None


torch.library.register_autograd("csd_ext::csd_loss_grad", _loss_grad_backward,
                                setup_context=_loss_grad_setup_context)


class _FusedCSDLoss(torch.autograd.Function):
    """Eager autograd of csd_loss_grad: the gradient (for a backward of 1.0)
    is held by ctx and handed over exactly once, scaled in place by
    grad_output (csd_scale_grad_: nothing is read when grad_output is 1).  A
    second backward (retain_graph=True) reruns csd_loss_grad, which gives
    bit-identical results."""

    @staticmethod
    def forward(ctx, student, teacher, labels, ignore_index, weighting, alpha, temperature, reduction):
        loss, grad = torch.ops.csd_ext.csd_loss_grad(student, teacher, labels, ignore_index, weighting, alpha,
                                                     temperature, reduction)
        ctx.save_for_backward(student, teacher, labels)
        ctx.grad = grad
        ctx.params = (ignore_index, weighting, alpha, temperature, reduction)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, labels = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            _, grad = torch.ops.csd_ext.csd_loss_grad(student, teacher, labels, *ctx.params)
        torch.ops.csd_ext.csd_scale_grad_(grad, grad_output)
        return (*_hand_over(ctx, grad, teacher), None, None, None, None, None, None)


def fused_csd_loss(student, teacher, labels, ignore_index, weighting, alpha, temperature, reduction):
    """The reduced ("mean" or "sum") loss through csd_loss_grad: one launch
    forward, one backward.  labels: flat [N] integers or None."""
    return _FusedCSDLoss.apply(student, teacher, labels, ignore_index, weighting, alpha, temperature, reduction)


# Devices whose eager training path of a reduced loss is csd_loss_grad (see
# `use_one_launch`).  On the CPU the op pair + reduce_rows stays the eager
# path (the CPU op is a composition of exactly those); the emulated GPU
# suite puts "cpu" in here to reach the emulated CUDA kernel.
ONE_LAUNCH_DEVICES = {"cuda"}


def has_one_launch_kernel(device: torch.device) -> bool:
    """Whether csd_loss_grad / csd_scale_grad_ have a kernel for `device`."""
    return _has_kernels(device, ("csd_loss_grad", "csd_scale_grad_"))


def use_one_launch(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> bool:
    """Eager training of a "mean" or "sum" loss on a device in
    ONE_LAUNCH_DEVICES: csd_loss calls csd_loss_grad (one launch)."""
    return (
        reduction != "none"
        and student.device.type in ONE_LAUNCH_DEVICES
        and use_fused(student, teacher)
        and has_one_launch_kernel(student.device)
    )


def use_fused_compiled(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Under torch.compile, with grad enabled and an input that needs it, on
    a device in COMPILED_FUSED_DEVICES with a fused kernel: the traced graph
    calls csd_forward_grad (one kernel: z and t read once, g written once)
    instead of the csd_forward / csd_backward pair."""
    return (
        torch.compiler.is_compiling()
        and torch.is_grad_enabled()
        and (student.requires_grad or teacher.requires_grad)
        and student.device.type in COMPILED_FUSED_DEVICES
        and _FUSED_KERNEL_AT_IMPORT.get(student.device.type, False)
    )


def compiled_backends() -> tuple:
    """The devices csd_ext was compiled for, e.g. ("cpu",) or ("cpu", "cuda")."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return tuple(
        name for name, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has("csd_ext::csd_forward", key)
    )
