"""Custom ops behind :func:`csd_ext.fused_linear_csd`: LM head + CSD, chunk by chunk.

The full [N, V] logits never exist.  Rows (tokens) are processed in chunks;
for each chunk the student logits (and, when the teacher comes as hidden
states, the teacher logits) are computed by a GEMM in fp32 (fp64 for fp64
inputs), fed to the existing kernels torch.ops.csd_ext.csd_forward /
csd_backward, and dropped.

Three ops, all composed of torch ops and our kernels, with fake (meta) rules
so that torch.compile(fullgraph=True) traces them as single nodes:

  fused_linear_csd_reduced  reduction "mean" / "sum" with gradients: each
      chunk's gradient is computed in the forward (the logits are gone by
      backward) and folded into grad_hidden [N, H], grad_weight [V, H] (fp32
      accumulator) and grad_bias [V] (fp32).  The backward only scales these
      by the scalar grad_output; in eager mode it scales the fp32 accumulators
      in place and hands them to AccumulateGrad, so no second [V, H] buffer
      exists (hence such a graph can be backpropagated once only).
  fused_linear_csd_rows     the per-row loss [N] and the row statistics
      [N, 6]; used for reduction "none" and whenever no gradient is needed.
  fused_linear_csd_rows_backward  its backward.  With a per-row grad_output
      g, grad_weight = sum_r g_r dz_r^T h_r does not factor out of a
      precomputed sum, so this recomputes each chunk's logits (one GEMM per
      side; the saved row statistics spare the forward kernel) and runs
      csd_backward with g.  "none" therefore costs one extra logits GEMM.

Chunk size (rows per chunk), when not given: the largest that keeps the
chunk's [rows, V] working buffers within DEFAULT_CHUNK_BUDGET_BYTES, then
evened out over the chunks.  The buffers are the student logits, their
gradient (only when gradients are computed; plus its bf16 copy for a bf16
weight) and the teacher logits (only when computed from teacher hidden
states): V * 4 bytes per row each (8 for fp64, 2 for the bf16 copy).  A floor
of MIN_AUTO_CHUNK_ROWS rows keeps the GEMMs efficient for huge V.

Reduced-precision (bf16/fp16) LM-head weights are never copied whole to fp32:
they are converted WEIGHT_BLOCK_BYTES at a time into one reused buffer for
the fp32 GEMMs (an fp32 copy of a 256k x 2304 head alone would take 2.4 GB).
grad_hidden of a bf16 head is a bf16 GEMM of the bf16-rounded logit gradient,
as autograd computes it for a bf16 nn.Linear.  torch has no bf16 x bf16 -> fp32
GEMM on CPU (mm(out_dtype=) is CUDA-only), which is why the fp32 logits of a
bf16 head cost fp32 GEMMs here.
"""

from typing import Optional

import torch

from . import _ops  # noqa: F401  (registers csd_forward / csd_backward)
from ._ops import NUM_STATS
from ._reduce import reduce_rows

Tensor = torch.Tensor

DEFAULT_CHUNK_BUDGET_BYTES = 64 << 20
MIN_AUTO_CHUNK_ROWS = 16
WEIGHT_BLOCK_BYTES = 8 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a side's logits are computed in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtypes(hidden, teacher_logits, teacher_hidden):
    z = compute_dtype(hidden.dtype)
    t = teacher_logits.dtype if teacher_logits is not None else compute_dtype(teacher_hidden.dtype)
    acc = torch.float64 if torch.float64 in (z, t) else torch.float32
    return z, t, acc


