"""The tiny demo's table: mean +- sd over seeds, paired per-seed differences against FKL, and a
plain statement of who wins."""

import json
import os
import statistics

from .students import mean_sd

# (key, column title, higher is better)
METRICS = [
    ("rougeL", "ROUGE-L (sampled)", True),
    ("greedy_exact_match", "exact match % (greedy)", True),
    ("teacher_agreement", "agrees w/ teacher % (greedy)", True),
    ("distinct_2", "distinct-2", True),
    ("tf_fkl", "held-out FKL", False),
    ("tf_rkl", "held-out RKL", False),
    ("tf_top1", "top-1 = teacher %", True),
]
PAIRED = [("rougeL", "Δ ROUGE-L vs FKL"), ("greedy_exact_match", "Δ exact match vs FKL")]
REFERENCE = "FKL"


def _label(name, init):
    if name == "no distillation":
        return "pretrained student, no distillation"
    return name + (" [random start]" if init == "random" else "")


def summarise(cfg, teacher_row, finals, grid, chosen, identity, starts):
    t = cfg.tiny
    groups = [(c["name"], init) for c, init in starts] + [("no distillation", "pretrained")]
    by_seed = {g: {r["seed"]: r for r in finals if (r["name"], r["init"]) == g} for g in groups}
    ref = by_seed.get((REFERENCE, "pretrained"))
    rows = []
    for g in groups:
        runs = by_seed[g]
        row = {"name": _label(*g), "contestant": g[0], "init": g[1], "lr": chosen.get(g), "seeds": sorted(runs)}
        for key, _, _ in METRICS + [("greedy_rougeL", "", True)]:
            m, sd = mean_sd([r.get(key) for r in runs.values()])
            row[key], row[key + "_sd"] = m, sd
            row[key + "_per_seed"] = [runs[s].get(key) for s in sorted(runs)]
        tasks = sorted({k for r in runs.values() for k in r["exact_match_per_task"]})
        row["exact_match_per_task"] = {k: mean_sd([r["exact_match_per_task"][k] for r in runs.values()])[0]
                                       for k in tasks}
        if ref and g != (REFERENCE, "pretrained"):
            for key, _ in PAIRED:
                diffs = [runs[s][key] - ref[s][key] for s in sorted(runs) if s in ref]
                m, sd = mean_sd(diffs)
                row[f"paired_{key}"] = {"mean": m, "sd": sd, "per_seed": diffs,
                                        "better_in": sum(d > 0 for d in diffs), "worse_in": sum(d < 0 for d in diffs),
                                        "n": len(diffs)}
        row["train_cpu_s"] = mean_sd([r["train_cpu_s"] for r in runs.values()])[0]
        row["curves"] = {s: runs[s]["curve"] for s in sorted(runs)}
        rows.append(row)
    teacher = {"name": f"teacher ({t.teacher_layers}L d{t.teacher_dim}, SFT)", **teacher_row}
    verdict = who_wins(rows)
    grid_rows = [{k: g[k] for k in ("name", "init", "lr", "greedy_rougeL", "greedy_exact_match")} for g in grid]
    return {"teacher": teacher, "rows": rows, "grid": grid_rows, "verdict": verdict, "rkl_identity": identity,
            "settings": {"seeds": list(t.seeds), "lr_grid": list(t.lr_grid), "student_steps": t.student_steps,
                         "n_test": t.n_eval, "n_dev": t.n_dev, "teacher_steps": t.teacher_steps,
                         "pretrain_steps": t.pretrain_steps}}


def who_wins(rows):
    """Sentences: the best loss per metric, and each loss's paired record against FKL."""
    contest = [r for r in rows if r["init"] == "pretrained" and r["contestant"] != "no distillation"]
    lines = []
    for key, title, higher in METRICS:
        scored = [r for r in contest if r.get(key) is not None]
        if not scored:
            continue
        best = (max if higher else min)(scored, key=lambda r: r[key])
        lines.append(f"{title}: best {best['name']} ({best[key]:.2f})")
    for r in contest:
        p = r.get("paired_rougeL")
        if not p or p["mean"] is None:
            continue
        e = r["paired_greedy_exact_match"]
        consistent = p["better_in"] == p["n"] or p["worse_in"] == p["n"] or p["better_in"] == p["worse_in"] == 0
        if p["better_in"] == 0 and p["worse_in"] == 0:
            word = "ties FKL in every seed"
        elif p["better_in"] == p["n"] and p["n"] > 1:
            word = "beats FKL in every seed"
        elif p["worse_in"] == p["n"] and p["n"] > 1:
            word = "loses to FKL in every seed"
        else:
            word = f"is mixed against FKL (better in {p['better_in']} of {p['n']} seeds)"
        lines.append(f"{r['name']} {word} on sampled ROUGE-L ({p['mean']:+.2f} ± {p['sd']:.2f}); greedy exact "
                     f"match {e['mean']:+.2f} ± {e['sd']:.2f} (better in {e['better_in']} of {e['n']})"
                     + ("" if consistent else ": within the noise of this toy"))
    return lines


