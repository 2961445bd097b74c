"""A deterministic synthetic instruction dataset with checkable answers.

Small tasks, each with two phrasings, written as Dolly records
(instruction, context, response):

    last     "What is the last letter?"         "c-a-f-e"                    -> "e"
    first    "What is the first letter?"        "c-a-f-e"                    -> "c"
    copy     "Repeat the letters."              "c-a-f"                      -> "c-a-f"
    lookup   "Fill in the missing value."       "name=ana;city=oslo;city=?"  -> "oslo"
    reverse  "Reverse the letters."             "c-a-f-e"                    -> "e-f-a-c"
    sort     "Sort the letters alphabetically." "d-b-a"                      -> "a-b-d"
    add      "Add the two numbers."             "3+4"                        -> "7"

Letters, digits and values are joined by punctuation, not spaces: GPT-2's
pre-tokenizer then gives every letter (and value) the same token in the
input and in the answer, so the tasks stay learnable by a tiny model.  The
evaluation split never shares a (task, input) with the training split, so
"add" asks for sums of digit pairs never seen in training.
"""

import random

LETTERS = "abcdefghijkl"
FIELDS = {
    "name": ["ana", "bob", "cleo", "dan", "eve", "finn", "gus", "ivy"],
    "city": ["rome", "oslo", "lima", "kyiv", "pune", "nice", "bern", "graz"],
    "color": ["red", "blue", "green", "gold", "pink", "gray", "teal", "tan"],
    "pet": ["cat", "dog", "fish", "frog", "owl", "hen", "yak", "emu"],
}
PHRASES = {
    "reverse": ["Reverse the letters.", "Write the letters in reverse order."],
    "sort": ["Sort the letters alphabetically.", "Put the letters in alphabetical order."],
    "add": ["Add the two numbers.", "What is the sum?"],
    "first": ["What is the first letter?", "Give the first letter."],
    "last": ["What is the last letter?", "Give the last letter."],
    "copy": ["Repeat the letters.", "Copy the letters."],
    "lookup": ["Fill in the missing value.", "What value does the last key have?"],
}
TASK_NAMES = ("reverse", "sort", "add", "lookup", "first", "last", "copy")


def _letters(rng):
    return [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]


def make_example(task, rng):
    """(record, key) for one example; the key identifies it regardless of phrasing."""
    if task == "reverse":
        ls = _letters(rng)
        rec = (rng.choice(PHRASES[task]), "-".join(ls), "-".join(reversed(ls)))
    elif task == "sort":
        ls = _letters(rng)
        rec = (rng.choice(PHRASES[task]), "-".join(ls), "-".join(sorted(ls)))
    elif task in ("first", "last", "copy"):
        ls = _letters(rng)
        answer = {"first": ls[0], "last": ls[-1], "copy": "-".join(ls)}[task]
        rec = (rng.choice(PHRASES[task]), "-".join(ls), answer)
    elif task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rec = (rng.choice(PHRASES[task]), f"{a}+{b}", str(a + b))
    elif task == "lookup":
        names = rng.sample(sorted(FIELDS), 3)
        values = {f: rng.choice(FIELDS[f]) for f in names}
        asked = rng.choice(names)
        # The asked key is repeated at the end of the input, spelled exactly as in the record.
        context = ";".join(f"{f}={values[f]}" for f in names) + f";{asked}=?"
        rec = (rng.choice(PHRASES[task]), context, values[asked])
    else:
        raise ValueError(f"unknown tiny task {task!r}; choose from {', '.join(TASK_NAMES)}")
    instruction, context, response = rec
    key = (task, context)
    return {"instruction": instruction, "context": context, "response": response, "task": task}, key


def make_dataset(n_train, n_eval, tasks=TASK_NAMES, seed=0):
    """(train, eval) lists of records; the same arguments always give the same data.

    Eval examples are unique and disjoint from training; training examples may
    repeat (the add task has only 100 sums).
    """
    tasks = list(tasks)
    for t in tasks:
        if t not in TASK_NAMES:
            raise ValueError(f"unknown tiny task {t!r}; choose from {', '.join(TASK_NAMES)}")
    if not tasks:
        raise ValueError("tiny.tasks is empty: name at least one of " + ", ".join(TASK_NAMES))
    rng = random.Random(seed)
    eval_set, eval_keys = [], set()
    attempts = 0
    while len(eval_set) < n_eval:
        task = tasks[len(eval_set) % len(tasks)]
        rec, key = make_example(task, rng)
        attempts += 1
        if key not in eval_keys:
            eval_keys.add(key)
            eval_set.append(rec)
        if attempts > 100 * (n_eval + 1):
            raise ValueError(f"cannot draw {n_eval} distinct evaluation examples from tasks {tasks}")
    train_set = []
    while len(train_set) < n_train:
        rec, key = make_example(rng.choice(tasks), rng)
        if key not in eval_keys:
            train_set.append(rec)
    return train_set, eval_set
