"""Turns bench_loss.py's measurements into the markdown table, the target
check, the linear-growth fit and plot, and benchmarks/RESULTS.md."""

import os
import statistics

MIB = 1 << 20
PASS_NAME = {"fwdbwd": "fwd+bwd", "fwd": "fwd"}
# Slack for "O(N)" allocations and measurement granularity (pages, thread
# stacks, Python objects) in the memory targets.
MEMORY_SLACK = 2 * MIB


def _stats(result, mode):
    times = (result or {}).get("times_ms", {}).get(mode)
    if not times:
        return None
    return statistics.median(times), min(times), max(times)


def _ms(s):
    if s is None:
        return "n/a"
    med, lo, hi = s
    fmt = (lambda x: f"{x:.1f}") if med >= 10 else (lambda x: f"{x:.2f}")
    return f"{fmt(med)} ({fmt(lo)}–{fmt(hi)})"


def _mem(result, mode):
    b = (result or {}).get("memory_bytes", {}).get(mode)
    return "n/a" if b is None else f"{b / MIB:.1f}"


def roofline(row, mode, median_ms, args):
    """(achieved GB/s, fraction of the roofline) for the bytes the design must move."""
    nbytes = row["bytes"][mode]
    achieved = nbytes / median_ms / 1e6
    if args.device == "cuda":
        peak = args.hbm_gbs or row["bandwidth"]["copy_gbs"]
    else:
        peak = max(row["bandwidth"]["read_gbs"], row["bandwidth"]["copy_gbs"])
    return achieved, achieved / peak


BASELINES = ("paper_eager", "paper_compile", "lean_eager", "lean_compile")
CONTENDERS = ("csd_ext",) + BASELINES
LABEL = {"csd_ext": "csd_ext", "paper_eager": "paper eager", "paper_compile": "paper compile",
         "lean_eager": "lean eager", "lean_compile": "lean compile"}


def best_baseline(stats, mode_kind):
    """(name, stats) of the faster of the paper-style and lean formulations,
    eager (mode_kind "eager") or compiled ("compile"); (None, None) if neither ran."""
    timed = [(stats[c][0], c) for c in (f"paper_{mode_kind}", f"lean_{mode_kind}") if stats.get(c)]
    if not timed:
        return None, None
    name = min(timed)[1]
    return name, stats[name]


def table_rows(report, args):
    """One dict per (configuration, pass), with the formatted cells."""
    out = []
    for row in report["rows"]:
        res = row["results"]
        for mode in ("fwdbwd", "fwd"):
            st = {c: _stats(res.get(c), mode) for c in CONTENDERS}
            cells = {"config": f"{row['N']}×{row['V']}", "dtype": row["dtype"], "w": row["weighting"],
                     "pass": PASS_NAME[mode]}
            for c in CONTENDERS:
                cells[c] = _ms(st[c]) if c in res else "—"
                if c in res and "error" in res[c]:
                    cells[c] = "error"
            ours = st["csd_ext"]
            for kind in ("eager", "compile"):
                name, best = best_baseline(st, kind)
                cells["x_" + kind] = (f"{best[0] / ours[0]:.1f}× ({name.split('_')[0]})" if ours and best
                                      else "n/a")
            if ours:
                gbs, frac = roofline(row, mode, ours[0], args)
                cells["gbs"], cells["roof"] = f"{gbs:.1f}", f"{100 * frac:.0f}%"
            else:
                cells["gbs"] = cells["roof"] = "n/a"
            cells["mem"] = " / ".join(_mem(res.get(c), mode) if c in res else "—" for c in CONTENDERS)
            gc = row.get("grad_check") or {}
            if mode == "fwdbwd" and gc.get("max_rel_diff"):
                worst = max(gc["max_rel_diff"].values())
                cells["grad"] = (f"ok ({worst:.0e})" if gc["ok"] else f"MISMATCH ({worst:.1e})")
            else:
                cells["grad"] = ""
            out.append({"row": row, "mode": mode, "stats": st, "cells": cells})
    return out


