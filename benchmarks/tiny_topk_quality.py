"""How top-k teacher caches change CSD on the tiny task: k against quality.

    PYTHONPATH=. python benchmarks/tiny_topk_quality.py --out-dir runs/topk --ks 0,1,8,64 \\
        --kd-ratios 1.0,0.5 --md benchmarks/RESULTS_topk_quality.md [--set tiny.teacher_steps=200 ...]

1. ``csd-distill --preset tiny`` (csd_ext/distill/tiny/pipeline.py) makes, or finds in its cache
   (``tiny.cache_dir``), the synthetic data, the BPE, the SFT teacher and the pretrained student;
   its ``stages.json`` says where they are.  Its own contest is cut to one contestant, one learning
   rate, one seed and 1 step (tiny.student_steps must be > 0): this script trains its own students;
2. the live-teacher row: ``csd-distill --pipeline distill`` distils the pretrained student from the
   live teacher with the preset's loss (CSD, SS) and kd_ratio, ``tiny.student_steps`` steps at
   ``--lr``; it also scores the teacher;
3. for each k: ``csd-distill cache-teacher --top-k k`` from that teacher (k = 0: full logits), then
   a student from the same initialisation, with the same steps, learning rate and data order,
   trained with ``--teacher-cache`` (top-k: ``sparse_csd_loss`` on the k cached ids), for each
   ``--kd-ratios`` value (objective (1 - r) CE + r KD);
4. one table: greedy ROUGE-L and exact match on the held-out test prompts, and validation CE (the
   references' next-token cross-entropy, a full-vocabulary measure).

Everything runs on the CPU with the tiny preset's settings (plus any ``--set``); nothing is
downloaded.  The k = 0 row checks the cache itself: it must match the live-teacher row up to
floating-point reordering.  A rerun with the same arguments reuses finished runs and complete
caches; an ``--out-dir`` made with other settings is refused.
"""

import argparse
import json
import os
import sys
import time

STAGES_RUN = "stages"    # the tiny pipeline's run (data, teacher, pretrained student) inside --out-dir
SETTINGS_FILE = "topk_settings.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="runs/topk")
    p.add_argument("--ks", default="0,1,4,16,64", help="comma-separated k; 0 = the full logits")
    p.add_argument("--kd-ratios", default="1.0", help="objective (1 - r) CE + r KD for the cached-teacher runs")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="the students' learning rate, the same for every row (default 1e-3: the middle of the "
                        "tiny preset's lr_grid, and the old tiny.student_lr)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for this process (0: torch's default); 1 is faster on a busy machine")
    p.add_argument("--set", action="append", default=[], help="extra --set for the tiny preset (tiny.* or any key)")
    p.add_argument("--md", help="write the Markdown table here")
    a = p.parse_args(argv)
    try:
        a.k_list = [int(x) for x in a.ks.split(",") if x.strip()]
        a.ratio_list = [float(x) for x in a.kd_ratios.split(",") if x.strip()]
    except ValueError as exc:
        p.error(f"--ks takes integers and --kd-ratios numbers, comma-separated: {exc}")
    if not a.k_list or any(k < 0 for k in a.k_list):
        p.error(f"--ks must list integers >= 0 (0: full logits), got {a.ks!r}")
    if not a.ratio_list or any(not 0 < r <= 1 for r in a.ratio_list):
        p.error(f"--kd-ratios must list numbers in (0, 1], got {a.kd_ratios!r}")
    if a.lr <= 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    a.out_dir = os.path.abspath(a.out_dir)  # stages.json then records absolute paths
    return a


def _run(argv):
    from csd_ext.distill.cli import main

    status = main(argv)
    if status != 0:
        sys.exit(f"csd-distill {' '.join(argv)} failed with status {status}")


def preset_argv(sets):
    """The tiny preset with the user's --set, as every csd-distill call here starts."""
    return ["--preset", "tiny", "--eval-seeds", "", "--eval-greedy", *[x for s in sets for x in ("--set", s)]]


