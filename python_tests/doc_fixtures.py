"""The names every ```python block of README.md and docs/*.md starts with (test_docs_run.py).

Small and CPU-only: building all of them takes about a second.  Blocks may use any of them
without defining them; blocks that need something else define it themselves (or in a hidden
``<!-- doc-test: setup ... -->`` prelude, see test_docs_run.py).
"""

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_gpt2(vocab, dim, layers, seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=dim, n_layer=layers, n_head=2,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def doc_namespace(tmp_dir):
    """A fresh namespace: see FIXTURES for what each name is."""
    from distill_helpers import make_tokenizer

    tokenizer = make_tokenizer(vocab_size=300)
    tokenizer.chat_template = CHAT_TEMPLATE
    vocab = len(tokenizer)
    student = tiny_gpt2(vocab, 16, 1, seed=0)
    teacher = tiny_gpt2(vocab, 32, 2, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    input_ids[1, 9:] = tokenizer.pad_token_id
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    ns = {"torch": torch, "student": student, "model": student, "teacher": teacher, "tokenizer": tokenizer,
          "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "tmp_dir": str(tmp_dir)}
    ns.update(_datasets(tokenizer, vocab))
    return ns


def _datasets(tokenizer, vocab):
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return {}
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(8):
        ids = torch.randint(1, vocab, (10,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 10, "labels": [-100] * (2 + i % 3) + ids[2 + i % 3:]})
    chat = [{"messages": [{"role": "user", "content": f"Add the two numbers. {i} + {i + 1}"},
                          {"role": "assistant", "content": str(2 * i + 1)}]} for i in range(8)]
    return {"dataset": datasets.Dataset.from_list(rows), "chat_dataset": datasets.Dataset.from_list(chat)}


FIXTURES = {
    "torch": "the torch module",
    "student, model": "the same tiny GPT-2 causal LM (1 layer, d=16), untrained, no dropout",
    "teacher": "a tiny GPT-2 (2 layers, d=32) with the same vocabulary, in eval mode",
    "tokenizer": "a byte-level BPE tokenizer (PreTrainedTokenizerFast) with a chat template; len(tokenizer) is "
                 "the models' vocabulary",
    "input_ids, attention_mask": "[2, 12] int64; row 1 is right-padded after 9 tokens",
    "labels": "[2, 12], HF convention (unshifted): input_ids with -100 on a 3-token prompt and the padding",
    "dataset": "datasets.Dataset of 8 tokenised rows: input_ids, attention_mask, labels (-100 on the prompt)",
    "chat_dataset": "datasets.Dataset of 8 rows with a `messages` list (user, assistant)",
    "tmp_dir": "a fresh temporary directory (also the working directory)",
}
