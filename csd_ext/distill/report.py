"""Final results table (text, Markdown, JSON) and the PNG plot of the training curves."""

import json
import os

from .logging_utils import read_metrics

# (result key, column title, format)
COLUMNS = [
    ("params_m", "params (M)", "{:.2f}"),
    ("rougeL", "ROUGE-L (sampled)", None),
    ("exact_match", "exact match % (sampled)", "{:.1f}"),
    ("distinct_2", "distinct-2", "{:.1f}"),
    ("greedy_rougeL", "ROUGE-L (greedy)", "{:.2f}"),
    ("greedy_exact_match", "exact match % (greedy)", "{:.1f}"),
    ("teacher_agreement", "agrees w/ teacher % (greedy)", "{:.1f}"),
    ("val_ce", "val CE", "{:.3f}"),
    ("train_seconds", "train s", "{:.0f}"),
]


def _cell(row, key, fmt):
    if key == "rougeL" and "rougeL" in row:
        return f"{row['rougeL']:.2f} ± {row.get('rougeL_sd', 0.0):.2f}"
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def results_table(rows, markdown=False):
    """rows: dicts with 'name' and any of the COLUMNS keys; only columns some row has are shown."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    header = ["model"] + [c[1] for c in cols]
    body = [[r["name"]] + [_cell(r, k, f) for k, _, f in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt_line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt_line(header))
    return "\n".join([rule, fmt_line(header), rule] + [fmt_line(b) for b in body] + [rule])


def write_results(out_dir, rows, notes=()):
    """results.json, results.md; returns the text table."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"results": rows, "notes": list(notes)}, f, indent=1)
    md = results_table(rows, markdown=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n\n" + "\n".join(f"- {n}" for n in notes) + ("\n" if notes else ""))
    return results_table(rows)


def plot_training_curves(metrics_paths, png_path, title="training curves"):
    """One PNG: training CE, KD loss, validation CE and learning rate against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [(axes[0, 0], "ce", "training CE on response tokens"),
              (axes[0, 1], "kd", "KD loss (each run's own loss; scales differ)"),
              (axes[1, 0], "val_ce", "validation CE (teacher-forced)"),
              (axes[1, 1], "lr", "learning rate")]
    for i, (label, path) in enumerate(metrics_paths.items()):
        records = read_metrics(path)
        for ax, key, _ in panels:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, marker="o" if key == "val_ce" else None, markersize=3, label=label,
                        color=f"C{i}")  # one colour per run in every panel
    for ax, key, name in panels:
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimiser step")
        if key == "kd":
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
