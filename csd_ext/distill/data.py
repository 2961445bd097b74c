"""Instruction data: Dolly JSONL -> prompts -> token ids with response-only labels -> padded batches.

Layout of one training example (MiniLLM/DistiLLM convention)::

    full   = [bos?] prompt_tokens response_tokens eos        (at most max_length + 1 tokens)
    input  = full[:-1]                                        what the model sees
    labels = full[1:], with every position that predicts a prompt token set to -100

so ``labels[i]`` is the token that follows ``input[i]``: the causal shift is
done here, once, and the losses compare logits and labels position by
position (no second shift inside the model).  Batches are padded on the right
with pad = eos, padded labels are -100, attention_mask marks real tokens and
position_ids count 0, 1, 2, ... from the first token, so teacher and student
see identical positions.
"""

import json
import os

import torch

IGNORE_INDEX = -100

# The MiniLLM / DistiLLM prompt format for Dolly (with and without an input).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# MiniLLM's template without its one-sentence preamble: for the CPU demo, where
# the ~30 preamble tokens would be most of every sequence.
COMPACT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
COMPACT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# The CSD paper's GSM8K evaluation prompt (task-specific runs).
QA_PROMPT = "Q: {question}\n\nA:"

# Dolly's field names; MiniLLM's converted files use input/output for context/response.
FIELD_ALIASES = {"context": ("context", "input"), "response": ("response", "output")}


class DataError(ValueError):
    """Bad or unusable training/evaluation data; the message names the file and line."""