def stages_argv(cfg, sets, lr, out_dir):
    """``csd-distill --preset tiny`` reduced to what this experiment needs from it: its cached stages.

    The contest (lr grid x contestants x seeds) is cut to one contestant, one learning rate, one seed
    and 1 distillation step (its rows are not used).  The teacher, pretrained student and data do not
    depend on those keys (their cache keys are made from the data and model settings only), so they
    are the demo's own."""
    contestant = {"name": "CSD", "loss": cfg.loss, "loss_args": dict(cfg.loss_args)}
    contest = [f"tiny.contestants={json.dumps([contestant])}", f"tiny.lr_grid=[{lr!r}]",
               f"tiny.seeds=[{cfg.tiny.seeds[0]}]", "tiny.random_start=''", "tiny.student_steps=1"]
    return [*preset_argv([*sets, *contest]), "--output-dir", os.path.join(out_dir, STAGES_RUN)]


def student_argv(a, cfg, data, out, *, teacher=None, cache=None, kd_ratio=None):
    """One student: the pretrained student distilled on the tiny training data for tiny.student_steps
    steps at --lr, scored on the test prompts; from the live ``teacher`` (which is scored too) or
    from a teacher ``cache``."""
    argv = [*preset_argv(a.set), "--pipeline", "distill", "--student", data["student"],
            "--train-data", data["train"], "--eval-data", data["eval"], "--max-steps", str(cfg.tiny.student_steps),
            "--lr", repr(a.lr), "--eval-max-examples", str(cfg.tiny.n_eval), "--output-dir", out]
    if teacher is not None:
        argv += ["--teacher", teacher]
    if cache is not None:
        argv += ["--no-eval-teacher", "--teacher-cache", cache]
    if kd_ratio is not None:
        argv += ["--kd-ratio", repr(kd_ratio)]
    return argv


def cache_argv(a, data, cache, k):
    return ["cache-teacher", *preset_argv(a.set), "--teacher", data["teacher"], "--train-data", data["train"],
            "--eval-data", data["eval"], "--output", cache, "--top-k", str(k)]


