"""Sparse CSD straight from hidden states: `fused_linear_sparse_csd`.

With a teacher known on K ids per token, the loss needs only K student logits
per token: ``z[n, k] = hidden[n] . weight[ids[n, k]] (+ bias[ids[n, k]])``.
Rows are processed in chunks; each chunk gathers the K rows of the LM head
its tokens need (``[n, K, H]``), computes the K logits in fp32 (fp64 for fp64
inputs), and runs the CSD kernel on ``[n, K]``.  The forward keeps each
token's gradient with respect to its K logits (``[N, K]``, small); the
backward gathers the head rows again, chunk by chunk, and scatters the
gradient into ``weight`` (``index_add_``) and ``hidden``.  Nothing of size
``[N, V]`` is built; the working set is one chunk's ``[n, K, H]`` gather.
"""

import torch

from ._validate import check_loss_options
from ._validate_fused import check_chunk_size, check_labels_for_hidden, check_linear
from ._reduce import reduce_rows, row_mask_of
from .loss import csd_loss
from .sparse import check_ids_values, check_sparse_teacher

# Bytes of one chunk's gathered head rows ([n, K, H] in fp32) that the default chunk size aims at.
DEFAULT_GATHER_BUDGET_BYTES = 64 << 20


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_rows(chunk, k, h, n):
    if chunk:  # 0: automatic (check_chunk_size's encoding of None)
        return chunk
    return max(1, min(n, DEFAULT_GATHER_BUDGET_BYTES // max(1, k * h * 4)))


def _chunk_logits(hidden_c, weight, bias, ids_c, acc):
    """The K logits of each token of a chunk, in ``acc`` precision."""
    w = weight[ids_c].to(acc)                                   # [n, K, H]
    z = torch.bmm(w, hidden_c.to(acc).unsqueeze(-1)).squeeze(-1)  # [n, K]
    if bias is not None:
        z = z + bias[ids_c].to(acc)
    return z, w


class _FusedLinearSparseCSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, values, row_mask, weighting, alpha, temperature, chunk):
        n_rows, acc = hidden.shape[0], _acc_dtype(hidden)
        chunk = _chunk_rows(chunk, ids.shape[-1], hidden.shape[-1], n_rows)
        valid = ids >= 0
        safe_ids = ids.clamp(min=0)
        teacher = values.masked_fill(~valid, float("-inf"))
        per_row = hidden.new_zeros(n_rows, dtype=acc)
        grads = hidden.new_zeros(ids.shape, dtype=acc)
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            z, _ = _chunk_logits(hidden[r0:r1], weight, bias, safe_ids[r0:r1], acc)
            labels = None if row_mask is None else torch.where(row_mask[r0:r1], 0, -100)
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                rows = csd_loss(z, teacher[r0:r1], labels, weighting=weighting, alpha=alpha,
                                temperature=temperature, reduction="none")
                # Rows are independent: the gradient of their sum is each row's own gradient.
                (g,) = torch.autograd.grad(rows.sum(), z)
            per_row[r0:r1] = rows.detach()
            grads[r0:r1] = g
        ctx.save_for_backward(hidden, weight, bias, safe_ids, grads)
        ctx.chunk = chunk
        return per_row

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, safe_ids, grads = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = grads.dtype
        g_all = grads * grad_rows.to(acc).unsqueeze(-1)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for r0 in range(0, hidden.shape[0], ctx.chunk):
            r1 = min(r0 + ctx.chunk, hidden.shape[0])
            g, ids_c = g_all[r0:r1], safe_ids[r0:r1]
            if need_h:
                w = weight[ids_c].to(acc)
                grad_h[r0:r1] = torch.bmm(g.unsqueeze(1), w).squeeze(1).to(hidden.dtype)
            if need_w:
                # Padding and masked entries have g = 0: they add nothing to row 0.
                outer = g.unsqueeze(-1) * hidden[r0:r1].to(acc).unsqueeze(1)    # [n, K, H]
                grad_w.index_add_(0, ids_c.reshape(-1), outer.reshape(-1, hidden.shape[-1]))
            if need_b:
                grad_b.index_add_(0, ids_c.reshape(-1), g.reshape(-1))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None, None)


def fused_linear_sparse_csd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor = None,
    *,
    student_bias: torch.Tensor = None,
    weighting: str = "SS",
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """:func:`csd_ext.sparse_csd_loss` of ``student_hidden @ student_weight.T + student_bias``,
    computing only the ``K`` student logits each token needs.

    Same value and gradients as ``sparse_csd_loss(F.linear(student_hidden, student_weight,
    student_bias), teacher_ids, teacher_values, labels, ...)``, except that the logits
    are computed in fp32 (fp64 for fp64 inputs) and never rounded to bf16/fp16.

    Args:
        student_hidden: ``[..., H]``; student_weight: ``[V, H]``; student_bias: optional ``[V]``.
        teacher_ids, teacher_values: ``[..., K]`` as in :func:`csd_ext.sparse_csd_loss`
            (int64 ids, -1 padding).
        labels, weighting, alpha, temperature, ignore_index, reduction, check_ids: as in
            :func:`csd_ext.sparse_csd_loss`.
        chunk_size: tokens per chunk; ``None`` picks it so that one chunk's gathered head
            rows (``[chunk, K, H]`` in fp32) take about 64 MiB.

    Memory: ``[N, K]`` saved gradients plus one chunk's ``[chunk, K, H]`` gather (and, in the
    backward, a ``[V, H]`` fp32 weight gradient), never ``[N, V]``.  Work: ``2 N K H`` for the
    logits and ``4 N K H`` in the backward, against ``6 N V H`` for the unfused path.
    A plain autograd.Function (not a torch.library op): usable inside torch.compile'd code, but
    not made for ``fullgraph=True``.
    """
    vocab = check_linear("student", student_hidden, student_weight, student_bias)
    check_sparse_teacher(student_hidden.shape[:-1], student_hidden.device, teacher_ids, teacher_values,
                         what="student_hidden")
    check_labels_for_hidden(labels, student_hidden)
    alpha, temperature = check_loss_options(weighting, alpha, temperature, ignore_index, reduction)
    chunk = check_chunk_size(chunk_size)
    if check_ids:
        check_ids_values(teacher_ids, vocab)
    lead = student_hidden.shape[:-1]
    k = teacher_ids.shape[-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    row_mask = row_mask_of(labels, ignore_index)
    per_row = _FusedLinearSparseCSD.apply(hidden, student_weight, student_bias, teacher_ids.reshape(-1, k),
                                          teacher_values.reshape(-1, k), row_mask, weighting, alpha,
                                          temperature, chunk)
    return reduce_rows(per_row, row_mask, lead, reduction)
