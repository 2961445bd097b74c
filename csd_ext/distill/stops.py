"""Where a generated response ends: stop token ids, stop strings, and the chat turn's end.

Chat models end a turn with their own token (Gemma ``<end_of_turn>``, Qwen
``<|im_end|>``, LLaMA-3 ``<|eot_id|>``) that their ``generation_config``
lists next to the tokenizer's eos.  Stopping only at ``tokenizer.eos`` lets
them run to the token limit, so every id in the model's list stops
generation, in evaluation and in on-policy sampling alike.
"""


def stop_token_ids(model, tokenizer):
    """The tokenizer's eos, then every id in ``model.generation_config.eos_token_id`` (int or list)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if extra is not None:
        for i in (extra if isinstance(extra, (list, tuple)) else [extra]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def cut_at_stop_ids(ids, stop_ids, keep_stop=False):
    """``ids`` up to the first stop id (kept with ``keep_stop``)."""
    stops = set(stop_ids)
    for k, t in enumerate(ids):
        if t in stops:
            return list(ids[: k + 1 if keep_stop else k])
    return list(ids)


def cut_at_stop_strings(text, stop_strings):
    """``text`` before the first occurrence of any stop string (GSM8K in the paper: ``"\\n\\n"``)."""
    cut = len(text)
    for s in stop_strings or ():
        k = text.find(s)
        if k != -1:
            cut = min(cut, k)
    return text[:cut]


_MARK = "\u2063RESPONSE\u2063"


def chat_turn_end(tokenizer):
    """What the tokenizer's chat template writes after an assistant message (Gemma: ``<end_of_turn>``).

    Trailing whitespace is dropped: the turn ends at its end token.  Empty when
    the template writes nothing after the message.
    """
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}],
                                         tokenize=False)
    if _MARK not in text:
        return ""
    return text.split(_MARK, 1)[1].rstrip()