def iter_jsonl(path):
    """(where, row) for each non-blank line of a JSONL file, where = "path:line"; a line that is
    not valid JSON is a DataError naming it.  The one JSONL reader of the training, evaluation
    and LM data loaders."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            yield where, row


def load_dolly_jsonl(path):
    """Read Dolly-format JSONL into [{'instruction', 'context', 'response'}].

    ``instruction`` and ``response`` (or MiniLLM's ``output``) are required
    strings; ``context`` (or ``input``) is optional and may be empty.
    """
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    examples = []
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with 'instruction', 'context', 'response', "
                            f"got {type(row).__name__}")
        examples.append(normalise_record(row, where))
    if not examples:
        raise DataError(f"data file {path!r} holds no examples (expected one JSON object per line with "
                        f"'instruction', 'context' and 'response')")
    return examples


def normalise_record(row, where="record"):
    out = {}
    for name, aliases in (("instruction", ("instruction",)), *FIELD_ALIASES.items()):
        present = [a for a in aliases if a in row]
        if not present:
            if name == "context":
                out[name] = ""
                continue
            raise DataError(f"{where}: missing field {name!r}" + (f" (or {aliases[1]!r})" if len(aliases) > 1 else "")
                            + f"; Dolly JSONL needs 'instruction', 'response' and optionally 'context', "
                              f"found keys {sorted(row)}")
        value = row[present[0]]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {present[0]!r} must be a string, got {type(value).__name__}")
        out[name] = value
    return out


def build_prompt(example, template="minillm", tokenizer=None):
    """The prompt text for an example: MiniLLM's template, or the tokenizer's chat template.
    Chat and prompt-completion records (sources.py) bring their own prompt."""
    from .sources import prompt_for

    own = prompt_for(example, template, tokenizer)
    if own is not None:
        return own
    if template in ("minillm", "compact"):
        with_input, no_input = ((PROMPT_WITH_INPUT, PROMPT_NO_INPUT) if template == "minillm"
                                else (COMPACT_WITH_INPUT, COMPACT_NO_INPUT))
        if example["context"]:
            return with_input.format(instruction=example["instruction"], context=example["context"])
        return no_input.format(instruction=example["instruction"])
    if template == "qa":
        question = example["instruction"] + (f"\n{example['context']}" if example["context"] else "")
        return QA_PROMPT.format(question=question)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("prompt_template 'chat' needs a tokenizer with a chat template")
        content = example["instruction"] + (f"\n\n{example['context']}" if example["context"] else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise DataError(f"prompt_template must be 'minillm', 'compact', 'qa' or 'chat', got {template!r}")


def special_prefix(tokenizer, template="minillm"):
    """The special tokens the tokenizer itself puts before text (LLaMA/Gemma: BOS; GPT-2: none).

    A chat template writes its own BOS into the text, so none is added then.
    """
    if template == "chat" or tokenizer.bos_token_id is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [tokenizer.bos_token_id] if ids and ids[0] == tokenizer.bos_token_id else []


def encode_example(tokenizer, prompt, response, *, max_length, max_prompt_length, prefix=(), append_eos=True):
    """Token ids and labels of one example, or None when it must be dropped.

    Dropped (as in MiniLLM): prompts longer than ``max_prompt_length`` tokens,
    and examples with no response token left within ``max_length``.  Long
    responses are truncated to fit ``max_length`` input tokens.
    """
    prompt_ids = list(prefix) + tokenizer.encode(prompt, add_special_tokens=False)
    if len(prompt_ids) > max_prompt_length:
        return None
    # Tokenise prompt + response together, as MiniLLM does, so the boundary
    # merges as it would in running text; fall back when the prompt's tokens
    # are not a prefix of the joint tokenisation.
    full = list(prefix) + tokenizer.encode(prompt + response, add_special_tokens=False)
    if full[: len(prompt_ids)] != prompt_ids:
        full = prompt_ids + tokenizer.encode(response, add_special_tokens=False)
    # A chat turn ends with its own end token (written into ``response``), not eos.
    full = (full + ([tokenizer.eos_token_id] if append_eos else []))[: max_length + 1]
    input_ids = full[:-1]
    labels = full[1:]
    n_prompt_labels = len(prompt_ids) - 1  # label i predicts token i+1: prompt tokens 1..P-1
    labels = [IGNORE_INDEX] * n_prompt_labels + labels[n_prompt_labels:]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return {"input_ids": input_ids, "labels": labels, "prompt_ids": prompt_ids}


def encode_dataset(tokenizer, examples, *, template, max_length, max_prompt_length, what="data", log=print):
    """Encode a list of Dolly records; returns the kept items (each with its text fields)."""
    if not examples:
        raise DataError(f"{what} is empty: nothing to train or evaluate on")
    prefix = special_prefix(tokenizer, template)
    # A chat template covers the whole turn: the response ends with the template's end of
    # turn (Gemma: <end_of_turn>), which then replaces eos.
    turn_end = ""
    if template == "chat":
        from .stops import chat_turn_end

        turn_end = chat_turn_end(tokenizer)
    kept, dropped = [], 0
    for ex in examples:
        prompt = build_prompt(ex, template, tokenizer)
        enc = encode_example(tokenizer, prompt, ex["response"] + turn_end, max_length=max_length,
                             max_prompt_length=max_prompt_length, prefix=prefix, append_eos=not turn_end)
        if enc is None:
            dropped += 1
            continue
        enc.update(prompt=prompt, reference=ex["response"])
        kept.append(enc)
    if dropped:
        log(f"{what}: dropped {dropped} of {len(examples)} examples whose prompt exceeds "
            f"max_prompt_length={max_prompt_length} or leaves no response token within max_length={max_length}")
    if not kept:
        raise DataError(f"{what}: every example was dropped (prompt longer than max_prompt_length="
                        f"{max_prompt_length} tokens, or no room for the response in max_length={max_length})")
    return kept


class Collator:
    """Right-pads a list of encoded examples into model inputs and shifted labels."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        width = max(len(it["input_ids"]) for it in items)
        n = len(items)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            input_ids[i, :k] = torch.tensor(it["input_ids"])
            labels[i, :k] = torch.tensor(it["labels"])
            attention_mask[i, :k] = 1
        # Explicit positions (GPT-2 would otherwise derive them differently from
        # LLaMA/Gemma); right padding keeps real tokens at 0..k-1.
        position_ids = torch.arange(width).expand(n, width).clone()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "labels": labels}


def left_padded_prompts(prompt_ids_list, pad_token_id):
    """Batch of prompts for generation: left padding, so every row's next token is at the end."""
    width = max(len(p) for p in prompt_ids_list)
    n = len(prompt_ids_list)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompt_ids_list):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    return input_ids, attention_mask


def split_holdout(examples, n_holdout):
    """First ``n_holdout`` records for evaluation, the rest for training (MiniLLM's dev split)."""
    if n_holdout >= len(examples):
        raise DataError(f"eval_holdout={n_holdout} leaves no training data out of {len(examples)} examples; "
                        f"lower it or pass eval_data")
    return examples[n_holdout:], examples[:n_holdout]
