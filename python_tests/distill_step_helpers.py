"""One csd-distill optimiser step on a tiny GPT-2, shared by test_distill_accumulation.py and
its DeepSpeed worker."""

import torch

from csd_ext.distill.data import Collator
from csd_ext.distill.trainer import distill_loss, model_inputs, token_cross_entropy
from csd_ext.losses import get_loss


def examples(n=8, seed=3, vocab=61):
    """Encoded examples of unequal length with a prompt of ignored labels (Collator's format)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + (i * 7) % 11
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        labels = [-100] * (1 + i % 4) + ids[1 + i % 4:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def models(vocab=61):
    from transformers import GPT2Config, GPT2LMHeadModel

    def make(dim, layers, seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=dim, n_layer=layers, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                          eos_token_id=2, pad_token_id=0))
    return make(16, 1, 0), make(32, 2, 1).eval().requires_grad_(False)


def split(items, micro):
    collate = Collator(0)
    return [collate(items[k:k + micro]) for k in range(0, len(items), micro)]


def step_fns(student, teacher, kd_ratio):
    kd_fn = get_loss("csd", weighting="SS")

    def kd_loss(batch, denominator):
        return distill_loss(student, teacher, batch, kd_fn, kd_ratio, None, denominator)

    def lm_loss(batch, denominator):
        logits = student(**model_inputs(batch), use_cache=False).logits
        tokens = (batch["labels"] != -100).sum().clamp(min=1).to(torch.float32)
        return token_cross_entropy(logits, batch["labels"]) * (tokens / denominator)

    return kd_loss, lm_loss
