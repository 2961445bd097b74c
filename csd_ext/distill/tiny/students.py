"""One distillation run of the tiny demo, and its evaluation; run in worker processes.

The teacher is not loaded: its logits at every response position come from
the on-disk teacher cache (``csd_ext.distill.teacher_cache.CachedTeacher``,
the same object ``--teacher-cache`` uses in the real trainer), so a run costs
only the student.  The cache is exact: the teacher is frozen and the data are
fixed, so the cached rows are the very numbers a live teacher would produce
(``python_tests/test_distill_tiny.py`` checks the gradients agree).

Workers are forked from the pipeline after it has set everything up in
``CONTEXT``; each uses one CPU thread, so two runs fill two cores.
"""

import os
import statistics
import time

import torch

from ..data import Collator
from ..evaluate import distinct_n, generate, normalise_text, rouge_l
from ...losses import get_loss
from .stages import Schedule, response_rows_metrics, train_loop

CONTEXT = {}  # filled by pipeline.run_tiny before the worker pool forks


def cached_teacher(loss, loss_args):
    from ..teacher_cache import CachedTeacher, open_teacher_cache

    if "cache" not in CONTEXT:  # opened (and hash-verified) once per process
        CONTEXT["cache"] = open_teacher_cache(CONTEXT["logit_cache"], verify=False)
    return CachedTeacher(CONTEXT["cache"], loss=loss, loss_args=loss_args)


def kd_step_fn(loss, loss_args):
    """``(model, batch) -> (loss, parts)`` with the teacher's rows read from the cache."""
    kd_fn = get_loss(loss, **loss_args)
    teacher = cached_teacher(loss, loss_args)

    def step(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        kd = teacher.kd_loss(kd_fn, logits, batch)
        return kd, {"kd": kd.detach()}

    return step


def load_student(init_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(init_dir)


@torch.no_grad()
def teacher_forced(model, items, batch_size):
    """Held-out FKL, RKL and top-1 agreement with the cached teacher rows."""
    teacher = cached_teacher("fkl", {})
    collate = Collator(CONTEXT["tokenizer"].pad_token_id)
    sums = [0.0, 0.0, 0.0, 0]
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        rows = teacher.lookup(batch)
        for k, v in enumerate(response_rows_metrics(logits, rows.logits, batch["labels"])):
            sums[k] += v
    n = max(sums[3], 1)
    return {"tf_fkl": sums[0] / n, "tf_rkl": sums[1] / n, "tf_top1": 100.0 * sums[2] / n}


def generation_metrics(model, items, records, seed, *, sample=True, teacher_greedy=None):
    """Greedy exact match (overall, per task), greedy ROUGE-L, agreement with the teacher; sampled
    ROUGE-L and distinct-2 with ``seed``."""
    cfg, tok = CONTEXT["cfg"], CONTEXT["tokenizer"]
    prompts = [it["prompt_ids"] for it in items]
    refs = [it["reference"] for it in items]
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, no_repeat_ngram_size=0)
    greedy = generate(model, tok, prompts, do_sample=False, **common)
    hits = [normalise_text(g) == normalise_text(r) for g, r in zip(greedy, refs)]
    out = {"greedy_exact_match": 100.0 * sum(hits) / len(hits), "greedy_rougeL": rouge_l(greedy, refs)}
    per_task = {}
    for task in sorted({r["task"] for r in records}):
        sel = [h for h, r in zip(hits, records) if r["task"] == task]
        per_task[task] = 100.0 * sum(sel) / len(sel)
    out["exact_match_per_task"] = per_task
    if teacher_greedy is not None:
        same = [normalise_text(a) == normalise_text(b) for a, b in zip(greedy, teacher_greedy)]
        out["teacher_agreement"] = 100.0 * sum(same) / len(same)
    if sample:
        sampled = generate(model, tok, prompts, do_sample=True, seed=seed, **common)
        out["rougeL"] = rouge_l(sampled, refs)
        out["distinct_2"] = distinct_n(sampled, 2)
    return out, greedy


def run_student(job):
    """One job: distil (unless steps == 0), then score on the dev split (grid) or the test split (final)."""
    torch.set_num_threads(1)
    cfg, t = CONTEXT["cfg"], CONTEXT["cfg"].tiny
    start = time.process_time()
    model = load_student(CONTEXT["init"][job["init"]])
    records = []
    if job["steps"] > 0:
        records = train_loop(model, CONTEXT["train_items"], job["steps"], Schedule(job["lr"], job["steps"], cfg),
                             seed=job["seed"], pad_token_id=CONTEXT["tokenizer"].pad_token_id,
                             loss_fn=kd_step_fn(job["loss"], job["loss_args"]),
                             log_every=max(1, job["steps"] // 10))
    train_cpu = time.process_time() - start
    split = job["split"]
    items, recs = CONTEXT[f"{split}_items"], CONTEXT[f"{split}_records"]
    gen, _ = generation_metrics(model, items, recs, job["seed"], sample=split == "test",
                                teacher_greedy=CONTEXT.get(f"teacher_greedy_{split}"))
    result = dict(job, **gen, train_cpu_s=train_cpu, eval_cpu_s=time.process_time() - start - train_cpu,
                  curve=records)
    if split == "test":
        result.update(teacher_forced(model, items, cfg.eval_batch_size))
    if job.get("save_dir"):
        os.makedirs(job["save_dir"], exist_ok=True)
        model.save_pretrained(job["save_dir"])
    return result


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
