"""Tiny teacher/student pairs and data on disk for the scale tests (on-policy, DDP, resume).

Everything is made here from configs: a few dozen synthetic Dolly records,
a byte-level BPE trained on them, and randomly initialised one-layer GPT-2s.
"""

import json
import os
import random
import subprocess
import sys

from csd_testing import env_with_this_csd_ext


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def make_records(n, seed):
    """n Dolly records of three small tasks whose responses have 1 to ~15 tokens (so batches
    split over ranks carry different token counts)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        kind = rng.choice(("reverse", "add", "repeat"))
        if kind == "reverse":
            letters = [rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))]
            rec = ("Reverse the letters.", " ".join(letters), " ".join(reversed(letters)))
        elif kind == "add":
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            rec = ("Add the two numbers.", f"{a} + {b}", str(a + b))
        else:
            word = rng.choice(("cat", "blue", "oslo", "seven"))
            rec = ("Repeat the word.", word, " ".join([word] * rng.randint(1, 4)))
        records.append(dict(zip(("instruction", "context", "response"), rec)))
    return records


def make_tiny_setup(root, *, n_train=64, n_eval=8, dropout=0.1, seed=0):
    """Data, tokenizer, teacher and student directories under ``root``; returns their paths."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from csd_ext.distill.data import build_prompt
    from csd_ext.distill.tiny.tokenizer import train_bpe

    os.makedirs(root, exist_ok=True)
    train, evals = make_records(n_train, seed), make_records(n_eval, seed + 1000)
    paths = {"train": os.path.join(root, "train.jsonl"), "eval": os.path.join(root, "eval.jsonl")}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], evals)
    tok = train_bpe([build_prompt(r) + r["response"] for r in train], 512)
    for name, layers, dim, s in (("teacher", 1, 32, seed + 1), ("student", 1, 16, seed + 2)):
        torch.manual_seed(s)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=dim, n_layer=layers, n_head=2,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
        path = os.path.join(root, name)
        GPT2LMHeadModel(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths


def cli_args(paths, out_dir, **overrides):
    """csd-distill arguments for a short CPU run on the tiny pair (no generation at evaluation)."""
    settings = {"teacher": paths["teacher"], "student": paths["student"], "train_data": paths["train"],
                "eval_data": paths["eval"], "output_dir": out_dir, "max_length": 80, "max_prompt_length": 64,
                "batch_size": 4, "lr": 1e-3, "max_steps": 6, "log_every": 1, "eval_seeds": "", "eval_batch_size": 8,
                "eval_teacher": False, "seed": 3}
    settings.update(overrides)
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def subprocess_env(**extra):
    """One thread per process (bit-exact comparisons need the same thread count everywhere),
    this test's csd_ext first on the path, no inherited distributed settings."""
    env = env_with_this_csd_ext()
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CSD_DISTILL_FAULT"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(args, *, cwd, env=None, nproc=1):
    """Start ``python -m csd_ext.distill ARGS`` (under torchrun with ``nproc`` > 1).

    ``cwd`` must not be the source tree: ``-m`` puts the working directory first on
    sys.path, and a clone's csd_ext has no compiled extension when CI installed it.
    """
    if nproc == 1:
        cmd = [sys.executable, "-m", "csd_ext.distill", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "csd_ext.distill", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    """(return code, output) of a launched run."""
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def load_final(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "final", "model.safetensors"))


def run_inprocess(args):
    """(exit status, stdout + stderr) of ``csd-distill ARGS`` in this process, on one CPU thread
    like the launched runs (bit-exact comparisons with them need the same thread count)."""
    import contextlib
    import io

    import torch

    from csd_ext.distill.cli import main

    threads = torch.get_num_threads()
    buf = io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            status = main(list(args))
    finally:
        torch.set_num_threads(threads)
    return status, buf.getvalue()
