"""``csd-distill --preset tiny``: the whole distillation recipe at toy scale on a CPU.

1. synthetic instruction data (tasks.py) written as Dolly JSONL;
2. a byte-level BPE trained on it;
3. a tiny GPT-2 teacher trained by SFT (kd_ratio 0);
4. students from one shared random initialisation, distilled from the teacher
   with CSD and with each baseline loss (kd_ratio as configured, 1 by default);
5. every model evaluated on held-out prompts; table, JSON and plot written.

Each stage runs through the same code as a real run (JSONL loader, the
accelerate loop, the evaluation), only the models and data are made here.
"""

import json
import os
import time

import torch

from ..data import build_prompt
from ..evaluate import normalise_text
from ..logging_utils import info
from ..report import plot_training_curves, write_results
from ..run import evaluate_all, replace, train_from_config
from .tasks import make_dataset
from .tokenizer import train_bpe


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def make_gpt2(tokenizer, layers, dim, heads, n_positions, seed, save_dir):
    """A randomly initialised GPT-2 saved as an HF directory (with the tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # No dropout: a few hundred steps on a few thousand short examples do not overfit.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=dim, n_layer=layers,
                        n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return sum(p.numel() for p in model.parameters())


def per_task_accuracy(eval_records, greedy_outputs):
    """Greedy exact match (%) per task, for the JSON report."""
    out = {}
    for task in sorted({r["task"] for r in eval_records}):
        pairs = [(g, r["response"]) for r, g in zip(eval_records, greedy_outputs) if r["task"] == task]
        out[task] = 100.0 * sum(normalise_text(g) == normalise_text(ref) for g, ref in pairs) / len(pairs)
    return out


def pick_threads(requested):
    """CPU threads for the demo.

    PyTorch's OpenMP threads spin while they wait for each other; when other
    processes already keep the cores busy, two spinning threads on two cores
    run several times slower than one (measured: 3.8 s vs 1.2 s per teacher
    step under a load of ~5 on 2 cores).  So, unless told, use only the cores
    the 1-minute load average leaves free.
    """
    if requested > 0:
        return requested, "as configured"
    default = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return default, "default"
    free = max(1, min(default, int((os.cpu_count() or default) - load + 0.5)))
    return free, f"load average {load:.1f} on {os.cpu_count()} cores"


def run_tiny(cfg):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars of tiny models are noise
    start = time.time()
    t = cfg.tiny
    out = cfg.output_dir
    info(f"tiny demo in {out}: data, tokenizer and models are all made here; nothing is downloaded")
    torch.manual_seed(cfg.seed)
    threads, why = pick_threads(t.threads)
    torch.set_num_threads(threads)
    info(f"using {threads} CPU thread(s) ({why}; set tiny.threads to override)")

    # Under torchrun the process group starts here; rank 0 alone writes the data, tokenizer
    # and initial models, the other ranks wait for them and read the saved tokenizer.
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    train_records, eval_records = make_dataset(t.n_train, t.n_eval, t.tasks, seed=cfg.seed)
    train_path, eval_path = os.path.join(out, "data", "train.jsonl"), os.path.join(out, "data", "eval.jsonl")
    teacher_init, student_init = os.path.join(out, "teacher-init"), os.path.join(out, "student-init")
    if state.is_main_process:
        write_jsonl(train_path, train_records)
        write_jsonl(eval_path, eval_records)
        texts = [build_prompt(r, cfg.prompt_template) + r["response"] for r in train_records]
        tokenizer = train_bpe(texts, t.vocab_size, save_dir=os.path.join(out, "tokenizer"))
        make_gpt2(tokenizer, t.teacher_layers, t.teacher_dim, t.teacher_heads, t.n_positions, cfg.seed,
                  teacher_init)
        make_gpt2(tokenizer, t.student_layers, t.student_dim, t.student_heads, t.n_positions, cfg.seed + 1,
                  student_init)
    state.wait_for_everyone()
    if not state.is_main_process:
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(os.path.join(out, "tokenizer"))
    info(f"data: {len(train_records)} training / {len(eval_records)} held-out examples of tasks "
         f"{', '.join(t.tasks)}; BPE vocabulary {len(tokenizer)}")

    base = replace(cfg, pipeline="distill", train_data=train_path, eval_data=eval_path, tokenizer=None,
                   max_steps=0, eval_max_examples=len(eval_records))

    # 1. The teacher: SFT on the references (no KD).
    teacher_cfg = replace(base, teacher=None, student=teacher_init, kd_ratio=0.0, lr=t.teacher_lr,
                          max_steps=t.teacher_steps, output_dir=os.path.join(out, "teacher"))
    got = train_from_config(teacher_cfg, run_name="teacher (SFT)")
    teacher_dir = got["result"]["final_dir"]
    models = [("teacher", got["student"], {"val_ce": got["result"]["val_ce"],
                                           "train_seconds": got["result"]["train_seconds"]})]
    metrics = {"teacher (SFT)": os.path.join(teacher_cfg.output_dir, "metrics.jsonl")}
    eval_items, mixed_precision = got["eval_items"], got["mixed_precision"]

    # 2. Students from one initialisation: CSD, then each baseline.
    losses = [(cfg.loss, dict(cfg.loss_args))] + [(name, {}) for name in t.baselines]
    for loss, loss_args in losses:
        tag = loss + ("-" + "-".join(f"{k}{v}" for k, v in sorted(loss_args.items())) if loss_args else "")
        run_cfg = replace(base, teacher=teacher_dir, student=student_init, loss=loss, loss_args=loss_args,
                          lr=t.student_lr, max_steps=t.student_steps, output_dir=os.path.join(out, f"student-{tag}"))
        name = f"student {loss.upper()}" + (f" {loss_args.get('weighting', '')}".rstrip() if loss == "csd" else "")
        got = train_from_config(run_cfg, run_name=name)
        models.append((name, got["student"], {"val_ce": got["result"]["val_ce"],
                                              "val_kd": got["result"].get("val_kd"),
                                              "train_seconds": got["result"]["train_seconds"]}))
        metrics[name] = os.path.join(run_cfg.output_dir, "metrics.jsonl")

    # 3. Evaluation of all three on the same held-out prompts.
    rows, greedy = evaluate_all(base, models, tokenizer, eval_items, out, mixed_precision, teacher_name="teacher")
    for row in rows:
        if greedy.get(row["name"]) is not None and len(eval_items) == len(eval_records):
            row["greedy_exact_match_per_task"] = per_task_accuracy(eval_records, greedy[row["name"]])
    if not state.is_main_process:
        return rows
    elapsed = time.time() - start
    notes = [
        f"{len(eval_items[: base.eval_max_examples])} held-out prompts; sampled columns: temperature 1, top-p 1, "
        f"mean over seeds {list(base.eval_seeds)} (± population sd over seeds)",
        "exact match: normalised string equality with the reference; 'agrees w/ teacher': greedy output "
        "identical to the teacher's greedy output",
        f"teacher: GPT-2 {t.teacher_layers} layers d={t.teacher_dim}, SFT {t.teacher_steps} steps; students: "
        f"GPT-2 {t.student_layers} layers d={t.student_dim} from one random init, {t.student_steps} steps, "
        f"kd_ratio {cfg.kd_ratio}",
        f"whole run: {elapsed:.0f}s wall time on {torch.get_num_threads()} CPU thread(s)",
    ]
    table = write_results(out, rows, notes)
    png = plot_training_curves(metrics, os.path.join(out, "training_curves.png"),
                               title="tiny demo: teacher SFT and distilled students")
    print("\n" + table, flush=True)
    for n in notes:
        print(f"  {n}")
    info(f"results: {os.path.join(out, 'results.md')}, plot: {png}")
    return rows
