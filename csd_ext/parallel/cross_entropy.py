"""Vocab-parallel token cross-entropy, for the CE term of tensor-parallel distillation.

Megatron's formulation: all-reduce the row max (MAX), the sum of exp (SUM) and the
target logit (SUM, from the rank that owns the label).  The backward is local:
softmax minus the one-hot of the label on this rank's columns.
"""

import torch
import torch.distributed as dist


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, ignore_index, group):
        with torch.no_grad():
            x = logits.float()
            rows, width = x.shape
            local_max = x.amax(dim=-1) if width else x.new_full((rows,), float("-inf"))
            row_max = local_max.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            e = torch.exp(x - row_max[:, None])
            sums = e.sum(dim=-1)
            local = labels - vocab_start
            owned = (labels != ignore_index) & (local >= 0) & (local < width)
            idx = torch.where(owned, local, torch.zeros_like(local))
            target = torch.where(owned, x.gather(1, idx[:, None]).squeeze(1) if width else sums * 0, sums * 0)
            both = torch.stack([sums, target])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
            sums, target = both[0], both[1]
            counted = labels != ignore_index
            loss = torch.where(counted, torch.log(sums) + row_max - target, torch.zeros_like(sums))
        ctx.save_for_backward(e, sums, idx, owned, counted)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        e, sums, idx, owned, counted = ctx.saved_tensors
        scale = torch.where(counted, grad_rows, torch.zeros_like(grad_rows))
        grad = e / sums[:, None]
        if grad.shape[1]:
            grad.scatter_add_(1, idx[:, None], -owned.to(grad.dtype)[:, None])
        return (grad * scale[:, None]).to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_shard, labels, vocab_start, *, group=None, ignore_index=-100):
    """Mean next-token CE over positions whose label is not ignore_index (0 if none), from
    logits sharded over the vocabulary: this rank holds columns [vocab_start, vocab_start + V_local)."""
    group = dist.group.WORLD if group is None else group
    width = logits_shard.shape[-1]
    flat_labels = labels.reshape(-1)
    per_row = _VocabParallelCE.apply(logits_shard.reshape(flat_labels.shape[0], width), flat_labels,
                                     int(vocab_start), ignore_index, group)
    return per_row.sum() / (flat_labels != ignore_index).sum().clamp(min=1)
