"""``csd-distill --preset tiny``: a faithful miniature of the paper's main experiment on a CPU.

1. synthetic instruction data (tasks.py): training, a dev split (to choose
   learning rates) and test prompts, pairwise disjoint; plus plain text for
   pretraining; a byte-level BPE trained on it all;
2. a teacher trained by SFT, and a student LM pretrained on the plain text
   (no instruction template: the GPT-2 analogue), both cached across runs,
   keyed by their config (stages.py);
3. the teacher's logits at every response position written once to an
   on-disk teacher cache (csd_ext.distill.teacher_cache, as
   ``csd-distill cache-teacher`` does): exact, since teacher and data are fixed;
4. every contestant distilled from the same pretrained student, its learning
   rate chosen from ``tiny.lr_grid`` by greedy ROUGE-L on the dev split, then
   trained with each of ``tiny.seeds``; one contestant again from a random
   initialisation; runs in parallel worker processes (students.py);
5. RKL checked against SS-CSD at tau = 1 (the same gradient), not run as a
   contestant;
6. a table of mean +- sd over seeds with each loss's paired per-seed
   difference against FKL, and a line that says who wins (report.py).
"""

import json
import multiprocessing
import os
import time

import torch

from ..data import build_prompt, encode_dataset
from ..logging_utils import info
from . import stages, students
from .report import summarise, write_report
from .tasks import make_dataset
from .tokenizer import train_bpe

DEFAULT_CONTESTANTS = [
    {"name": "FKL", "loss": "fkl"},
    {"name": "SS-CSD t=1", "loss": "csd", "loss_args": {"weighting": "SS", "temperature": 1.0}},
]


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def check_contestants(entries):
    from ..config import ConfigError
    from ...losses import get_loss

    entries = entries or DEFAULT_CONTESTANTS
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "loss" not in e:
            raise ConfigError(f"tiny.contestants[{i}] must be a mapping with 'loss' (and 'name', 'loss_args'), "
                              f"got {e!r}")
        args = dict(e.get("loss_args") or {})
        try:
            get_loss(e["loss"], **args)
        except ValueError as exc:
            raise ConfigError(f"tiny.contestants[{i}]: {exc}") from None
        out.append({"name": str(e.get("name", e["loss"])), "loss": e["loss"], "loss_args": args})
    names = [c["name"] for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"tiny.contestants: names must be distinct, got {names}")
    return out


