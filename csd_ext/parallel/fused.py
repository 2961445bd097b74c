"""`fused_linear_csd(..., vocab_parallel_group=group)`: the fused LM-head + CSD path on a head
split over the vocabulary.  The full logits never exist, on any rank.

Each rank holds the rows [V_local, H] of the student's head (and of the teacher's,
or the teacher's logits shard).  Per chunk of rows:

  1. the local logits, by a GEMM in fp32 (fp64 for fp64 inputs);
  2. their partial row states (_kernel_stats.local_partial_states);
  3. an all-gather of the states, started asynchronously; while it is in flight the
     *next* chunk's GEMM and partial states run (gloo moves the bytes on its own
     threads; NCCL would on its own stream), and only then is this chunk finished:
  4. merge in rank order, global row loss and statistics;
  5. the local logit gradient by csd_backward, folded into grad_weight (local: it is
     this rank's rows of the head's gradient) and grad_hidden (partial: every rank
     holds a term of dz @ W, so it is all-reduced over the group in the backward,
     unless reduce_hidden_grad=False leaves it partial for sequence-parallel callers
     that reduce-scatter it themselves).

With reduction "mean"/"sum" and gradients, step 5 runs in the forward (the chunk's
logits are gone by the backward), so two chunks' logits are alive at once (for the
overlap).  With "none" or without gradients the forward keeps the global row
statistics ([N, 6]) and the backward recomputes each chunk's local logits (one extra
GEMM) to apply the per-row grad_output; that backward needs no collective apart from
the hidden-gradient all-reduce.
"""

import torch
import torch.distributed as dist

from .. import _fused_ops
from .._fused_ops import _ComputeWeight, _dtypes, _grad_scale, auto_chunk_rows
from .._ops import NUM_STATS
from .._reduce import reduce_rows
from .._validate_fused import checked_linear_call
from ._comm import PendingGather, resolve_group
from ._kernel_stats import local_partial_states
from ._moments import needs_of
from .loss import loss_and_stats


class _Chunks:
    """The local logits of chunks of rows, and their partial states."""

    def __init__(self, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, chunk, with_grad, need,
                 temperature):
        self.hidden, self.t_logits, self.t_hidden = hidden, t_logits, t_hidden
        self.z_dtype, self.t_dtype, self.acc = _dtypes(hidden, t_logits, t_hidden)
        self.student = _ComputeWeight(weight, bias, self.z_dtype)
        self.teacher = None if t_logits is not None else _ComputeWeight(t_weight, t_bias, self.t_dtype)
        self.rows, self.vocab = hidden.shape[0], weight.shape[0]
        self.need, self.temperature = need, temperature
        if chunk <= 0:
            # Two chunks are alive at once (overlap), each with logits (+ teacher logits, + gradient).
            per_row = self.vocab * 4 * (2 + (self.teacher is not None) + with_grad)
            chunk = auto_chunk_rows(self.rows, 2 * per_row)
        self.chunk = chunk

    def bounds(self):
        for s in range(0, self.rows, self.chunk):
            yield s, min(self.rows, s + self.chunk)

    def logits(self, s, e):
        x = self.hidden[s:e].to(self.z_dtype)
        z = self.student.linear(x, x.new_empty((e - s, self.vocab)))
        if self.teacher is None:
            t = self.t_logits[s:e]
        else:
            th = self.t_hidden[s:e].to(self.t_dtype)
            t = self.teacher.linear(th, th.new_empty((e - s, self.vocab)))
        return x, z, t

    def states(self, z, t, row_mask):
        return local_partial_states(z, t, row_mask, self.need, self.temperature, self.acc)


def _forward_pass(chunks, row_mask, weighting, alpha, group, on_chunk):
    """Per-row loss [N]; on_chunk(s, e, x, z, t, stats) is called for each finished chunk.

    The all-gather of chunk i is in flight while chunk i+1's GEMM and partial states run.
    """
    need = chunks.need
    rows_loss = chunks.hidden.new_empty((chunks.rows,), dtype=chunks.acc)
    pending = None

    def finish(item):
        s, e, x, z, t, gather = item
        mask = None if row_mask is None else row_mask[s:e]
        loss, stats = loss_and_stats(gather.wait(), need, mask, weighting, alpha)
        rows_loss[s:e] = loss
        on_chunk(s, e, x, z, t, stats)

    for s, e in chunks.bounds():
        x, z, t = chunks.logits(s, e)
        mask = None if row_mask is None else row_mask[s:e]
        gather = PendingGather(chunks.states(z, t, mask), group, async_op=True)
        if pending is not None:
            finish(pending)
        pending = (s, e, x, z, t, gather)
    if pending is not None:
        finish(pending)
    return rows_loss


class _Grads:
    def __init__(self, chunks, hidden, weight, need_h, need_w, need_b):
        z = chunks.z_dtype
        self.chunks, self.need = chunks, (need_h, need_w, need_b)
        self.hidden = torch.zeros_like(hidden) if need_h else None
        self.weight = weight.new_zeros(weight.shape, dtype=z) if need_w else None
        self.bias = weight.new_zeros(weight.shape[:1], dtype=z) if need_b else None

    def add(self, s, e, x, dz):
        if self.weight is not None:
            self.weight.addmm_(dz.t(), x)
        if self.bias is not None:
            self.bias.add_(dz.sum(0))
        if self.hidden is not None:
            self.hidden[s:e] = self.chunks.student.grad_input(dz)


def _hidden_grad(gh, group, reduce_hidden_grad):
    if reduce_hidden_grad:
        dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
    return gh


