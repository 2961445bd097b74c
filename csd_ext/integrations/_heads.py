"""Hidden states before the LM head, without computing the logits; chunked cross-entropy.

``hidden_states_and_head`` runs a causal LM's forward (through whatever wrapper it
has: DDP, PEFT) with a forward pre-hook on its output embedding (``lm_head``) that
records the hidden states the head receives and hands the head an empty slice
instead, so no ``[B, T, V]`` logits are computed.  The recorded tensor is exactly
what the model would have multiplied by ``lm_head.weight`` (after the final norm,
whatever the architecture), which reading ``hidden_states[-1]`` does not guarantee.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def output_head(model):
    """The LM head (``get_output_embeddings()``) of a possibly wrapped model."""
    inner = model
    while True:
        head = getattr(inner, "get_output_embeddings", None)
        if head is not None and head() is not None:
            return head()
        if hasattr(inner, "module"):  # DDP / DataParallel
            inner = inner.module
        elif hasattr(inner, "base_model") and inner.base_model is not inner:
            inner = inner.base_model
        else:
            raise TypeError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None): "
                            "use_fused_linear needs a causal LM with an lm_head")


def hidden_states_and_head(model, inputs):
    """(hidden [B, T, H] as fed to the LM head, head module, model outputs)."""
    head = output_head(model)
    seen = []

    def capture(_module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],)  # the head now computes [B, 0, V]: nothing

    handle = head.register_forward_pre_hook(capture)
    try:
        outputs = model(**inputs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"expected the LM head to run once in the forward pass, it ran {len(seen)} times")
    return seen[0], head, outputs


def _chunk_ce_sum(hidden, weight, bias, labels, ignore_index):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy_sum(hidden, weight, bias, labels, ignore_index=-100, chunk_rows=1024):
    """sum over counted rows of CE(hidden @ weight.T + bias, labels), [chunk_rows, V] logits at a time.

    Each chunk is recomputed in the backward (activation checkpointing), so neither the
    logits nor their gradient ever exist in full.  Logits are upcast to fp32 per chunk.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != ignore_index
    hidden, labels = hidden[keep], labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        h, y = hidden[start:start + chunk_rows], labels[start:start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, h, weight, bias, y, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, weight, bias, y, ignore_index)
    return total