def _cell(row, key):
    if row.get(key) is None:
        return "-"
    sd = row.get(key + "_sd")
    return f"{row[key]:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def _paired_cell(row, key):
    p = row.get(f"paired_{key}")
    if not p or p["mean"] is None:
        return "-"
    return f"{p['mean']:+.2f} ± {p['sd']:.2f} ({p['better_in']}/{p['n']})"


def markdown_table(summary):
    header = ["model", "lr"] + [t for _, t, _ in METRICS] + [t for _, t in PAIRED]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    teacher = summary["teacher"]
    lines.append("| " + " | ".join([teacher["name"], "-"] + [_cell(teacher, k) for k, _, _ in METRICS]
                                   + ["-"] * len(PAIRED)) + " |")
    for r in summary["rows"]:
        lr = "-" if not r["lr"] else f"{r['lr']:g}"
        lines.append("| " + " | ".join([r["name"], lr] + [_cell(r, k) for k, _, _ in METRICS]
                                       + [_paired_cell(r, k) for k, _ in PAIRED]) + " |")
    return "\n".join(lines)


def notes(summary):
    s, timing, ident = summary["settings"], summary.get("timing", {}), summary["rkl_identity"]
    out = [
        f"mean ± sd over training seeds {s['seeds']} ({s['n_test']} test prompts); Δ columns: paired per-seed "
        f"difference against FKL, mean ± sd (seeds where the loss was better / seeds)",
        f"every student starts from the same pretrained student ({s['pretrain_steps']} plain-text LM steps) except "
        f"the random-start row; {s['student_steps']} distillation steps; learning rate chosen per loss from "
        f"{s['lr_grid']} by greedy ROUGE-L on {s['n_dev']} dev prompts",
        "sampled: temperature 1, top-p 1, one sample per prompt with the run's seed; exact match and teacher "
        "agreement: greedy; held-out FKL / RKL (nats per token) and top-1: teacher-forced on the test responses "
        "against the cached teacher logits",
        f"RKL vs SS-CSD (τ = 1): the same gradient (max |diff| {ident['max_abs_diff']:.1e}, "
        f"{ident['relative']:.1e} of the largest entry), so RKL is not a separate contestant",
    ]
    if timing:
        out.append(f"wall time {timing['wall_s']:.0f} s with {timing['workers']} worker process(es); CPU time of "
                   f"the student runs {timing['student_runs_cpu_s']:.0f} s; teacher "
                   f"{'from the cache' if timing['teacher_cached'] else 'trained now'}, pretrained student "
                   f"{'from the cache' if timing['student_cached'] else 'trained now'}; load average at the end "
                   f"{timing['load_average_at_end']:.1f}"
                   + (f"; when trained, the teacher took {timing['teacher_cpu_s']:.0f} CPU s and the pretrained "
                      f"student {timing['pretrain_cpu_s']:.0f}" if timing.get("teacher_cpu_s") and
                      timing.get("pretrain_cpu_s") else ""))
    return out


def write_report(out_dir, summary):
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(summary)
    text = table + "\n\n**Who wins:**\n\n" + "\n".join(f"- {v}" for v in summary["verdict"]) + "\n\n" + \
        "\n".join(f"- {n}" for n in notes(summary)) + "\n"
    per_task = ["", "| model | " + " | ".join(sorted(summary["teacher"]["exact_match_per_task"])) + " |"]
    per_task.append("|" + "|".join("---" for _ in range(len(summary["teacher"]["exact_match_per_task"]) + 1)) + "|")
    for r in [summary["teacher"]] + summary["rows"]:
        per_task.append(f"| {r['name']} | " + " | ".join(f"{v:.1f}" for _, v in sorted(
            r["exact_match_per_task"].items())) + " |")
    text += "\nGreedy exact match % per task (mean over seeds):\n" + "\n".join(per_task) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    return text
