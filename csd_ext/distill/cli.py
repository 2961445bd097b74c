"""Command line of ``csd-distill`` / ``python -m csd_ext.distill``.

Every field of DistillConfig is a flag (``--kd-ratio 0.5``, ``--lr 1e-4``,
``--eval-greedy``/``--no-eval-greedy``); flags override the preset.
"""

import argparse
import dataclasses
import sys
import typing

import yaml

from .checkpoint import CheckpointError
from .config import ConfigError, DistillConfig, build_config, preset_names
from .data import DataError
from .distributed import release_process_group
from .models import ModelError

HELP = {
    "teacher": "teacher: HF model id or local directory",
    "student": "student: HF model id or local directory (its initial weights)",
    "tokenizer": "one tokenizer for both models (default: each model's own, which must agree)",
    "train_data": "Dolly, chat ('messages') or prompt-completion records: .jsonl/.json/.parquet/.csv, or a "
                  "datasets save_to_disk directory (DIR:SPLIT for a split)",
    "report_to": "metrics to none | tensorboard | wandb (accelerate trackers; tensorboard under OUTPUT_DIR)",
    "fused_linear": "auto | on | off: CSD from hidden states and LM heads, no [N, V] logits (auto: V >= 100k)",
    "eval_data": "held-out Dolly JSONL (default: the first --eval-holdout training lines)",
    "loss": "KD loss: csd or a baseline (fkl, rkl, skl, jeffreys, tv, js, sfkl, srkl, ab, dld)",
    "kd_ratio": "objective = (1 - kd_ratio) CE + kd_ratio KD",
    "output_dir": "where metrics, checkpoints, results and the plot go",
    "max_steps": "optimiser steps (> 0 overrides --epochs)",
    "eval_seeds": "sampling seeds for evaluation, comma-separated",
    "mixed_precision": "auto | no | fp16 | bf16",
    "student_gen_ratio": "on-policy: per micro-batch, probability that the student samples responses into the "
                         "replay buffer and trains on a batch drawn from it (0: off)",
    "replay_buffer_size": "on-policy replay buffer capacity (FIFO)",
    "lm_data": "plain-text LM data (.jsonl with 'text', or blank-line separated text) for an extra CE term",
    "lm_coef": "weight of the LM data's CE (with --lm-data)",
    "token_mean": "global: KD/CE token mean over all ranks' tokens | per_rank: each rank's own mean",
    "teacher_sharding": "replicate the teacher on every process, or shard it across them (FSDP2)",
    "tensor_parallel": "split teacher and student over the processes with transformers' tp_plan, LM heads "
                       "kept sharded and fed to the vocab-parallel CSD loss (torchrun; docs/parallel.md)",
    "resume": "continue from the newest valid checkpoint in --output-dir",
    "save_every": "write a resumable checkpoint every N optimiser steps (0: none)",
    "teacher_cache": "train from the teacher logits `csd-distill cache-teacher` wrote there; the teacher is not loaded",
}

EXAMPLES = """examples:
  csd-distill --preset tiny                       # CPU demo, ~4 min on 2 cores, nothing downloaded
  csd-distill --preset tiny --smoke               # seconds; for CI
  csd-distill --preset gpt2-xl-to-gpt2 --teacher path/to/gpt2-xl-sft --train-data dolly.jsonl
  csd-distill --preset gemma-7b-it-to-2b-it --train-data gsm8k_train.jsonl --eval-data gsm8k_test.jsonl
  csd-distill --teacher T --student S --train-data d.jsonl --loss csd --loss-arg weighting=TS
  accelerate launch -m csd_ext.distill --preset ...   # or torchrun --nproc_per_node K -m csd_ext.distill
  csd-distill ... --student-gen-ratio 1 --lm-data owt.jsonl   # on-policy (ImitKD) with an LM loss
  csd-distill ... --save-every 500 --resume                   # continue a killed run
  csd-distill evaluate --model DIR --eval-data dolly.jsonl,selfinst.jsonl --eval-seeds 10,20,30   # evaluation only
  csd-distill cache-teacher --teacher T --train-data d.jsonl --output cache --top-k 0   # teacher logits to disk
  csd-distill --student S --train-data d.jsonl --teacher-cache cache                   # train without the teacher
"""