class _Reduced(torch.autograd.Function):
    """mean/sum with gradients: the gradients are computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, row_mask, weighting, alpha,
                temperature, reduction, chunk, group, reduce_hidden_grad, need):
        with torch.no_grad():
            chunks = _Chunks(hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, chunk, True,
                             needs_of(weighting, alpha), temperature)
            grads = _Grads(chunks, hidden, weight, *need)
            scale = _grad_scale(row_mask, chunks.rows, reduction, chunks.acc, hidden.device)

            def on_chunk(s, e, x, z, t, stats):
                dz = torch.ops.csd_ext.csd_backward(scale.expand(e - s), z, t, stats, weighting, alpha, temperature)
                grads.add(s, e, x, dz)

            rows_loss = _forward_pass(chunks, row_mask, weighting, alpha, group, on_chunk)
            total = reduce_rows(rows_loss, row_mask, (chunks.rows,), reduction)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.group, ctx.reduce_hidden_grad = group, reduce_hidden_grad
        return total

    @staticmethod
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the vocab-parallel fused_linear_csd graph (reduction 'mean'/'sum') can be "
                               "backpropagated once only; use reduction='none' for retain_graph=True")
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        out = [None] * 16
        if grads.hidden is not None:
            out[0] = _hidden_grad((grads.hidden * grad).to(h_dtype), ctx.group, ctx.reduce_hidden_grad)
        if grads.weight is not None:
            out[1] = (grads.weight.mul_(grad)).to(w_dtype)
        if grads.bias is not None:
            out[2] = (grads.bias.mul_(grad)).to(b_dtype)
        return tuple(out)


class _Rows(torch.autograd.Function):
    """Per-row loss; the backward recomputes the local logits and applies grad_output per row."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, row_mask, weighting, alpha,
                temperature, chunk, group, reduce_hidden_grad):
        with torch.no_grad():
            chunks = _Chunks(hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, chunk, False,
                             needs_of(weighting, alpha), temperature)
            all_stats = hidden.new_empty((chunks.rows, NUM_STATS), dtype=chunks.acc)

            def on_chunk(s, e, x, z, t, stats):
                all_stats[s:e] = stats

            rows_loss = _forward_pass(chunks, row_mask, weighting, alpha, group, on_chunk)
        ctx.save_for_backward(hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, all_stats)
        ctx.params = (weighting, alpha, temperature, chunk, group, reduce_hidden_grad)
        return rows_loss

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, tl, th, tw, tb, stats = ctx.saved_tensors
        weighting, alpha, temperature, chunk, group, reduce_hidden_grad = ctx.params
        need = ctx.needs_input_grad[:3]
        out = [None] * 14
        if not any(need):
            return tuple(out)
        with torch.no_grad():
            chunks = _Chunks(hidden, weight, bias, tl, th, tw, tb, chunk, True, needs_of(weighting, alpha),
                             temperature)
            grads = _Grads(chunks, hidden, weight, *need)
            for s, e in chunks.bounds():
                x, z, t = chunks.logits(s, e)
                dz = torch.ops.csd_ext.csd_backward(grad_rows[s:e].to(stats.dtype), z, t, stats[s:e],
                                                    weighting, alpha, temperature)
                grads.add(s, e, x, dz)
        if grads.hidden is not None:
            out[0] = _hidden_grad(grads.hidden, group, reduce_hidden_grad)
        if grads.weight is not None:
            out[1] = grads.weight.to(weight.dtype)
        if grads.bias is not None:
            out[2] = grads.bias.to(bias.dtype)
        return tuple(out)


def vocab_parallel_fused_linear_csd(
    student_hidden, student_weight, teacher_logits=None, labels=None, *, group=None, teacher_hidden=None,
    teacher_weight=None, student_bias=None, teacher_bias=None, weighting="SS", alpha=0.5, temperature=1.0,
    ignore_index=-100, reduction="mean", chunk_size=None, reduce_hidden_grad=True,
):
    """:func:`csd_ext.fused_linear_csd` with the LM heads split over the vocabulary across `group`.

    `student_weight` [V_local, H] (and `student_bias` [V_local]) are this rank's rows of the
    student's head, contiguous and in rank order; the teacher is this rank's logits shard
    [..., V_local] or `teacher_hidden` [..., H_t] with its head's rows `teacher_weight`
    [V_local, H_t].  `student_hidden` and `labels` are the same on every rank.  Returns the
    global loss, bitwise identical on every rank.  grad_weight/grad_bias are local;
    grad_hidden is all-reduced over `group` unless `reduce_hidden_grad=False`.
    Called through ``fused_linear_csd(..., vocab_parallel_group=group)``.
    """
    vocab, alpha, temperature, chunk, lead, hidden, teacher, row_mask = checked_linear_call(
        student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight,
        teacher_bias, labels, weighting, alpha, temperature, ignore_index, reduction, chunk_size)
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {reduce_hidden_grad!r}")
    group = resolve_group(group)
    grad_on = torch.is_grad_enabled()
    need = tuple(grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
    if reduction != "none" and any(need):
        return _Reduced.apply(hidden, student_weight, student_bias, *teacher, row_mask, weighting, alpha,
                              temperature, reduction, chunk, group, reduce_hidden_grad, need)
    per_row = _Rows.apply(hidden, student_weight, student_bias, *teacher, row_mask, weighting, alpha,
                          temperature, chunk, group, reduce_hidden_grad)
    return reduce_rows(per_row, row_mask, lead, reduction)


assert _fused_ops.NUM_STATS == NUM_STATS
