"""Plain-text language-modelling data for the optional LM loss (``--lm-data``, ``--lm-coef``).

The paper's on-policy runs add next-token CE on OpenWebText with weight 1 to
keep the student a language model.  Accepted files:

- ``*.jsonl``: one JSON object per line with a string ``text`` field;
- anything else: UTF-8 text, documents separated by blank lines.

Documents are tokenised, joined with eos after each, and cut into blocks of
``max_length + 1`` tokens (the last shorter block is kept); each block gives
input = block[:-1], labels = block[1:], every position counted.  This is the
usual packing of pre-training text (as MiniLLM does for OpenWebText).
"""

import os

from .data import DataError, iter_jsonl


def load_lm_texts(path):
    if not os.path.isfile(path):
        raise DataError(f"LM data file {path!r} does not exist")
    texts = []
    if path.endswith(".jsonl"):
        for where, row in iter_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{where}: expected an object with a string 'text' field (plain-text LM data)")
            texts.append(row["text"])
    else:
        with open(path, encoding="utf-8") as f:
            texts = [doc.strip() for doc in f.read().split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"LM data file {path!r} holds no text")
    return texts


def pack_lm_examples(tokenizer, texts, max_length):
    """Blocks of ``max_length + 1`` tokens as training examples (no prompt: every label counts)."""
    stream = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    block = max_length + 1
    items = []
    for start in range(0, len(stream), block):
        chunk = stream[start:start + block]
        if len(chunk) < 2:
            break
        items.append({"input_ids": chunk[:-1], "labels": chunk[1:], "prompt_ids": []})
    return items


def load_lm_data(path, tokenizer, max_length, log=print):
    texts = load_lm_texts(path)
    items = pack_lm_examples(tokenizer, texts, max_length)
    n_tokens = sum(len(it["labels"]) for it in items)
    log(f"LM data {path}: {len(texts)} documents, {n_tokens} tokens in {len(items)} blocks of <= {max_length}")
    return items