def pool_map(fn, jobs, workers):
    """``fn`` over ``jobs`` in ``workers`` forked processes (1 thread each), in order."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(workers, len(jobs))) as pool:
        return pool.map(fn, jobs, chunksize=1)


def rkl_identity_check(cfg, init_dir, items):
    """Max |grad RKL - grad SS-CSD(tau 1)| / max |grad| on one batch at the pretrained start."""
    from ..data import Collator

    collate = Collator(students.CONTEXT["tokenizer"].pad_token_id)
    batch = collate(items[: cfg.batch_size])
    grads = []
    for loss, args in (("rkl", {}), ("csd", {"weighting": "SS", "temperature": 1.0})):
        model = students.load_student(init_dir)
        value, _ = students.kd_step_fn(loss, args)(model, batch)
        value.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    diff = (grads[0] - grads[1]).abs().max().item()
    return {"max_abs_diff": diff, "max_abs_grad": grads[0].abs().max().item(),
            "relative": diff / max(grads[0].abs().max().item(), 1e-30)}


def run_tiny(cfg):
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the BPE ran
    hf_logging.disable_progress_bar()
    wall0, cpu0 = time.time(), time.process_time()
    t, out = cfg.tiny, cfg.output_dir
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..config import ConfigError

        raise ConfigError("the tiny demo runs its students in parallel processes itself (tiny.workers): "
                          "start it without torchrun/accelerate launch")
    contestants = check_contestants(t.contestants)
    if t.random_start and t.random_start not in [c["name"] for c in contestants]:
        from ..config import ConfigError

        raise ConfigError(f"tiny.random_start names no contestant: {t.random_start!r}")
    workers = t.workers or (os.cpu_count() or 1)
    torch.set_num_threads(1)  # one thread per process: forked workers fill the cores
    torch.manual_seed(cfg.seed)
    stages.BATCH_SIZE[0] = cfg.batch_size
    info(f"tiny demo in {out}: everything is made here, nothing is downloaded; {workers} worker process(es); "
         f"cache {t.cache_dir}")

    # 1. Data and tokenizer.
    train_all, held = make_dataset(t.n_train + t.n_pretrain, t.n_dev + t.n_eval, t.tasks, seed=cfg.seed)
    train_records, pre_records = train_all[: t.n_train], train_all[t.n_train:]
    dev_records, test_records = held[: t.n_dev], held[t.n_dev:]
    paths = {k: os.path.join(out, "data", f"{k}.jsonl") for k in ("train", "dev", "test", "pretrain")}
    for k, recs in (("train", train_records), ("dev", dev_records), ("test", test_records), ("pretrain", pre_records)):
        write_jsonl(paths[k], recs)
    data_settings = {"n_train": t.n_train, "n_pretrain": t.n_pretrain, "n_dev": t.n_dev, "n_eval": t.n_eval,
                     "tasks": list(t.tasks), "seed": cfg.seed, "template": cfg.prompt_template,
                     "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                     "vocab_size": t.vocab_size}
    tok_dir = stages.cache_path(t.cache_dir, "tokenizer", data_settings)
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    else:
        texts = [build_prompt(r, cfg.prompt_template) + r["response"] for r in train_records]
        texts += ["\n".join(x for x in (r["instruction"], r["context"], r["response"]) if x) for r in pre_records]
        tmp = stages.staging_dir(tok_dir)
        tokenizer = train_bpe(texts, t.vocab_size, save_dir=tmp)
        stages.publish(tmp, tok_dir)
    enc = dict(template=cfg.prompt_template, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
               log=info)
    train_items = encode_dataset(tokenizer, train_records, what="tiny training data", **enc)
    dev_items = encode_dataset(tokenizer, dev_records, what="tiny dev data", **enc)
    test_items = encode_dataset(tokenizer, test_records, what="tiny test data", **enc)
    if len(dev_items) != len(dev_records) or len(test_items) != len(test_records):
        raise ValueError("tiny demo: a dev/test prompt was dropped; raise max_prompt_length")
    pre_items = stages.plain_text_items(tokenizer, pre_records, cfg.max_length)
    info(f"data: {len(train_items)} training, {len(pre_items)} pretraining (plain text), {len(dev_items)} dev and "
         f"{len(test_items)} test examples of tasks {', '.join(t.tasks)}; BPE vocabulary {len(tokenizer)}")

    # 2. Teacher (SFT) and pretrained student, cached; trained side by side when not.
    sched = lambda lr, steps: stages.Schedule(lr, steps, cfg)  # noqa: E731
    common = dict(data_settings, batch_size=cfg.batch_size, warmup_ratio=cfg.warmup_ratio, min_lr=cfg.min_lr,
                  weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, n_positions=t.n_positions)
    teacher_settings = dict(common, layers=t.teacher_layers, dim=t.teacher_dim, heads=t.teacher_heads,
                            steps=t.teacher_steps, lr=t.teacher_lr, objective="sft")
    student_settings = dict(common, layers=t.student_layers, dim=t.student_dim, heads=t.student_heads,
                            steps=t.pretrain_steps, lr=t.pretrain_lr, objective="plain-text LM")
    t_config = stages.gpt2_config(tokenizer, t.teacher_layers, t.teacher_dim, t.teacher_heads, t.n_positions)
    s_config = stages.gpt2_config(tokenizer, t.student_layers, t.student_dim, t.student_heads, t.n_positions)
    students.CONTEXT.update(cfg=cfg, tokenizer=tokenizer, stage_args={
        "teacher": (teacher_settings, t_config, train_items, t.teacher_steps, sched(t.teacher_lr, t.teacher_steps)),
        "student-pretrained": (student_settings, s_config, pre_items, t.pretrain_steps,
                               sched(t.pretrain_lr, t.pretrain_steps)),
    })
    stage_cpu = time.process_time()
    got = pool_map(_stage_job_with_seed, ["teacher", "student-pretrained"], workers)
    (teacher_dir, teacher_hit), (pre_dir, pre_hit) = got
    info(f"teacher: {'cached' if teacher_hit else 'trained'} ({teacher_dir}); pretrained student: "
         f"{'cached' if pre_hit else 'trained'} ({pre_dir})")
    random_dir = os.path.join(out, "student-random-init")
    stages.new_gpt2(s_config, cfg.seed + 1).save_pretrained(random_dir)

    # 3. The teacher's logits at the response positions, cached on disk once.
    from ..teacher_cache import open_teacher_cache, run_fingerprint, write_teacher_cache
    from transformers import GPT2LMHeadModel

    teacher = GPT2LMHeadModel.from_pretrained(teacher_dir).eval()
    fingerprint = run_fingerprint(cfg, tokenizer, data_files={"train": paths["train"], "eval": paths["test"]})
    logits_dir = stages.cache_path(t.cache_dir, "teacher-logits", dict(teacher_settings, dev=t.n_dev))
    if not os.path.isfile(os.path.join(logits_dir, "index.json")):
        tmp = stages.staging_dir(logits_dir)
        write_teacher_cache(tmp, teacher, train_items + dev_items + test_items, fingerprint=fingerprint,
                            teacher_name=teacher_dir, batch_size=64, shard_examples=4096, progress=False, log=info)
        stages.publish(tmp, logits_dir)
    open_teacher_cache(logits_dir, fingerprint)  # hash-verified, and made for exactly this data
    # Where every stage lives, for tools that build on the demo (e.g. benchmarks/tiny_topk_quality.py).
    with open(os.path.join(out, "stages.json"), "w") as f:
        json.dump({"teacher": teacher_dir, "student_pretrained": pre_dir, "student_random": random_dir,
                   "teacher_logits": logits_dir, "tokenizer": tok_dir, "data": paths}, f, indent=1)
    students.CONTEXT.update(logit_cache=logits_dir, train_items=train_items, dev_items=dev_items,
                            test_items=test_items, dev_records=dev_records, test_records=test_records,
                            init={"pretrained": pre_dir, "random": random_dir})
    # The teacher's own greedy outputs (for agreement) and scores.
    students.CONTEXT["teacher_greedy_dev"] = students.generation_metrics(
        teacher, dev_items, dev_records, cfg.seed, sample=False)[1]
    teacher_row, students.CONTEXT["teacher_greedy_test"] = students.generation_metrics(
        teacher, test_items, test_records, cfg.seed)
    del teacher
    prep_cpu = time.process_time() - stage_cpu
    identity = rkl_identity_check(cfg, pre_dir, train_items)
    info(f"RKL vs SS-CSD(tau 1) gradient at the pretrained start: max |diff| {identity['max_abs_diff']:.2e} "
         f"({identity['relative']:.1e} of the largest entry)")

    # 4. Learning rates on the dev split, then every contestant with every seed on the test prompts.
    starts = [(c, "pretrained") for c in contestants]
    if t.random_start:
        starts.append((next(c for c in contestants if c["name"] == t.random_start), "random"))
    grid_seed = cfg.seed  # not one of the training seeds of the final runs (tiny.seeds)

    def job(c, init, lr, seed, split, steps=t.student_steps):
        return {"name": c["name"], "loss": c["loss"], "loss_args": c["loss_args"], "init": init, "lr": lr,
                "seed": seed, "split": split, "steps": steps}

    grid_jobs = [job(c, init, lr, grid_seed, "dev") for c, init in starts for lr in t.lr_grid]
    info(f"learning-rate grid {list(t.lr_grid)} on {len(dev_items)} dev prompts: {len(grid_jobs)} runs of "
         f"{t.student_steps} steps")
    grid = pool_map(students.run_student, grid_jobs, workers)
    chosen = {}
    for c, init in starts:
        runs = [g for g in grid if g["name"] == c["name"] and g["init"] == init]
        best = max(runs, key=lambda g: (g["greedy_rougeL"], -g["lr"]))  # ties: the smaller learning rate
        chosen[(c["name"], init)] = best["lr"]
    final_jobs = [job(c, init, chosen[(c["name"], init)], s, "test") for c, init in starts for s in t.seeds]
    final_jobs += [job({"name": "no distillation", "loss": "none", "loss_args": {}}, "pretrained", 0.0, s, "test",
                       steps=0) for s in t.seeds]
    info(f"chosen learning rates: " + ", ".join(f"{n}{' (random start)' if i == 'random' else ''} {lr:g}"
                                                for (n, i), lr in chosen.items())
         + f"; {len(final_jobs)} test runs (seeds {list(t.seeds)})")
    finals = pool_map(students.run_student, final_jobs, workers)

    # 5. Report.
    wall, cpu_parent = time.time() - wall0, time.process_time() - cpu0
    cpu_workers = sum(r["train_cpu_s"] + r["eval_cpu_s"] for r in grid + finals)
    summary = summarise(cfg, teacher_row, finals, grid, chosen, identity, starts)
    summary["timing"] = {"wall_s": wall, "student_runs_cpu_s": cpu_workers, "parent_cpu_s": cpu_parent,
                         "prep_cpu_s": prep_cpu, "teacher_cached": teacher_hit, "student_cached": pre_hit,
                         "teacher_cpu_s": stages.stage_cpu_seconds(teacher_dir),
                         "pretrain_cpu_s": stages.stage_cpu_seconds(pre_dir),
                         "workers": workers, "load_average_at_end": os.getloadavg()[0]}
    table = write_report(out, summary)
    print("\n" + table, flush=True)
    info(f"results: {os.path.join(out, 'results.md')} and results.json; {wall:.0f}s wall")
    return summary


def _stage_job_with_seed(name):
    c = students.CONTEXT
    settings, config, items, steps, sched = c["stage_args"][name]
    seed = c["cfg"].seed + (0 if name == "teacher" else 1)
    return stages.trained_model(c["cfg"].tiny.cache_dir, name, settings, config, items, steps, sched, seed=seed,
                                tokenizer=c["tokenizer"], log=info)
