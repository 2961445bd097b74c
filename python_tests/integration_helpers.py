"""Tiny models and token data for the integration tests (nothing downloaded)."""

import torch

VOCAB = 61
SEQ = 12
PAD = 0


def tiny_lm(vocab=VOCAB, size="student", seed=0, family="gpt2"):
    """A random GPT-2 / LLaMA causal LM without dropout (so steps are deterministic)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    dim, layers = (32, 2) if size == "teacher" else (16, 1)
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=dim, n_layer=layers, n_head=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg)


def token_examples(n=8, seq=SEQ, vocab=VOCAB, seed=1):
    """``n`` examples of unequal length, right-padded to ``seq``: labels -100 on a prompt of
    varying length and on the padding; one example has no scored token at all."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 5) % (seq - 3)
        ids = torch.randint(1, vocab, (seq,), generator=g)
        ids[length:] = PAD
        mask = (torch.arange(seq) < length).long()
        labels = ids.clone()
        labels[length:] = -100
        labels[: 1 + i % 3] = -100  # prompt
        if i == 5:
            labels[:] = -100  # nothing to score in this one
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def stack_collator(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def reset_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision, CPU, accumulation); a Trainer
    or Accelerator made by one test would make a later in-process Accelerator with other settings
    fail.  Used as an autouse fixture by the tests that make them."""
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:  # pragma: no cover
        return
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
