"""Training/evaluation data from more than Dolly JSONL.

``load_records(path)`` reads:

- a directory written by ``datasets``' ``save_to_disk`` (``load_from_disk``; of a DatasetDict,
  the ``train`` split, or ``path:split`` / ``path::split`` names another one);
- a local ``.jsonl`` file (read line by line, errors name the line; layouts may be mixed), or a
  ``.json``/``.parquet``/``.csv`` file through ``datasets.load_dataset``;

and accepts three record layouts, all normalised to the Dolly record the rest of csd-distill
uses (``instruction``, ``context``, ``response``) plus what ``build_prompt`` needs:

- Dolly: ``instruction``, ``context``/``input`` (optional), ``response``/``output``;
- chat: ``messages``, a list of ``{"role", "content"}`` ending with the assistant's turn, which is
  the response; the prompt is the tokenizer's chat template over the earlier turns;
- prompt-completion: ``prompt`` and ``completion``, either strings (the prompt is used verbatim,
  no template) or TRL's conversational form (``prompt`` a list of messages, ``completion`` a list
  holding the assistant's message).
"""

import json
import os

from .data import DataError, iter_jsonl, load_dolly_jsonl, normalise_record


def _split_path(path):
    for sep in ("::", ":"):
        head, _, split = path.rpartition(sep)
        if head and split and os.path.exists(head) and not os.path.exists(path):
            return head, split
    return path, None


def _is_saved_dataset(path):
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _rows_from_datasets(path, split):
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise DataError(f"reading {path!r} needs the `datasets` package: pip install datasets") from None
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            name = split or "train"
            if name not in ds:
                raise DataError(f"{path!r} is a DatasetDict without a {name!r} split (it has {sorted(ds)}); "
                                f"name one as {path}:SPLIT")
            ds = ds[name]
        return list(ds)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
    if builder is None:
        raise DataError(f"data {path!r}: expected a .jsonl, .json, .parquet or .csv file or a directory saved with "
                        "datasets' save_to_disk")
    return list(datasets.load_dataset(builder, data_files=path, split=split or "train"))


def _first_json_line(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def _check_messages(messages, where, key="messages"):
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{'role': str, 'content': str}} messages")
    return messages


def normalise_any(row, where="record"):
    """A Dolly, chat (``messages``) or prompt-completion record -> the normalised record."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _check_messages(row["messages"], where)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{where}: the last of 'messages' must be the assistant's reply (the response), "
                            "after at least one other turn")
        return _chat_record(messages[:-1], messages[-1]["content"])
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return {"instruction": prompt, "context": "", "response": completion, "prompt_text": prompt}
        if isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt, where, "prompt")
            _check_messages(completion, where, "completion")
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise DataError(f"{where}: a conversational 'completion' must hold exactly one assistant message")
            return _chat_record(prompt, completion[0]["content"])
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages")
    if "instruction" in row:
        return normalise_record(row, where)
    raise DataError(f"{where}: unknown record layout, keys {sorted(row)}; expected Dolly ('instruction', "
                    "'response'), chat ('messages') or prompt-completion ('prompt', 'completion')")


def _chat_record(prompt_messages, response):
    last_user = next((m["content"] for m in reversed(prompt_messages) if m["role"] == "user"), "")
    return {"instruction": last_user, "context": "", "response": response, "messages": prompt_messages}


def load_records(path):
    """The normalised records of ``path`` (see the module docstring)."""
    path, split = _split_path(path)
    if not os.path.exists(path):
        raise DataError(f"data {path!r} does not exist")
    if split is None and os.path.isfile(path) and path.endswith(".jsonl"):
        first = _first_json_line(path)
        if isinstance(first, dict) and "instruction" in first:
            return load_dolly_jsonl(path)  # the original reader, with line numbers in its errors
        return _read_jsonl(path)  # one record per line; layouts may differ from line to line
    rows = _rows_from_datasets(path, split)
    if not rows:
        raise DataError(f"data {path!r} holds no records")
    return [normalise_any(row, f"{path} record {i}") for i, row in enumerate(rows)]


def _read_jsonl(path):
    records = [normalise_any(row, where) for where, row in iter_jsonl(path)]
    if not records:
        raise DataError(f"data {path!r} holds no records")
    return records


def prompt_for(example, template, tokenizer):
    """The prompt of a chat or prompt-completion record, or None for a Dolly record (the template
    applies).  Chat records need the tokenizer's chat template whatever ``template`` says."""
    if "messages" in example:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("chat records ('messages') need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=True)
    if "prompt_text" in example:
        return example["prompt_text"]
    return None