HEADER = (["N×V", "dtype", "w", "pass"] + [LABEL[c] + " ms" for c in CONTENDERS]
          + ["vs best eager", "vs best compile", "csd_ext GB/s", "roofline",
             "extra MiB " + " / ".join(LABEL[c] for c in CONTENDERS), "grad check"])
KEYS = (["config", "dtype", "w", "pass"] + list(CONTENDERS)
        + ["x_eager", "x_compile", "gbs", "roof", "mem", "grad"])


def format_table(report, args):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in table_rows(report, args):
        lines.append("| " + " | ".join(r["cells"][k] for k in KEYS) + " |")
    return "\n".join(lines)


def format_latency_table(report):
    """Single synchronized calls (recorded when samples were batched, i.e. on
    CUDA): the cost of a lone call, with the host's dispatch and launch
    overhead that a batch hides behind the GPU's work.  Empty if none."""
    lines = []
    for row in report["rows"]:
        res = row["results"]
        for mode in ("fwdbwd", "fwd"):
            cells = []
            for c in CONTENDERS:
                times = (res.get(c) or {}).get("latency_ms", {}).get(mode)
                cells.append(_ms((statistics.median(times), min(times), max(times))) if times else "—")
            if any(cell != "—" for cell in cells):
                lines.append(f"| {row['N']}×{row['V']} | {row['dtype']} | {row['weighting']} | {PASS_NAME[mode]} | "
                             + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["| N×V | dtype | w | pass | " + " | ".join(LABEL[c] + " ms" for c in CONTENDERS) + " |",
            "|" + "---|" * (4 + len(CONTENDERS))]
    return "\n".join(head + lines)


# ---------------------------------------------------------------------------
# Targets (issue 4), checked on the configurations that are present.
# ---------------------------------------------------------------------------
def target_lines(report, args):
    """The CPU targets (for the 2-core CPU machine).  Issue 13's is set against
    the lean formulation under torch.compile; issue 4's were set against the
    paper-style formulation and are labelled so."""
    if args.device != "cpu":
        return []
    rows = {(r["row"]["N"], r["row"]["V"], r["row"]["dtype"], r["row"]["weighting"], r["mode"]): r
            for r in table_rows(report, args)}
    lines = []

    def verdict(ok):
        return "**met**" if ok else "**missed**"

    def ratio(st, c):
        return st[c][0] / st["csd_ext"][0] if st.get(c) and st.get("csd_ext") else None

    flag = rows.get((512, 50257, "bf16", "SS", "fwdbwd"))
    if flag and flag["stats"]["csd_ext"]:
        st = flag["stats"]
        ours = st["csd_ext"][0]
        x = ratio(st, "lean_compile")
        if x is not None:
            lines.append(f"- issue 13: SS bf16 512×50257 fwd+bwd, ≥ 2.5× faster than the lean formulation under "
                         f"torch.compile: {x:.2f}× — {verdict(x >= 2.5)}")
        for kind in ("compile", "eager"):
            name, best = best_baseline(st, kind)
            if best:
                lines.append(f"- SS bf16 512×50257 fwd+bwd against the faster {kind} baseline ({LABEL[name]}): "
                             f"{best[0] / ours:.1f}×")
        x = ratio(st, "paper_compile")
        if x is not None:
            lines.append(f"- issue 4 (against the paper-style formulation): SS bf16 512×50257 fwd+bwd, ≥ 4× faster "
                         f"than its torch.compile: {x:.1f}× — {verdict(x >= 4)}")
        x = ratio(st, "paper_eager")
        if x is not None:
            lines.append(f"- issue 4 (against the paper-style formulation): SS bf16 512×50257 fwd+bwd, ≥ 25× faster "
                         f"than it eager: {x:.1f}× — {verdict(x >= 25)}")
        gbs, frac = roofline(flag["row"], "fwdbwd", ours, args)
        lines.append(f"- ≥ 50% of the bandwidth roofline (csd_ext's fwd+bwd moves {flag['row']['bytes']['fwdbwd'] / 1e6:.0f} MB): "
                     f"{100 * frac:.0f}% ({gbs:.1f} GB/s) — {verdict(frac >= 0.5)}")
        mem = flag["row"]["results"]["csd_ext"].get("memory_bytes", {})
        grad_bytes = 512 * 50257 * 2
        if "fwdbwd" in mem:
            ok = mem["fwdbwd"] <= grad_bytes + MEMORY_SLACK
            lines.append(f"- extra peak memory ≤ gradient ({grad_bytes / MIB:.1f} MiB) + O(N): "
                         f"{mem['fwdbwd'] / MIB:.1f} MiB — {verdict(ok)}")
        if "fwd" in mem:
            ok = mem["fwd"] <= MEMORY_SLACK
            lines.append(f"- forward on a no-grad input allocates only O(N): {mem['fwd'] / MIB:.2f} MiB extra — "
                         f"{verdict(ok)}")
    for w in ("TS", "US", "MM"):
        r = rows.get((512, 50257, "bf16", w, "fwdbwd"))
        if r and r["stats"]["csd_ext"]:
            name, best = best_baseline(r["stats"], "compile")
            if best:
                x = best[0] / r["stats"]["csd_ext"][0]
                lines.append(f"- {w} bf16 512×50257 fwd+bwd against the faster torch.compile ({LABEL[name]}): "
                             f"{x:.1f}× (issue 4 asked ≥ 3× of the paper-style one)")
    return lines


# ---------------------------------------------------------------------------
# Linear growth: fit and plot.
# ---------------------------------------------------------------------------
def linear_fit(xs, ys):
    """Least squares y = a x + b, and R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return None
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    b = my - a * mx
    ss_res = sum((y - (a * x + b)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, (1 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def growth_series(report, weighting):
    """{dtype: {contender: [(N*V, median ms)]}} for fwd+bwd."""
    series = {}
    for row in report["rows"]:
        if row["weighting"] != weighting:
            continue
        for c, res in row["results"].items():
            st = _stats(res, "fwdbwd")
            if st:
                series.setdefault(row["dtype"], {}).setdefault(c, []).append((row["N"] * row["V"], st[0]))
    for per in series.values():
        for pts in per.values():
            pts.sort()
    return series


def plot_growth(report, path, weighting):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = growth_series(report, weighting)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
    style = {"csd_ext": ("tab:green", "o"), "paper_compile": ("tab:blue", "s"), "paper_eager": ("tab:red", "^"),
             "lean_compile": ("tab:purple", "D"), "lean_eager": ("tab:orange", "v")}
    fits = {}
    for ax, (dtype, per) in zip(axes[0], sorted(series.items())):
        for c, pts in per.items():
            color, marker = style.get(c, ("gray", "x"))
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker=marker, color=color, linestyle="none", label=c)
            fit = linear_fit(xs, ys)
            if fit:
                fits[(dtype, c)] = fit
                lo, hi = min(xs), max(xs)
                grid = [lo + (hi - lo) * i / 50 for i in range(51)]
                ax.plot(grid, [fit[0] * x + fit[1] for x in grid], color=color, linewidth=1,
                        linestyle="--" if c == "csd_ext" else ":",
                        label=f"{c} fit: {fit[0] * 1e6:.2f} ns/elem, R²={fit[2]:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N·V (logit entries)")
        ax.set_ylabel("fwd+bwd time, median (ms)")
        ax.set_title(f"{weighting}, {dtype}, {report['args']['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fits


# ---------------------------------------------------------------------------
# RESULTS.md
# ---------------------------------------------------------------------------
def write_results(report, args):
    m = report["machine"]
    plot_w = "SS" if "SS" in args.weightings else args.weightings[0]
    fits = plot_growth(report, args.plot, plot_w) if args.plot else None
    bws = {}
    for row in report["rows"]:
        bws[row["bandwidth"]["working_set_bytes"]] = row["bandwidth"]
    out = ["# csd_ext loss benchmark", "",
           "Generated by `benchmarks/bench_loss.py`; rerun it to refresh this file. "
           "Notes on the CPU kernel, what limits it and what was tried: "
           "[CPU_KERNEL_NOTES.md](CPU_KERNEL_NOTES.md). Other results: fused linear + CSD in "
           "[RESULTS_fused_linear.md](RESULTS_fused_linear.md) (`bench_fused_linear.py`), "
           "the CUDA kernels on an H200 in [RESULTS_cuda.md](RESULTS_cuda.md).", "",
           "## Run", "",
           "```", report["command"], "```", "",
           f"- started {report['started_utc']}, finished {report['finished_utc']}",
           f"- commit: {m.get('commit')}",
           f"- machine: {m.get('cpu')}, {m.get('cpus')} CPUs ({m.get('threads_per_core')} thread(s) per core), "
           f"L2 {m.get('l2')}, L3 {m.get('l3')}" + (f"; GPU {m['gpu']} (CUDA {m['cuda']})" if m.get("gpu") else ""),
           f"- torch {m['torch']}, {m['threads']} threads, Python {m['python']}, {m['platform']}",
           f"- csd_ext CPU kernel variant: `{m['csd_ext_cpu_isa']}` (torch.ops.csd_ext.cpu_kernel_isa()); "
           f"backends {m['csd_ext_backends']}",
           f"- transparent huge pages: `{m.get('thp')}`" + ("; contenders ran with THP_MEM_ALLOC_ENABLE=1"
                                                          if args.thp else ""),
           f"- load average (1/5/15 min) before: {report['load_before']}, after: {report['load_after']} "
           "— other jobs shared the machine when this is well above 0; compare ratios within this run.",
           "", "## Method", "",
           "- Contenders: **csd_ext** (`csd_loss`, mean over valid tokens); two PyTorch formulations of the same "
           "loss, each eager and under `torch.compile` (compiled before timing; the first call is not timed): "
           "**paper**, the official code's formulation (`benchmarks/paper_style.py`: `z / τ`, fp32 upcast copies, "
           "full [N, V] weight tensors, detached-weight surrogate Σ g·z in fp32), and **lean**, the strongest "
           "twenty lines a user could write (`benchmarks/lean.py`: `softmax(z, -1, dtype=float32)`, no `/τ` at "
           "τ = 1, g formed without grad and cast to the student's dtype, surrogate `(g * z).sum(-1)` on the "
           "student's dtype). Both have csd_ext's gradient. Speedups (`vs best eager`, `vs best compile`) are "
           "against the faster of the two formulations, named in brackets.",
           f"- Inputs: student/teacher logits ~ N(0, 3²) with the student = teacher + N(0, 1.5²), "
           f"{100 * args.ignore_frac:.0f}% of labels ignored, temperature {args.temperature}, α = {args.alpha} (M).",
           f"- Time: wall clock per call ({'CUDA events after a synchronize' if args.device == 'cuda' else 'perf_counter'}), "
           + (f"each sample {args.batch} back-to-back calls divided by {args.batch} (the time per call of a "
              "training loop, where the host queues each call while the GPU runs the previous one: the GPU's "
              "time, or the host's per-call dispatch and launch time where that is longer; a lone synchronized "
              "call, which pays both in turn, is in the single-call latency table below the results), "
              if args.batch > 1 else "")
           + f"after the compiling call and {args.warmup} warm-up call(s); at least {args.min_repeats} repeats and "
           f"{args.min_time} s per contender and pass; median (min–max). fwd+bwd = forward + `backward()` with the "
           "student requiring grad (its previous `.grad` freed before the timer starts); fwd = forward under "
           "`torch.no_grad()`.",
           "- Speedups are ratios of medians from this run"
           + (f"; the contenders ran in {args.rounds} interleaved rounds per configuration (csd_ext, then each "
              "baseline, repeated), and each median is over all rounds' samples, so that a change in the "
              "machine's load hits every contender alike." if getattr(args, "rounds", 1) > 1 else "."),
           "- Peak extra memory: each contender runs in its own subprocess; after the timing runs, freed heap "
           "memory is returned to the OS (`malloc_trim`), the peak RSS is reset (`/proc/self/clear_refs`), and "
           "extra = peak RSS (VmHWM) during one call − RSS just before it, with the inputs allocated. fwd+bwd "
           "includes the gradient it produces. On CUDA: `max_memory_allocated()` − `memory_allocated()`.",
           "- Bytes csd_ext's design must move (b = bytes per element): the forward reads both logit tensors "
           "(2·N·V·b). " + ("For fwd+bwd csd_ext runs fused here (`csd_forward_grad`: the gradient is written "
                            "in the forward while each row is in cache and the backward hands it over), so "
                            "fwd+bwd reads both tensors once and writes the gradient: 3·N·V·b. (The two-pass "
                            "design — a backward that re-reads both tensors — would move 5·N·V·b.) "
                            if report.get("fused") else
                            "fwd+bwd also re-reads them in the backward and writes the gradient: 5·N·V·b. ")
           + "Freshly allocated gradient pages are zeroed by the OS on first touch; that write is not counted. "
           + ("Roofline on CUDA: achieved GB/s against " + (f"the nominal {args.hbm_gbs} GB/s HBM bandwidth."
                                                            if args.hbm_gbs else "the measured copy bandwidth.")
              if args.device == "cuda" else
              "Roofline on CPU: the larger of two bandwidths measured in this run on a working set the size of "
              "the forward's reads — a `sum` (read GB/s) and a `copy_` into an existing buffer (read+write "
              "GB/s); time floor = bytes / bandwidth, and the fraction = floor / csd_ext's median."),
           "- Gradient check: before timing, each contender's gradient (first rows) is compared with csd_ext's; "
           "`grad check` is the largest difference relative to the gradient's max.",
           "", "Measured bandwidth:", "",
           "| working set | read (sum) GB/s | copy GB/s |", "|---|---|---|"]
    for size, bw in sorted(bws.items()):
        out.append(f"| {size / MIB:.0f} MiB | {bw['read_gbs']:.1f} | {bw['copy_gbs']:.1f} |")
    targets = target_lines(report, args)
    if targets:
        out += ["", "## Targets", ""] + targets
    out += ["", "## Results", "", format_table(report, args), ""]
    latency = format_latency_table(report)
    if latency:
        out += ["Single-call latency (one synchronized call at a time; host overhead included):", "", latency, ""]
    errors = [(f"{r['N']}×{r['V']} {r['dtype']} {r['weighting']}", c, res["error"][:300])
              for r in report["rows"] for c, res in r["results"].items() if "error" in res]
    if errors:
        out += ["Errors:", ""] + [f"- {k} {c}: `{e}`" for k, c, e in errors] + [""]
    if fits is not None:
        out += ["## Linear growth", "",
                f"![fwd+bwd time against N·V]({os.path.basename(args.plot)})", "",
                f"Least-squares fit time = a·(N·V) + b of the fwd+bwd medians ({plot_w}):", "",
                "| dtype | contender | a (ns per entry) | b (ms) | R² |", "|---|---|---|---|---|"]
        for (dtype, c), (a, b, r2) in sorted(fits.items()):
            out.append(f"| {dtype} | {c} | {a * 1e6:.3f} | {b:.2f} | {r2:.4f} |")
        if not fits:
            out.append("| (a fit needs at least two sizes) | | | | |")
        out.append("")
    with open(args.output, "w") as f:
        f.write("\n".join(out))
