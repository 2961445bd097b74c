"""``csd-distill evaluate``: evaluation only, several models x several test sets x several seeds, one table.

    csd-distill evaluate --model runs/gpt2-xl-to-gpt2/best \
        --eval-data dolly.jsonl,selfinst.jsonl,vicuna.jsonl,sni.jsonl,unni.jsonl
    csd-distill evaluate --model A --model B --eval-data x.jsonl --preset gpt2-xl-to-gpt2 --eval-seeds 10,20,30,40,50

Generation settings (template, seeds, new tokens, n-gram blocking, stop
strings, answer format) come from ``--preset``/``--config`` and the flags
below, as in training; the default is the paper's task-agnostic protocol
(MiniLLM template, sampling at temperature 1 with seeds 10..50, 256 new
tokens, no repeated 6-grams, ROUGE-L with stemming).  The table has one row per
model and, per set, ROUGE-L as the mean +- sd over seeds, then the average
over sets (the paper's headline number).  Under torchrun the prompts are
split across processes.
"""

import argparse
import json
import os
import statistics
import sys

import yaml

from .config import ConfigError, DistillConfig, apply_updates, read_yaml
from .data import DataError, encode_dataset
from .eval_sets import load_eval_set
from .models import ModelError

FLAGS = {  # flag -> (config key, parser); every one overrides the preset
    "--eval-seeds": ("eval_seeds", str),
    "--eval-max-examples": ("eval_max_examples", int),
    "--eval-batch-size": ("eval_batch_size", int),
    "--max-new-tokens": ("max_new_tokens", int),
    "--no-repeat-ngram-size": ("no_repeat_ngram_size", int),
    "--prompt-template": ("eval_prompt_template", str),
    "--answer-format": ("answer_format", str),
    "--max-prompt-length": ("max_prompt_length", int),
    "--max-length": ("max_length", int),
    "--mixed-precision": ("mixed_precision", str),
    "--tokenizer": ("tokenizer", str),
    "--output-dir": ("output_dir", str),
}


def build_parser():
    p = argparse.ArgumentParser(prog="csd-distill evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="a model directory or HF id (repeat, or comma-separate, for several)")
    p.add_argument("--eval-data", required=True, help="comma-separated JSONL test sets (csd_ext/distill/eval_sets.py)")
    p.add_argument("--preset", help="take generation settings from this preset (or YAML file)")
    p.add_argument("--config", help="a YAML file of config keys, over the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    p.add_argument("--eval-greedy", action=argparse.BooleanOptionalAction, default=None,
                   help="also decode greedily (exact match)")
    p.add_argument("--stop-strings", help="comma-separated; YAML escapes allowed, e.g. '\\n\\n'")
    for flag, (key, typ) in FLAGS.items():
        p.add_argument(flag, dest=key, type=typ, default=None, help=f"config key {key}")
    return p


def eval_config(args):
    cfg = DistillConfig(output_dir="runs/evaluate")
    for source in (args.preset, args.config):
        if source:
            data, label = read_yaml(source)
            data = {k: v for k, v in data.items() if k != "smoke"}
            apply_updates(cfg, data, label)
    overrides = {key: getattr(args, key) for key, _ in FLAGS.values() if getattr(args, key) is not None}
    if args.eval_greedy is not None:
        overrides["eval_greedy"] = args.eval_greedy
    if args.stop_strings is not None:
        overrides["stop_strings"] = [yaml.safe_load(f'"{s}"') for s in args.stop_strings.split(",") if s]
    apply_updates(cfg, overrides, "command line")
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        apply_updates(cfg, {key: yaml.safe_load(raw)}, f"--set {item}")
    if not cfg.eval_seeds and not cfg.eval_greedy:
        raise ConfigError("nothing to evaluate: give --eval-seeds (sampling) or --eval-greedy")
    return cfg


def _cell(r):
    if r.get("rougeL") is not None:
        return f"{r['rougeL']:.2f} ± {r['rougeL_sd']:.2f}"
    return f"{r['greedy_rougeL']:.2f} (greedy)"


def results_table(models, sets, results, markdown=True):
    """One row per model: ROUGE-L per set (mean ± sd over seeds), then the mean over sets."""
    header = ["model"] + sets + ["average"]
    body = []
    for m in models:
        cells = [_cell(results[m][s]) for s in sets]
        means = [results[m][s].get("rougeL", results[m][s].get("greedy_rougeL")) for s in sets]
        body.append([m] + cells + [f"{statistics.mean(means):.2f}"])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [header] + body)


def run_evaluate(cfg, model_names, data_paths, log=print):
    """{model: {set: result row}} (evaluate.evaluate_model's rows); writes the table and JSON."""
    import torch
    from accelerate import PartialState

    from .evaluate import evaluate_model
    from .models import load_causal_lm, load_tokenizer, resolve_mixed_precision, resolve_teacher_dtype

    state = PartialState(cpu=not torch.cuda.is_available())
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    template = cfg.eval_prompt_template or cfg.prompt_template
    sets = [load_eval_set(p) for p in data_paths]
    names = [n for n, _ in sets]
    if len(set(names)) != len(names):
        names = [os.path.splitext(p)[0].replace(os.sep, "/") for p in data_paths]
    results, extra_rows = {}, []
    for model_name in model_names:
        tokenizer = load_tokenizer(cfg.tokenizer or model_name)
        model = load_causal_lm(model_name, dtype=resolve_teacher_dtype("auto", mixed_precision)).to(state.device)
        results[model_name] = {}
        for set_name, (_, records) in zip(names, sets):
            items = encode_dataset(tokenizer, records, template=template, max_length=cfg.max_length,
                                   max_prompt_length=cfg.max_prompt_length, what=f"{set_name}", log=log)
            items = items[: cfg.eval_max_examples]
            row, _ = evaluate_model(model, tokenizer, items, cfg, name=f"{model_name} | {set_name}",
                                    out_dir=os.path.join(cfg.output_dir, "generations"),
                                    mixed_precision=mixed_precision, log=log)
            results[model_name][set_name] = row
            extra_rows.append(dict(row, model=model_name, set=set_name))
        del model
    if state.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        table = results_table(model_names, names, results)
        notes = [f"ROUGE-L (rouge-score, stemmed) x100; {template} prompt template; "
                 + (f"sampled (temperature 1, top-p 1) with seeds {list(cfg.eval_seeds)}, mean ± population sd over "
                    f"seeds" if cfg.eval_seeds else "greedy decoding")
                 + f"; at most {cfg.eval_max_examples} prompts per set, {cfg.max_new_tokens} new tokens"
                 + (f", no repeated {cfg.no_repeat_ngram_size}-grams" if cfg.no_repeat_ngram_size else "")]
        with open(os.path.join(cfg.output_dir, "eval_results.md"), "w") as f:
            f.write(table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
        with open(os.path.join(cfg.output_dir, "eval_results.json"), "w") as f:
            json.dump({"results": extra_rows, "notes": notes}, f, indent=1)
        print("\n" + results_table(model_names, names, results, markdown=False), flush=True)
        for n in notes:
            print(f"  {n}")
    return results


def main(argv):
    try:
        args = build_parser().parse_args(argv)
        cfg = eval_config(args)
        models = [m for item in args.model for m in item.split(",") if m.strip()]
        paths = [p for p in args.eval_data.split(",") if p.strip()]
        run_evaluate(cfg, models, paths)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"csd-distill evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0