def read_stages(path):
    """stages.json -> {teacher, student, train, eval}, every path checked to exist.

    Relative paths (a tiny run started with a relative --output-dir) are taken relative to the
    current directory, as the run that wrote them saw them."""
    try:
        with open(path) as f:
            where = json.load(f)
        got = {"teacher": where["teacher"], "student": where["student_pretrained"],
               "train": where["data"]["train"], "eval": where["data"]["test"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a tiny-demo stages.json ({type(exc).__name__}: {exc}); delete its "
                         f"directory and rerun") from None
    got = {k: os.path.abspath(os.path.expanduser(v)) for k, v in got.items()}
    for k, v in got.items():
        if not os.path.exists(v):
            raise SystemExit(f"{path}: the {k} it names is missing ({v}); was tiny.cache_dir cleared? Delete "
                             f"{os.path.dirname(path)} and rerun")
    return got


def check_settings(out_dir, settings):
    """Refuse to mix runs made with other settings in one --out-dir (finished runs are reused)."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            raise SystemExit(f"{out_dir} holds runs made with other settings ({old}); now {settings}: "
                             f"use another --out-dir or delete it")
    else:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)


def _rows(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)["results"]


def _student_row(out_dir):
    return next(r for r in _rows(out_dir) if r["name"].startswith("student"))


def teacher_val_ce(cfg, teacher_dir, eval_path):
    """The teacher's validation CE on the same held-out references, as the trainer measures the
    students' (token-weighted next-token CE over response positions, teacher-forced)."""
    import torch

    from csd_ext.distill.data import IGNORE_INDEX, Collator, encode_dataset
    from csd_ext.distill.models import load_causal_lm, load_tokenizer
    from csd_ext.distill.sources import load_records
    from csd_ext.distill.trainer import token_cross_entropy

    tokenizer = load_tokenizer(teacher_dir)
    model = load_causal_lm(teacher_dir, dtype=torch.float32).eval()
    items = encode_dataset(tokenizer, load_records(eval_path), template=cfg.prompt_template,
                           max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                           what=f"evaluation data {eval_path}")
    collate = Collator(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(items), cfg.eval_batch_size):
            batch = collate(items[i:i + cfg.eval_batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False).logits
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            total += token_cross_entropy(logits, batch["labels"]).item() * n
            tokens += n
    return total / max(tokens, 1)


def _cache_complete(cache):
    try:
        with open(os.path.join(cache, "index.json")) as f:
            return bool(json.load(f).get("complete"))
    except (OSError, ValueError):
        return False


def main(argv=None):
    a = parse_args(argv)
    start = time.time()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    from csd_ext.distill.cli import parse_config

    _, cfg = parse_config(preset_argv(a.set))
    # lr and --set decide every run here (--ks and --kd-ratios only add runs)
    check_settings(a.out_dir, {"set": list(a.set), "lr": a.lr})

    stages_json = os.path.join(a.out_dir, STAGES_RUN, "stages.json")
    if not os.path.exists(stages_json):
        _run(stages_argv(cfg, a.set, a.lr, a.out_dir))
    data = read_stages(stages_json)

    live = os.path.join(a.out_dir, "student-live")
    if not os.path.exists(os.path.join(live, "results.json")):  # reruns reuse finished runs
        _run(student_argv(a, cfg, data, live, teacher=data["teacher"]))
    teacher_row = next(r for r in _rows(live) if r["name"] == "teacher")
    teacher_row.setdefault("val_ce", teacher_val_ce(cfg, data["teacher"], data["eval"]))
    rows = [("teacher (SFT)", "-", "-", teacher_row), ("CSD, live teacher", "V", cfg.kd_ratio, _student_row(live))]
    for ratio in a.ratio_list:
        for k in a.k_list:
            cache = os.path.join(a.out_dir, f"cache-k{k}")
            if not _cache_complete(cache):  # an incomplete cache is resumed by cache-teacher
                _run(cache_argv(a, data, cache, k))
            out = os.path.join(a.out_dir, f"student-k{k}" + ("" if ratio == 1 else f"-kd{ratio:g}"))
            if not os.path.exists(os.path.join(out, "results.json")):
                _run(student_argv(a, cfg, data, out, cache=cache, kd_ratio=ratio))
            rows.append((f"CSD, cache top-{k}" if k else "CSD, full cache", str(k) if k else "V", ratio,
                         _student_row(out)))
    with open(os.path.join(a.out_dir, f"cache-k{a.k_list[0]}", "index.json")) as f:
        vocab = json.load(f)["vocab_size"]
    text = table(rows, vocab, cfg, a, time.time() - start)
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)


def code_version():
    """The commit this script ran from (the recorded table must say which code produced it)."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def table(rows, vocab, cfg, a, seconds):
    t = cfg.tiny
    lines = ["| model | k | kd_ratio | greedy ROUGE-L | greedy exact match % | val CE |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, k, ratio, r in rows:
        lines.append(f"| {name} | {k} | {ratio} | {r.get('greedy_rougeL', float('nan')):.2f} | "
                     f"{r.get('greedy_exact_match', float('nan')):.1f} | {r.get('val_ce', float('nan')):.3f} |")
    notes = [f"V = {vocab}; tiny preset: teacher {t.teacher_layers}L d{t.teacher_dim} SFT {t.teacher_steps} steps, "
             f"student {t.student_layers}L d{t.student_dim} pretrained {t.pretrain_steps} steps, then "
             f"{t.student_steps} distillation steps at lr {a.lr:g}; {t.n_eval} held-out test prompts, greedy "
             f"decoding; one seed ({cfg.seed})",
             f"settings: {' '.join(a.set) or 'the preset as shipped'}, --lr {a.lr:g}; whole run {seconds:.0f} s "
             f"(reused stages and runs not counted)",
             f"code: commit {code_version()} (benchmarks/tiny_topk_quality.py on the tiny pipeline of "
             f"csd_ext/distill/tiny/)"]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


if __name__ == "__main__":
    main()