def auto_chunk_rows(rows: int, row_bytes: int, budget: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that the chunk's buffers, `row_bytes` per row, fit in `budget` bytes.

    E.g. V = 50257, fp32 logits and their fp32 gradient: 402 KB per row, 166 rows for 64 MiB.
    """
    cap = max(MIN_AUTO_CHUNK_ROWS, budget // max(1, row_bytes))
    if rows <= cap:
        return max(rows, 1)
    chunks = -(-rows // cap)
    return -(-rows // chunks)  # even chunks: 1000 rows at cap 400 -> 334, 333, 333


class _ComputeWeight:
    """An LM-head weight [V, H] as the fp32 (fp64) GEMMs see it."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype):
        self.weight, self.dtype = weight, dtype
        self.bias = None if bias is None else bias.to(dtype)
        self.same = weight.dtype == dtype
        if not self.same:
            vocab, hid = weight.shape
            self.block_rows = max(1, min(vocab, WEIGHT_BLOCK_BYTES // max(1, hid * 4)))
            self.buf = torch.empty((self.block_rows, hid), dtype=dtype, device=weight.device)

    def _blocks(self):
        """(start, end, weight[start:end] in dtype), converting into the reused buffer."""
        vocab = self.weight.shape[0]
        for j in range(0, vocab, self.block_rows):
            e = min(vocab, j + self.block_rows)
            blk = self.buf[: e - j]
            blk.copy_(self.weight[j:e])
            yield j, e, blk

    def linear(self, x: Tensor, out: Tensor) -> Tensor:
        """out [C, V] = x [C, H] @ weight.T + bias, all in dtype."""
        if self.same:
            if self.bias is None:
                return torch.mm(x, self.weight.t(), out=out)
            return torch.addmm(self.bias, x, self.weight.t(), out=out)
        for j, e, w in self._blocks():
            if self.bias is None:
                torch.mm(x, w.t(), out=out[:, j:e])
            else:
                torch.addmm(self.bias[j:e], x, w.t(), out=out[:, j:e])
        return out

    @property
    def bf16_grad_input(self) -> bool:
        """Whether grad_input runs as a bf16 GEMM (see grad_input)."""
        return self.weight.dtype == torch.bfloat16

    def grad_input(self, dz: Tensor) -> Tensor:
        """dz [C, V] @ weight -> [C, H], in dtype, or in bf16 for a bf16 weight.

        For a bf16 weight the gradient is rounded to bf16 and multiplied with the bf16
        weight as it is, which is what autograd does for a bf16 nn.Linear (its logits'
        gradient is bf16) and is several times faster than converting the weight again;
        the result is returned in bf16 anyway.  fp16 keeps fp32: an fp16 gradient of a
        mean over many tokens would underflow.
        """
        if self.same:
            return torch.mm(dz, self.weight)
        if self.bf16_grad_input:
            return torch.mm(dz.to(torch.bfloat16), self.weight)
        out = dz.new_zeros((dz.shape[0], self.weight.shape[1]))
        for j, e, w in self._blocks():
            out.addmm_(dz[:, j:e], w)
        return out


class _Plan:
    """Flattened inputs, compute dtypes and the chunk size of one call."""

    def __init__(self, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                 teacher_bias, chunk_size, with_grad):
        self.hidden, self.teacher_logits, self.teacher_hidden = hidden, teacher_logits, teacher_hidden
        self.z_dtype, self.t_dtype, self.acc = _dtypes(hidden, teacher_logits, teacher_hidden)
        self.student = _ComputeWeight(weight, bias, self.z_dtype)
        self.teacher = None
        if teacher_logits is None:
            self.teacher = _ComputeWeight(teacher_weight, teacher_bias, self.t_dtype)
        self.rows = hidden.shape[0]
        if chunk_size <= 0:
            chunk_size = auto_chunk_rows(self.rows, self._row_bytes(weight.shape[0], with_grad))
        self.chunk = chunk_size
        # One logits buffer per side, reused by every chunk: allocating a fresh [chunk, V]
        # per chunk makes the heap keep several of them (RSS grows with the churn).
        rows = min(self.chunk, self.rows)
        self.z_buf = hidden.new_empty((rows, weight.shape[0]), dtype=self.z_dtype)
        self.t_buf = None
        if self.teacher is not None:
            self.t_buf = hidden.new_empty((rows, weight.shape[0]), dtype=self.t_dtype)

    def _row_bytes(self, vocab, with_grad):
        """Bytes per chunk row of the [rows, V] buffers alive at once."""
        size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
        per_entry = size(self.z_dtype)  # student logits
        if self.teacher is not None:
            per_entry += size(self.t_dtype)  # teacher logits
        if with_grad:
            per_entry += size(self.z_dtype)  # their gradient (from csd_backward)
            if self.student.bf16_grad_input:
                per_entry += 2  # its bf16 copy for the grad_hidden GEMM
        return vocab * per_entry

    def bounds(self):
        for s in range(0, self.rows, self.chunk):
            yield s, min(self.rows, s + self.chunk)

    def logits(self, s, e):
        """(student hidden chunk in z dtype, student logits, teacher logits) of rows [s, e).

        The logits are views of the reused buffers, valid until the next call."""
        x = self.hidden[s:e].to(self.z_dtype)
        z = self.student.linear(x, self.z_buf[: e - s])
        if self.teacher is None:
            t = self.teacher_logits[s:e]
        else:
            t = self.teacher.linear(self.teacher_hidden[s:e].to(self.t_dtype), self.t_buf[: e - s])
        return x, z, t


class _GradSink:
    """Accumulates grad_hidden (hidden's dtype), grad_weight and grad_bias (fp32/fp64)."""

    def __init__(self, plan, hidden, weight, need_h, need_w, need_b):
        self.plan, self.need = plan, (need_h, need_w, need_b)
        z = plan.z_dtype
        self.hidden = torch.empty_like(hidden) if need_h else hidden.new_empty(0)
        self.weight = weight.new_zeros(weight.shape, dtype=z) if need_w else weight.new_empty(0, dtype=z)
        self.bias = weight.new_zeros(weight.shape[:1], dtype=z) if need_b else weight.new_empty(0, dtype=z)

    def add(self, s, e, x, dz):
        need_h, need_w, need_b = self.need
        if need_w:
            self.weight.addmm_(dz.t(), x)
        if need_b:
            self.bias.add_(dz.sum(0))
        if need_h:
            self.hidden[s:e].copy_(self.plan.student.grad_input(dz))


def _grad_scale(row_mask, rows, reduction, dtype, device):
    """d(reduced loss)/d(row loss), on the device: 1 for "sum", 1/count for "mean"."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if row_mask is None:
        return torch.full((), 1.0 / max(rows, 1), dtype=dtype, device=device)
    return 1.0 / row_mask.sum().clamp(min=1).to(dtype)


@torch.library.custom_op("csd_ext::fused_linear_csd_reduced", mutates_args=())
def fused_linear_csd_reduced(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    row_mask: Optional[Tensor], weighting: str, alpha: float, temperature: float,
    reduction: str, chunk_size: int, need_hidden_grad: bool, need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) of the reduced loss; an unneeded grad is empty."""
    with torch.no_grad():
        plan = _Plan(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                     teacher_bias, chunk_size, with_grad=True)
        sink = _GradSink(plan, hidden, weight, need_hidden_grad, need_weight_grad, need_bias_grad)
        rows_loss = hidden.new_empty((plan.rows,), dtype=plan.acc)
        scale = _grad_scale(row_mask, plan.rows, reduction, plan.acc, hidden.device)
        for s, e in plan.bounds():
            x, z, t = plan.logits(s, e)
            mask = None if row_mask is None else row_mask[s:e]
            loss, stats = torch.ops.csd_ext.csd_forward(z, t, mask, weighting, alpha, temperature)
            rows_loss[s:e] = loss
            # Expanded scalar (stride 0): the kernel reads it in place, no [rows] copy, no host sync.
            dz = torch.ops.csd_ext.csd_backward(scale.expand(e - s), z, t, stats, weighting, alpha, temperature)
            sink.add(s, e, x, dz)
            del dz  # before the next chunk's dz is allocated
        total = reduce_rows(rows_loss, row_mask, (plan.rows,), reduction)
        return total, sink.hidden, sink.weight, sink.bias


def _grads_fake(hidden, weight, z_dtype, need_h, need_w, need_b):
    gh = hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape, dtype=z_dtype) if need_w else weight.new_empty(0, dtype=z_dtype)
    gb = weight.new_empty(weight.shape[:1], dtype=z_dtype) if need_b else weight.new_empty(0, dtype=z_dtype)
    return gh, gw, gb


@fused_linear_csd_reduced.register_fake
def _reduced_fake(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                  row_mask, weighting, alpha, temperature, reduction, chunk_size, need_hidden_grad,
                  need_weight_grad, need_bias_grad):
    z, _t, acc = _dtypes(hidden, teacher_logits, teacher_hidden)
    grads = _grads_fake(hidden, weight, z, need_hidden_grad, need_weight_grad, need_bias_grad)
    return (hidden.new_empty((), dtype=acc), *grads)


def _reduced_setup_context(ctx, inputs, output):
    weight, bias = inputs[1], inputs[2]
    _loss, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(gh, gw, gb)
    # Otherwise autograd hands backward a zero-filled [V, H] "gradient" for the grad outputs.
    ctx.set_materialize_grads(False)
    ctx.consumed = False


def _missing(name):
    return RuntimeError(
        f"fused_linear_csd_reduced was called with need_{name}_grad=False but {name} needs a gradient; "
        f"call it through csd_ext.fused_linear_csd, which sets the flags from requires_grad"
    )


def _plain_eager(t):
    """True outside every tracer (torch.compile, make_fx, fake or functional tensors)."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return False
    return torch._C._len_torch_dispatch_stack() == 0


def _scaled(acc, grad, dtype, in_place):
    """acc * grad in `dtype`, without a second fp32 [V, H] buffer in eager mode."""
    if not _plain_eager(acc):
        # Traced graphs must not mutate saved tensors; the compiler plans its own buffers.
        return (acc * grad).to(dtype)
    if in_place and acc.dtype == dtype:
        # The saved accumulator is scaled in place and handed over: once this node has
        # released it, AccumulateGrad adopts it as .grad without a copy.
        return acc.mul_(grad)
    # mul(out=) into another dtype goes through a full-size temporary: do it in row blocks.
    out = acc.new_empty(acc.shape, dtype=dtype)
    step = max(1, (WEIGHT_BLOCK_BYTES // 4) // max(1, acc[0].numel())) if acc.dim() == 2 else max(1, acc.numel())
    for j in range(0, acc.shape[0], step):
        torch.mul(acc[j : j + step], grad, out=out[j : j + step])
    return out


def _reduced_backward(ctx, grad, _gh, _gw, _gb):
    if ctx.consumed:  # checked before unpacking, which would fail on the version counter
        raise RuntimeError(
            "fused_linear_csd with reduction 'mean' or 'sum' scales its precomputed gradients in "
            "place, so its graph can be backpropagated once only (retain_graph=True is not "
            "supported); use reduction='none' followed by .sum() / .mean() for that"
        )
    ctx.consumed = True
    gh, gw, gb = ctx.saved_tensors
    weight_dtype, bias_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    out = [None] * 16
    # The precomputed grads are those of the reduced loss; grad_output is a scalar.
    if need[0]:
        if gh.dim() != 2:  # not computed: the op returned an empty [0] placeholder
            raise _missing("hidden")
        out[0] = gh * grad
    if need[1]:
        if gw.dim() != 2:
            raise _missing("weight")
        out[1] = _scaled(gw, grad, weight_dtype, in_place=True)
    if need[2]:
        if gb.numel() == 0:  # a bias has V >= 1 entries, so empty means "not computed"
            raise _missing("bias")
        out[2] = _scaled(gb, grad, bias_dtype, in_place=True)
    return tuple(out)


torch.library.register_autograd(
    "csd_ext::fused_linear_csd_reduced", _reduced_backward, setup_context=_reduced_setup_context
)


@torch.library.custom_op("csd_ext::fused_linear_csd_rows", mutates_args=())
def fused_linear_csd_rows(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    row_mask: Optional[Tensor], weighting: str, alpha: float, temperature: float, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """(per-row loss [N], row statistics [N, 6]); 0 loss at masked rows."""
    with torch.no_grad():
        plan = _Plan(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                     teacher_bias, chunk_size, with_grad=False)
        rows_loss = hidden.new_empty((plan.rows,), dtype=plan.acc)
        stats = hidden.new_empty((plan.rows, NUM_STATS), dtype=plan.acc)
        for s, e in plan.bounds():
            _x, z, t = plan.logits(s, e)
            mask = None if row_mask is None else row_mask[s:e]
            rows_loss[s:e], stats[s:e] = torch.ops.csd_ext.csd_forward(z, t, mask, weighting, alpha, temperature)
        return rows_loss, stats


@fused_linear_csd_rows.register_fake
def _rows_fake(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
               row_mask, weighting, alpha, temperature, chunk_size):
    _z, _t, acc = _dtypes(hidden, teacher_logits, teacher_hidden)
    rows = hidden.shape[0]
    return hidden.new_empty((rows,), dtype=acc), hidden.new_empty((rows, NUM_STATS), dtype=acc)


@torch.library.custom_op("csd_ext::fused_linear_csd_rows_backward", mutates_args=())
def fused_linear_csd_rows_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], stats: Tensor,
    weighting: str, alpha: float, temperature: float, chunk_size: int,
    need_hidden_grad: bool, need_weight_grad: bool, need_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) for a per-row grad_output, by recomputing the logits."""
    with torch.no_grad():
        plan = _Plan(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                     teacher_bias, chunk_size, with_grad=True)
        sink = _GradSink(plan, hidden, weight, need_hidden_grad, need_weight_grad, need_bias_grad)
        for s, e in plan.bounds():
            x, z, t = plan.logits(s, e)
            # stats carries each row's weight (0 when masked), so masked rows get zero gradient.
            dz = torch.ops.csd_ext.csd_backward(grad_rows[s:e], z, t, stats[s:e], weighting, alpha, temperature)
            sink.add(s, e, x, dz)
            del dz
        return sink.hidden, sink.weight, sink.bias


@fused_linear_csd_rows_backward.register_fake
def _rows_backward_fake(grad_rows, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                        teacher_bias, stats, weighting, alpha, temperature, chunk_size, need_hidden_grad,
                        need_weight_grad, need_bias_grad):
    z, _t, _acc = _dtypes(hidden, teacher_logits, teacher_hidden)
    return _grads_fake(hidden, weight, z, need_hidden_grad, need_weight_grad, need_bias_grad)


def _rows_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
     _row_mask, weighting, alpha, temperature, chunk_size) = inputs
    _loss, stats = output
    ctx.save_for_backward(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                          teacher_bias, stats)
    ctx.params = (weighting, alpha, temperature, chunk_size)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _rows_backward(ctx, grad_rows, _grad_stats):
    hidden, weight, bias, tl, th, tw, tb, stats = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    out = [None] * 12
    if need_h or need_w or need_b:
        gh, gw, gb = torch.ops.csd_ext.fused_linear_csd_rows_backward(
            grad_rows, hidden, weight, bias, tl, th, tw, tb, stats, *ctx.params, need_h, need_w, need_b
        )
        out[0] = gh if need_h else None
        out[1] = gw.to(weight.dtype) if need_w else None
        out[2] = gb.to(bias.dtype) if need_b else None
    return tuple(out)


torch.library.register_autograd(
    "csd_ext::fused_linear_csd_rows", _rows_backward, setup_context=_rows_setup_context
)
