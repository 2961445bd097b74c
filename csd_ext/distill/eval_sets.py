"""The instruction-following test sets of MiniLLM/DistiLLM (and the CSD paper), read from local JSONL.

The paper reports ROUGE-L on five sets: Dolly (its 500 held-out prompts),
SelfInst (Self-Instruct's 252 user-oriented tasks), Vicuna (80 questions),
S-NI (Super-NaturalInstructions test) and UnNI (Unnatural Instructions).
Nothing is downloaded: point ``--eval-data`` at JSONL files.  Each line is
one JSON object in one of these layouts (the first that fits is used):

==================  ============================================  =====================================
layout              prompt fields                                 reference field
==================  ============================================  =====================================
Dolly / MiniLLM     ``instruction`` + optional ``context``/``input``  ``response`` / ``output``
Self-Instruct       ``instruction`` + ``instances[0].input``      ``instances[0].output``
Vicuna              ``text`` / ``question`` / ``prompt``          ``output`` / ``response`` / ``reference`` / ``answer``
Natural Instr.      ``definition`` / ``Definition`` + ``input``   ``output`` (a string, or a list: the first)
==================  ============================================  =====================================

MiniLLM's processed files (``data/<set>/valid.jsonl``: instruction, input,
output) are the first layout.  Vicuna's questions have no reference of their
own; MiniLLM scores against GPT-4's answers, which its file stores as
``output``.  A line that fits no layout is an error naming the file, the line
and the keys it found.
"""

import os

from .data import DataError, iter_jsonl

KNOWN_SETS = ("dolly", "selfinst", "vicuna", "sni", "unni")


def _first(value):
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _pick(row, names):
    for n in names:
        if n in row and _first(row[n]) is not None:
            return _first(row[n])
    return None


def eval_record(row, where="record"):
    """One JSON object of any supported layout -> {'instruction', 'context', 'response'}."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    instances = row.get("instances")
    if "instruction" in row and isinstance(instances, list) and instances and isinstance(instances[0], dict):
        inst = instances[0]  # Self-Instruct's user-oriented tasks: one instance each
        instruction, context, response = row["instruction"], inst.get("input", ""), _first(inst.get("output"))
    elif "instruction" in row:
        instruction = row["instruction"]
        context = _pick(row, ("context", "input")) or ""
        response = _pick(row, ("response", "output"))
    elif any(k in row for k in ("definition", "Definition")):
        instruction = _pick(row, ("definition", "Definition"))
        context = _pick(row, ("input", "context")) or ""
        response = _pick(row, ("output", "response"))
    elif any(k in row for k in ("text", "question", "prompt")):
        instruction = _pick(row, ("text", "question", "prompt"))
        context = ""
        response = _pick(row, ("output", "response", "reference", "answer"))
    else:
        raise DataError(f"{where}: no prompt field: expected 'instruction', 'definition' or 'text'/'question'/"
                        f"'prompt' (see csd_ext/distill/eval_sets.py), found keys {sorted(row)}")
    if response is None:
        raise DataError(f"{where}: no reference answer ('response', 'output', 'reference' or 'answer'); "
                        f"ROUGE-L needs one. Found keys {sorted(row)}")
    for name, value in (("instruction", instruction), ("context", context), ("response", response)):
        if not isinstance(value, str):
            raise DataError(f"{where}: the {name} must be a string, got {type(value).__name__}")
    return {"instruction": instruction, "context": context, "response": response}


def load_eval_set(path):
    """(set name, records) from a JSONL file; the name is the file's stem (its directory's
    name for MiniLLM's ``<set>/valid.jsonl``)."""
    if not os.path.isfile(path):
        raise DataError(f"evaluation set {path!r} does not exist")
    records = [eval_record(row, where) for where, row in iter_jsonl(path)]
    if not records:
        raise DataError(f"evaluation set {path!r} holds no examples")
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in ("valid", "test", "eval", "data") and os.path.basename(os.path.dirname(os.path.abspath(path))):
        stem = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return stem, records
