"""The tiny demo's cached stages: the teacher (SFT), the pretrained student, and a compact
training loop shared by them and by the distillation runs.

A stage's output lives in ``<cache_dir>/<kind>-<key>/`` where ``key`` is the
SHA-256 of everything that determines it (data settings, tokenizer, model
size, steps, learning rate, seed, this file's FORMAT).  A later run with the
same settings loads it instead of training again; any change gives a new key.
Directories appear atomically (written to a temporary name, then renamed), so
a killed run never leaves a half-written model that a later run would trust.
"""

import hashlib
import json
import math
import os
import random
import shutil
import tempfile

import torch

from ..data import IGNORE_INDEX, Collator
from ..trainer import build_scheduler, param_groups, token_cross_entropy

FORMAT = 1  # bump when a stage's code changes what it produces


def config_key(settings):
    return hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir, kind, settings):
    return os.path.join(os.path.expanduser(cache_dir), f"{kind}-{config_key(settings)}")


def publish(tmp_dir, final_dir):
    """Move a finished stage into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def staging_dir(final_dir):
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(final_dir) + ".tmp-", dir=parent)


def gpt2_config(tokenizer, layers, dim, heads, n_positions):
    from transformers import GPT2Config

    # No dropout: a few hundred steps on a few thousand short examples do not overfit.
    return GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=dim, n_layer=layers, n_head=heads,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def new_gpt2(config, seed):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def plain_text_items(tokenizer, records, max_length):
    """The student's pretraining text: each record as plain lines, no instruction template, eos-ended;
    every next token is a label (a language model, not an instruction follower)."""
    items = []
    for r in records:
        text = "\n".join(x for x in (r["instruction"], r["context"], r["response"]) if x)
        ids = (tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])[: max_length + 1]
        items.append({"input_ids": ids[:-1], "labels": ids[1:]})
    return items


class Batches:
    """Seeded random mini-batches (with replacement across epochs, a fresh permutation each epoch)."""

    def __init__(self, items, batch_size, seed):
        self.items, self.batch_size = items, batch_size
        self.rng = random.Random(seed)
        self.order, self.pos = [], 0

    def next(self):
        out = []
        while len(out) < self.batch_size:
            if self.pos >= len(self.order):
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
                self.pos = 0
            take = self.order[self.pos:self.pos + self.batch_size - len(out)]
            self.pos += len(take)
            out += [self.items[i] for i in take]
        return out


class Schedule:
    """The optimiser settings the real runs use (AdamW groups, warm-up + cosine to min_lr)."""

    def __init__(self, lr, steps, cfg):
        self.lr, self.steps = lr, steps
        self.lr_scheduler, self.warmup_ratio, self.min_lr = cfg.lr_scheduler, cfg.warmup_ratio, min(cfg.min_lr, lr)
        self.weight_decay, self.max_grad_norm = cfg.weight_decay, cfg.max_grad_norm


def train_loop(model, items, steps, sched, *, seed, pad_token_id, loss_fn, log_every=0, log=None):
    """``steps`` AdamW steps on ``loss_fn(model, batch) -> (loss, parts)``; returns the logged records."""
    collate = Collator(pad_token_id)
    opt = torch.optim.AdamW(param_groups(model, sched.weight_decay), lr=sched.lr)
    scheduler = build_scheduler(sched, opt, steps)
    batches = Batches(items, BATCH_SIZE[0], seed)
    model.train()
    records = []
    for step in range(1, steps + 1):
        batch = collate(batches.next())
        loss, parts = loss_fn(model, batch)
        loss.backward()
        if sched.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), sched.max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps):
            rec = {"step": step, "lr": scheduler.get_last_lr()[0], "loss": loss.item()}
            rec.update({k: float(v) for k, v in parts.items()})
            records.append(rec)
            if log is not None:
                log(rec)
    model.eval()
    return records


BATCH_SIZE = [32]  # set by the pipeline from cfg.batch_size (module-level so worker processes inherit it)


def ce_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    ce = token_cross_entropy(logits, batch["labels"])
    return ce, {"ce": ce.detach()}


def trained_model(cache_dir, kind, settings, config, items, steps, sched, *, seed, tokenizer, log):
    """A GPT-2 trained with next-token CE on ``items`` (SFT or pretraining), from the cache when present.

    Returns (directory, whether it came from the cache)."""
    from transformers import GPT2LMHeadModel

    final = cache_path(cache_dir, kind, settings)
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        return final, True
    import time

    torch.set_num_threads(1)
    cpu0 = time.process_time()
    model = new_gpt2(config, seed)
    records = train_loop(model, items, steps, sched, seed=seed, pad_token_id=tokenizer.pad_token_id,
                         loss_fn=ce_loss, log_every=max(1, steps // 10))
    tmp = staging_dir(final)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "stage.json"), "w") as f:
        json.dump({"kind": kind, "settings": settings, "records": records, "cpu_s": time.process_time() - cpu0},
                  f, indent=1)
    publish(tmp, final)
    assert isinstance(GPT2LMHeadModel.from_pretrained(final), GPT2LMHeadModel)
    log(f"{kind}: {steps} steps in {time.process_time() - cpu0:.0f} CPU s, final training CE "
        f"{records[-1]['ce']:.3f}; cached in {final}")
    return final, False


def stage_cpu_seconds(stage_dir):
    """CPU seconds the stage took when it was trained (None for caches written before this was recorded)."""
    try:
        with open(os.path.join(stage_dir, "stage.json")) as f:
            return json.load(f).get("cpu_s")
    except (OSError, ValueError):
        return None


def response_rows_metrics(student_logits, teacher_logits, labels):
    """Teacher-forced FKL, RKL (nats per token) and top-1 agreement (%) over response positions."""
    mask = labels != IGNORE_INDEX
    s = torch.log_softmax(student_logits[mask].float(), -1)
    t = torch.log_softmax(teacher_logits[mask].float(), -1)
    fkl = (t.exp() * (t - s)).sum(-1)
    rkl = (s.exp() * (s - t)).sum(-1)
    top1 = (s.argmax(-1) == t.argmax(-1)).float()
    return fkl.sum().item(), rkl.sum().item(), top1.sum().item(), int(mask.sum())


def finite(x):
    return x is not None and not (isinstance(x, float) and math.isnan(x))
