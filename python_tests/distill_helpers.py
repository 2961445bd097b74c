"""Small builders shared by the csd-distill tests: tokenizers, tiny models, Dolly files."""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
BOS = "<s>"

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n", "Reverse the letters. a b c d e f g h", "Add the two numbers. 1 + 2 = 3",
    "What is the city? name: ana; city: rome", "The quick brown fox jumps over the lazy dog.",
]


def make_tokenizer(vocab_size=320, with_bos=False, corpus=CORPUS):
    """A byte-level BPE as a transformers tokenizer; ``with_bos`` prepends <s> like LLaMA/Gemma do."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, BOS] if with_bos else [EOS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 3, trainer)
    if with_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS, pad_token=EOS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def model_config(family, vocab_size, size="student", **ids):
    """A tiny random config of the GPT-2, LLaMA or Gemma architecture."""
    from transformers import GemmaConfig, GPT2Config, LlamaConfig

    dim, layers = (32, 2) if size == "teacher" else (16, 1)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=dim, n_layer=layers, n_head=2, **ids)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, **ids)
    if family == "gemma":
        return GemmaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                           max_position_embeddings=256, **ids)
    raise ValueError(family)


def save_model(path, family, tokenizer, size="student", extra_vocab=0, seed=0):
    """Random-initialised model + tokenizer saved as an HF directory; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = model_config(family, len(tokenizer) + extra_vocab, size, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_dolly(path, n=12, start=0):
    """n small Dolly records with checkable answers."""
    rows = []
    for i in range(start, start + n):
        if i % 2:
            rows.append({"instruction": "Add the two numbers.", "context": f"{i % 7} + {i % 5}",
                         "response": str(i % 7 + i % 5), "category": "closed_qa"})
        else:
            rows.append({"instruction": "Reverse the letters.", "context": "", "response": "c b a"})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))
    return os.fspath(path)
