"""How top-k teacher caches change CSD on the tiny task: k against quality.

    PYTHONPATH=. python benchmarks/tiny_topk_quality.py --out-dir runs/topk --ks 0,1,4,16,64 \\
        --md benchmarks/RESULTS_topk_quality.md [--set tiny.teacher_steps=150 ...]

1. ``csd-distill --preset tiny`` (baselines off): the synthetic data, BPE, the SFT teacher and one
   CSD student distilled from the live teacher (the reference row);
2. for each k: ``csd-distill cache-teacher --top-k k`` from that teacher (k = 0: full logits), then
   a student from the same initialisation, same steps and learning rate, trained with
   ``--teacher-cache`` (top-k: ``sparse_csd_loss`` on the k cached ids), for each ``--kd-ratios``
   value (objective (1 - r) CE + r KD);
3. one table: greedy ROUGE-L and exact match on the held-out prompts, and validation CE (the
   references' next-token cross-entropy, a full-vocabulary measure).

Everything runs on the CPU with the tiny preset's settings (plus any ``--set``); nothing is
downloaded.  The k = 0 row checks the cache itself: it must match the live-teacher row up to
floating-point reordering.
"""

import argparse
import json
import os
import sys
import time


def _run(argv):
    from csd_ext.distill.cli import main

    status = main(argv)
    if status != 0:
        sys.exit(f"csd-distill {' '.join(argv)} failed with status {status}")


def _student_row(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        rows = json.load(f)["results"]
    return next(r for r in rows if r["name"].startswith("student"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", default="runs/topk")
    p.add_argument("--ks", default="0,1,4,16,64")
    p.add_argument("--kd-ratios", default="1.0", help="objective (1 - r) CE + r KD for the cached-teacher runs")
    p.add_argument("--set", action="append", default=[], help="extra --set for the tiny preset")
    p.add_argument("--md", help="write the Markdown table here")
    a = p.parse_args()
    start = time.time()
    base = os.path.join(a.out_dir, "base")
    sets = [x for s in a.set for x in ("--set", s)]
    common = ["--preset", "tiny", "--eval-seeds", "", "--eval-greedy", *sets]
    if not os.path.exists(os.path.join(base, "results.json")):
        _run([*common, "--output-dir", base, "--set", "tiny.baselines=[]"])
    with open(os.path.join(base, "results.json")) as f:
        base_rows = json.load(f)["results"]
    teacher_row = next(r for r in base_rows if r["name"] == "teacher")
    live_row = next(r for r in base_rows if r["name"].startswith("student"))
    from csd_ext.distill.cli import parse_config

    _, cfg = parse_config(common)
    data = dict(teacher=os.path.join(base, "teacher", "final"), student=os.path.join(base, "student-init"),
                train=os.path.join(base, "data", "train.jsonl"), eval=os.path.join(base, "data", "eval.jsonl"))
    run_args = ["--pipeline", "distill", "--student", data["student"], "--train-data", data["train"],
                "--eval-data", data["eval"], "--max-steps", str(cfg.tiny.student_steps),
                "--lr", str(cfg.tiny.student_lr), "--eval-max-examples", str(cfg.tiny.n_eval),
                "--no-eval-teacher"]
    rows = [("teacher (SFT)", "-", "-", teacher_row), ("CSD, live teacher", "V", cfg.kd_ratio, live_row)]
    for ratio in [float(x) for x in a.kd_ratios.split(",")]:
        for k in [int(x) for x in a.ks.split(",")]:
            cache = os.path.join(a.out_dir, f"cache-k{k}")
            if not os.path.exists(os.path.join(cache, "index.json")) or \
                    not json.load(open(os.path.join(cache, "index.json"))).get("complete"):
                _run(["cache-teacher", *common, "--teacher", data["teacher"], "--train-data", data["train"],
                      "--eval-data", data["eval"], "--output", cache, "--top-k", str(k)])
            out = os.path.join(a.out_dir, f"student-k{k}" + ("" if ratio == 1 else f"-kd{ratio:g}"))
            if not os.path.exists(os.path.join(out, "results.json")):  # reruns reuse finished runs
                _run([*common, *run_args, "--teacher-cache", cache, "--output-dir", out, "--kd-ratio", str(ratio)])
            rows.append((f"CSD, cache top-{k}" if k else "CSD, full cache", str(k) if k else "V", ratio,
                         _student_row(out)))
    vocab = json.load(open(os.path.join(a.out_dir, f"cache-k{a.ks.split(',')[0]}", "index.json")))["vocab_size"]
    lines = ["| model | k | kd_ratio | greedy ROUGE-L | greedy exact match % | val CE |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, k, ratio, r in rows:
        lines.append(f"| {name} | {k} | {ratio} | {r.get('greedy_rougeL', float('nan')):.2f} | "
                     f"{r.get('greedy_exact_match', float('nan')):.1f} | {r.get('val_ce', float('nan')):.3f} |")
    notes = [f"V = {vocab}; tiny preset, {cfg.tiny.n_eval} held-out prompts, greedy decoding; one seed "
             f"({cfg.seed}); settings: {' '.join(a.set) or 'the preset as shipped'}; whole run "
             f"{time.time() - start:.0f} s on a shared 2-core CPU"]
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