def _base_type(annotation):
    if typing.get_origin(annotation) is typing.Union:
        return [a for a in typing.get_args(annotation) if a is not type(None)][0], True
    return annotation, False


def _parse_value(raw, base, optional):
    """A CLI string -> the field's type; the config check gives the error message."""
    if optional and raw.lower() in ("none", "null"):
        return None
    try:
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        return raw  # left for the config check to reject with the key's name
    if base in (dict, list):
        return yaml.safe_load(raw) if base is dict else raw
    return raw


def build_parser(prog="csd-distill"):
    parser = argparse.ArgumentParser(
        prog=prog, description="Distil a causal LM into a smaller one with Concrete Score Distillation "
        "(or a baseline loss), then evaluate and report.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    parser.add_argument("--config", help="a YAML file of config keys, applied over the preset")
    parser.add_argument("--smoke", action="store_true", help="a very short run (the preset's smoke: section)")
    parser.add_argument("--full", action="store_true", help="a longer, stronger run (the preset's full: section)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, including tiny.* (YAML value), e.g. --set tiny.teacher_steps=50")
    parser.add_argument("--loss-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a hyper-parameter of the KD loss, e.g. --loss-arg weighting=TS --loss-arg temperature=1.5")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--list-losses", action="store_true", help="print the KD losses and exit")
    hints = typing.get_type_hints(DistillConfig)
    group = parser.add_argument_group("config keys (override the preset)")
    for f in dataclasses.fields(DistillConfig):
        if f.name in ("tiny", "preset", "loss_args"):
            continue
        base, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = HELP.get(f.name, f"config key {f.name}")
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=base.__name__.upper(),
                               help=help_text)
    return parser


def parse_config(argv=None, extend_parser=None, prog="csd-distill", fill=None):
    """(args, config); ``extend_parser`` adds a subcommand's own flags, ``fill`` config keys not given."""
    parser = build_parser(prog)
    if extend_parser is not None:
        extend_parser(parser)
    args = parser.parse_args(argv)
    if args.list_presets or args.list_losses:
        return args, None
    hints = typing.get_type_hints(DistillConfig)
    overrides = {}
    for f in dataclasses.fields(DistillConfig):
        if hasattr(args, f.name) and f.name not in ("preset",):
            value = getattr(args, f.name)
            if isinstance(value, str):
                value = _parse_value(value, *_base_type(hints[f.name]))
            overrides[f.name] = value
    for key, value in (fill or {}).items():
        overrides.setdefault(key, value)
    loss_args = {}
    for item in args.loss_arg:
        if "=" not in item:
            raise ConfigError(f"--loss-arg expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        loss_args[key.strip()] = yaml.safe_load(raw)
    preset = args.preset
    if preset is None and not any(k in overrides for k in ("teacher", "student")) and not args.config:
        raise ConfigError("nothing to run: pass --preset (try --preset tiny), or --teacher/--student/--train-data")
    cfg = build_config(preset=preset, config_file=args.config, smoke=args.smoke, full=args.full,
                       overrides=overrides, set_args=args.set, loss_args=loss_args)
    return args, cfg


def main(argv=None):
    from .teacher_cache import TeacherCacheError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate"]:  # csd-distill evaluate --model DIR --eval-data A.jsonl,B.jsonl
        from .evaluate_cli import main as evaluate_main

        return evaluate_main(argv[1:])
    try:
        if argv[:1] == ["cache-teacher"]:  # csd-distill cache-teacher ... (cache_teacher.py)
            from .cache_teacher import main as cache_main

            cache_main(argv[1:])
            return 0
        args, cfg = parse_config(argv)
        if cfg is None:
            if args.list_presets:
                print("\n".join(preset_names()))
            if args.list_losses:
                from ..losses import LOSSES
                for name, (_, _, doc) in sorted(LOSSES.items()):
                    print(f"{name:10s} {doc}")
            return 0
        if cfg.pipeline == "tiny":
            from .tiny.pipeline import run_tiny
            run_tiny(cfg)
        else:
            from .run import run_distill
            run_distill(cfg)
    except (ConfigError, DataError, ModelError, CheckpointError, TeacherCacheError) as exc:
        print(f"csd-distill: error: {exc}", file=sys.stderr)
        return 2
    finally:
        release_process_group()
    return 0
