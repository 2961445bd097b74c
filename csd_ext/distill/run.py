"""The standard pipeline: load pair and data, distil, evaluate, report."""

import dataclasses
import os

import yaml

from .config import to_dict
from .data import encode_dataset, split_holdout
from .sources import load_records
from .evaluate import evaluate_model
from .logging_utils import info, is_main_rank
from .models import count_parameters, load_pair, resolve_mixed_precision, shared_vocab
from .report import plot_training_curves, write_results
from .trainer import train


def save_config(cfg, out_dir):
    if not is_main_rank():
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def load_data(cfg, tokenizer):
    """(train items, eval items), encoded with the configured template and lengths."""
    raw_train = load_records(cfg.train_data)
    if cfg.eval_data:
        raw_eval = load_records(cfg.eval_data)
    else:
        raw_train, raw_eval = split_holdout(raw_train, cfg.eval_holdout)
    if cfg.max_train_examples:
        raw_train = raw_train[: cfg.max_train_examples]
    common = dict(template=cfg.prompt_template, max_length=cfg.max_length,
                  max_prompt_length=cfg.max_prompt_length, log=info)
    train_items = encode_dataset(tokenizer, raw_train, what=f"training data {cfg.train_data}", **common)
    eval_items = encode_dataset(tokenizer, raw_eval, what=f"evaluation data {cfg.eval_data or '(held out)'}",
                                **common)
    return train_items, eval_items


def generation_items(cfg, tokenizer, eval_items):
    """Evaluation prompts for generation: ``eval_items`` unless ``eval_prompt_template`` differs
    from the training template (the paper's GSM8K prompt ``Q: ...\n\nA:``), then re-encoded."""
    template = cfg.eval_prompt_template or cfg.prompt_template
    if template == cfg.prompt_template:
        return eval_items
    raw = load_dolly_jsonl(cfg.eval_data) if cfg.eval_data else split_holdout(
        load_dolly_jsonl(cfg.train_data), cfg.eval_holdout)[1]
    return encode_dataset(tokenizer, raw, template=template, max_length=cfg.max_length,
                          max_prompt_length=cfg.max_prompt_length, log=info,
                          what=f"evaluation prompts ({template} template)")


def train_from_config(cfg, run_name):
    """Load what ``cfg`` names, train, and return everything evaluation needs."""
    if cfg.tensor_parallel:
        from .tensor_parallel import train_from_config_tp

        return train_from_config_tp(cfg, run_name)
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    if cfg.teacher_cache and cfg.kd_ratio > 0:  # the teacher's logits come from disk (teacher_cache.py)
        from .teacher_cache import load_student_and_cache

        teacher, student, tokenizer, vocab = load_student_and_cache(cfg, mixed_precision, log=info)
        train_items, eval_items = load_data(cfg, tokenizer)
        teacher.check_items(train_items + eval_items)
    else:
        teacher, student, tokenizer = load_pair(cfg, mixed_precision, log=info)
        vocab = shared_vocab(teacher, student, tokenizer, log=info)
        train_items, eval_items = load_data(cfg, tokenizer)
    lm_items = None
    if cfg.lm_data:
        from .lm_data import load_lm_data

        lm_items = load_lm_data(cfg.lm_data, tokenizer, cfg.max_length, log=info)
    save_config(cfg, cfg.output_dir)
    result = train(cfg, student, teacher, tokenizer, train_items, eval_items, cfg.output_dir,
                   vocab=vocab, run_name=run_name, lm_items=lm_items)
    return {"result": result, "teacher": teacher, "student": result["model"], "tokenizer": tokenizer,
            "eval_items": generation_items(cfg, tokenizer, eval_items), "mixed_precision": mixed_precision}


def evaluate_all(cfg, models, tokenizer, eval_items, out_dir, mixed_precision, teacher_name=None):
    """Evaluate [(name, model, extra row fields)]; the teacher (if named) goes first so
    the others can be compared with its greedy outputs."""
    items = eval_items[: cfg.eval_max_examples]
    info(f"evaluating {len(models)} model(s) on {len(items)} held-out prompts: "
         f"{len(cfg.eval_seeds)} sampling seed(s){' + greedy' if cfg.eval_greedy else ''}")
    rows, greedy_by_name = [], {}
    for name, model, extra in sorted(models, key=lambda m: m[0] != teacher_name):
        row, greedy = evaluate_model(model, tokenizer, items, cfg, name=name, out_dir=out_dir,
                                     teacher_greedy=greedy_by_name.get(teacher_name),
                                     mixed_precision=mixed_precision, log=info)
        greedy_by_name[name] = greedy
        row["params_m"] = count_parameters(model) / 1e6
        row.update({k: v for k, v in extra.items() if v is not None})
        rows.append(row)
    return rows, greedy_by_name


def run_distill(cfg):
    """``csd-distill`` for a real teacher/student pair."""
    from accelerate import PartialState

    out = cfg.output_dir
    got = train_from_config(cfg, run_name="student")
    result = got["result"]
    models = []
    if got["teacher"] is not None and cfg.eval_teacher and not cfg.teacher_cache:
        models.append(("teacher", got["teacher"], {}))
    student, label = got["student"], f"student ({cfg.loss})"
    if result.get("best_dir"):  # the paper reports the checkpoint with the best dev ROUGE-L
        from .models import load_causal_lm

        student = load_causal_lm(result["best_dir"], dtype=next(student.parameters()).dtype).to(
            next(student.parameters()).device)
        label += f" best@step{result['best']['step']}"
        info(f"evaluating the best dev checkpoint: step {result['best']['step']}, dev ROUGE-L "
             f"{result['best']['dev_rougeL']:.2f} ({result['best_dir']})")
    models.append((label, student, {k: result[k] for k in ("val_ce", "train_seconds") if k in result}))
    # Every rank generates its share of the prompts (evaluate.evaluate_model); rank 0 reports.
    rows, _ = evaluate_all(cfg, models, got["tokenizer"], got["eval_items"], out, got["mixed_precision"],
                           teacher_name="teacher")
    if not PartialState().is_main_process:
        return None
    table = write_results(out, rows, notes=[f"config: {os.path.join(out, 'config.yaml')}"])
    png = plot_training_curves({"student": os.path.join(out, "metrics.jsonl")},
                               os.path.join(out, "training_curves.png"),
                               title=f"{cfg.preset or 'csd-distill'}: {cfg.loss}")
    print(table, flush=True)
    info(f"results: {os.path.join(out, 'results.md')}, plot: {png}, metrics: {os.path.join(out, 'metrics.jsonl')}")
    return rows


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
