"""Run configuration: one flat dataclass, filled from a preset YAML, a user YAML and CLI flags.

Precedence, lowest first: field defaults < preset (csd_ext/configs/<name>.yaml)
< ``--config FILE`` < the preset's ``smoke:`` section (with ``--smoke``) <
individual CLI flags and ``--set key=value``.  Every value is type-checked
once, here, with an error that names the key and where the value came from.
"""

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from importlib import resources

import yaml



@dataclass
class TinyConfig:
    """The embedded CPU demo (``--preset tiny``): data, tokenizer, model sizes and the contest.

    See csd_ext/distill/tiny/pipeline.py and docs/training.md ("The tiny demo")."""

    n_train: int = 4000               # synthetic training examples (SFT of the teacher, distillation)
    n_pretrain: int = 4000            # plain-text documents the student is pretrained on (no template)
    n_dev: int = 64                   # dev prompts: the learning rate of each loss is chosen on them
    n_eval: int = 96                  # test prompts (never seen in training, never used to choose anything)
    tasks: list = field(default_factory=lambda: ["copy", "reverse", "sort", "lookup"])
    vocab_size: int = 512             # byte-level BPE vocabulary, trained on the data
    n_positions: int = 128
    teacher_layers: int = 3
    teacher_dim: int = 128
    teacher_heads: int = 4
    student_layers: int = 2
    student_dim: int = 64
    student_heads: int = 2
    teacher_steps: int = 500          # SFT optimiser steps for the teacher
    teacher_lr: float = 2e-3
    pretrain_steps: int = 300         # LM pretraining steps of the student (the GPT-2 analogue)
    pretrain_lr: float = 2e-3
    student_steps: int = 150          # distillation steps of each student run
    lr_grid: list = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])  # per loss, chosen on the dev split
    seeds: list = field(default_factory=lambda: [1, 2, 3])              # training seeds of every contestant
    contestants: list = field(default_factory=list)  # [{name, loss, loss_args}]; empty: tiny.yaml's
    random_start: str = "SS-CSD t=1"  # one extra row: this contestant from a random initialisation ("": none)
    workers: int = 0                  # parallel student processes (1 thread each); 0 = the machine's cores
    cache_dir: str = "~/.cache/csd_ext/tiny"  # teacher, pretrained student and teacher logits, keyed by config


@dataclass
class DistillConfig:
    # --- what to run
    preset: typing.Optional[str] = None
    pipeline: str = "distill"         # "distill" (teacher -> student) or "tiny" (the CPU demo)
    output_dir: str = "runs/distill"
    seed: int = 10

    # --- models
    teacher: typing.Optional[str] = None     # HF id or local directory
    student: typing.Optional[str] = None
    tokenizer: typing.Optional[str] = None   # default: the student's; must equal the teacher's
    lora_r: int = 0                          # 0 = full fine-tuning of the student
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated names
    lora_adapter: typing.Optional[str] = None  # a peft adapter to start the student's LoRA from (trained on)
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"            # auto | no | fp16 | bf16 (auto: bf16/fp16 on GPU, no on CPU)
    teacher_dtype: str = "auto"              # auto | fp32 | fp16 | bf16 (auto: the mixed-precision type)
    trust_remote_code: bool = False
    teacher_cache: typing.Optional[str] = None  # train from `csd-distill cache-teacher` output; no teacher loaded

    # --- data (Dolly JSONL: instruction, context, response)
    train_data: typing.Optional[str] = None
    eval_data: typing.Optional[str] = None
    eval_holdout: int = 500                  # without eval_data: first N training lines held out
    max_train_examples: int = 0              # use only the first N training records (0: all; GSM8K: gsm_1k)
    prompt_template: str = "minillm"         # minillm | compact (no preamble) | qa | chat (the tokenizer's)
    eval_prompt_template: typing.Optional[str] = None  # generation prompts in evaluation (default: prompt_template)
    max_length: int = 512                    # tokens the model sees per example
    max_prompt_length: int = 256             # longer prompts are dropped, as in MiniLLM

    # --- objective: (1 - kd_ratio) * CE + kd_ratio * KD
    loss: str = "csd"
    loss_args: dict = field(default_factory=dict)  # e.g. {weighting: TS, temperature: 1.5}
    kd_ratio: float = 1.0

    # --- optimiser and schedule
    lr: float = 1e-4
    min_lr: float = 1e-7
    lr_scheduler: str = "cosine"             # cosine (to min_lr) | linear | constant
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 8                      # micro-batch per process
    grad_accum: int = 1
    epochs: float = 20.0
    max_steps: int = 0                       # optimiser steps; > 0 overrides epochs

    # --- logging, checkpoints, evaluation
    log_every: int = 10
    report_to: str = "none"                  # none | tensorboard | wandb (accelerate trackers)
    fused_linear: str = "auto"               # auto (on for csd from 100k vocab) | on | off
    eval_every: int = 0                      # validation loss every N steps (0: at the end only)
    save_every: int = 0                      # checkpoint every N steps (0: final only)
    eval_seeds: list = field(default_factory=lambda: [10, 20, 30, 40, 50])  # sampling seeds
    eval_greedy: bool = False                # also decode greedily (exact match, teacher agreement)
    eval_max_examples: int = 500
    eval_batch_size: int = 16
    eval_teacher: bool = True
    max_new_tokens: int = 256
    no_repeat_ngram_size: int = 6
    answer_format: str = "text"              # text | gsm8k (compare the number after '####')
    stop_strings: list = field(default_factory=list)  # generation also stops at these (GSM8K: ["\n\n"])
    best_checkpoint: bool = False            # dev ROUGE-L every epoch; keep the best in output_dir/best
    dev_seeds: list = field(default_factory=lambda: [10])  # sampling seeds of the per-epoch dev evaluation
    dev_max_examples: int = 500              # dev prompts generated per epoch

    # --- on-policy distillation (ImitKD with a replay buffer; docs/training.md)
    student_gen_ratio: float = 0.0           # per micro-batch: probability that the student samples responses
    replay_buffer_size: int = 1000           # FIFO capacity (the paper: 1000)
    gen_temperature: float = 1.0             # student sampling for on-policy data (the paper: 1, 1, 0, 256)
    gen_top_p: float = 1.0
    gen_top_k: int = 0                       # 0: no top-k
    gen_max_new_tokens: int = 256
    lm_data: typing.Optional[str] = None     # plain-text LM data (.jsonl with 'text', or blank-line separated)
    lm_coef: float = 1.0                     # weight of its next-token CE (with lm_data only)

    # --- multi-process runs and checkpoints
    token_mean: str = "global"               # global: token count all-reduced over ranks | per_rank (the paper's)
    teacher_sharding: str = "replicate"      # replicate | shard (FSDP2 across the processes)
    tensor_parallel: bool = False            # split both models over the processes (transformers tp_plan); docs/parallel.md
    resume: bool = False                     # continue from the newest valid checkpoint in output_dir
    save_total_limit: int = 0                # keep the newest N checkpoints (0: all)

    tiny: TinyConfig = field(default_factory=TinyConfig)


CHOICES = {
    "pipeline": ("distill", "tiny"),
    "mixed_precision": ("auto", "no", "fp16", "bf16"),
    "teacher_dtype": ("auto", "fp32", "fp16", "bf16"),
    "prompt_template": ("minillm", "compact", "qa", "chat"),
    "eval_prompt_template": ("minillm", "compact", "qa", "chat"),
    "lr_scheduler": ("cosine", "linear", "constant"),
    "answer_format": ("text", "gsm8k"),
}
POSITIVE = {"max_length", "max_prompt_length", "batch_size", "grad_accum", "eval_batch_size", "max_new_tokens",
            "log_every", "lr", "n_train", "n_eval", "vocab_size", "n_positions", "teacher_layers", "teacher_dim",
            "teacher_heads", "student_layers", "student_dim", "student_heads", "teacher_steps", "student_steps",
            "teacher_lr", "pretrain_steps", "pretrain_lr", "n_dev", "n_pretrain"}
NON_NEGATIVE = {"workers", "lora_r", "lora_dropout", "eval_holdout", "min_lr", "warmup_ratio", "weight_decay", "max_grad_norm",
                "epochs", "max_steps", "eval_every", "save_every", "eval_max_examples", "no_repeat_ngram_size",
                "adam_eps"}
# On-policy, multi-process and checkpoint settings (issue 7).
CHOICES.update({"token_mean": ("global", "per_rank"), "teacher_sharding": ("replicate", "shard")})
POSITIVE |= {"replay_buffer_size", "gen_temperature", "gen_max_new_tokens"}
NON_NEGATIVE |= {"gen_top_k", "lm_coef", "save_total_limit"}
POSITIVE |= {"dev_max_examples"}
NON_NEGATIVE |= {"max_train_examples"}


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and its source."""


def _configs_dir():
    # csd_ext/configs/*.yaml ships as package data (setup.py), not as a package.
    return resources.files("csd_ext").joinpath("configs")


def preset_names():
    return sorted(os.path.splitext(e.name)[0] for e in _configs_dir().iterdir() if e.name.endswith(".yaml"))


def read_yaml(path_or_preset):
    """A preset name (csd_ext/configs/<name>.yaml) or a YAML file path -> (dict, source label)."""
    if os.path.isfile(path_or_preset):
        with open(path_or_preset) as f:
            data, source = yaml.safe_load(f), path_or_preset
    else:
        name = path_or_preset
        entry = _configs_dir().joinpath(f"{name}.yaml")
        if not entry.is_file():
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())} "
                              f"or give the path of a YAML file")
        data, source = yaml.safe_load(entry.read_text()), f"preset {name}"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    return data, source


def _field_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key, value, annotation, source):
    """Check (and minimally convert) one value against its field's annotation."""
    optional = typing.get_origin(annotation) is typing.Union
    base = [a for a in typing.get_args(annotation) if a is not type(None)][0] if optional else annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null ({source})")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, (list, tuple)),
        dict: lambda v: isinstance(v, dict),
    }[base]
    if base is list and isinstance(value, str):  # "10,20,30" from the command line
        value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass  # rejected below with the key's name
    if not ok(value):
        raise ConfigError(f"{key} must be {'null or ' if optional else ''}a {base.__name__}, got {value!r} ({source})")
    if base is float:
        value = float(value)
    if base is list:
        value = list(value)
    name = key.split(".")[-1]
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{key} must be one of {CHOICES[name]}, got {value!r} ({source})")
    if name in POSITIVE and value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r} ({source})")
    if name in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r} ({source})")
    return value


def apply_updates(cfg, updates, source):
    """Apply a mapping of updates (nested ``tiny:`` mapping allowed) to ``cfg`` in place."""
    types = _field_types(DistillConfig)
    updates = {k.replace("-", "_"): v for k, v in updates.items()}
    if "loss" in updates and updates["loss"] != cfg.loss and "loss_args" not in updates:
        cfg.loss_args = {}  # another loss: the previous loss's hyper-parameters no longer apply
    for key, value in updates.items():
        if key == "tiny":
            if not isinstance(value, dict):
                raise ConfigError(f"tiny must be a mapping of tiny-demo settings ({source})")
            tiny_types = _field_types(TinyConfig)
            for k, v in value.items():
                k = k.replace("-", "_")
                if k not in tiny_types:
                    raise ConfigError(f"unknown key tiny.{k} ({source}); known: {', '.join(tiny_types)}")
                setattr(cfg.tiny, k, _coerce(f"tiny.{k}", v, tiny_types[k], source))
            continue
        if key in ("smoke", "full"):
            continue  # applied only with --smoke / --full, by build_config
        if key not in types:
            raise ConfigError(f"unknown config key {key!r} ({source}); known keys: {', '.join(types)}")
        setattr(cfg, key, _coerce(key, value, types[key], source))
    return cfg


def check_consistency(cfg):
    if not 0.0 <= cfg.kd_ratio <= 1.0:
        raise ConfigError(f"kd_ratio must be in [0, 1], got {cfg.kd_ratio}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) must be smaller than max_length "
                          f"({cfg.max_length}), or no response token would fit")
    if cfg.pipeline == "distill":
        missing = [k for k in ("student", "train_data") if getattr(cfg, k) is None]
        if cfg.kd_ratio > 0 and cfg.teacher is None and cfg.teacher_cache is None:
            missing.insert(0, "teacher")
        if missing:
            raise ConfigError(
                "missing " + ", ".join(missing) + ": pass " + " ".join(f"--{k.replace('_', '-')} ..." for k in missing)
                + (f" (preset {cfg.preset} leaves them to you)" if cfg.preset else "")
            )
    if not 0.0 <= cfg.student_gen_ratio <= 1.0:
        raise ConfigError(f"student_gen_ratio must be in [0, 1], got {cfg.student_gen_ratio}")
    if cfg.teacher_cache and cfg.student_gen_ratio > 0:
        raise ConfigError("teacher_cache holds the teacher's logits on the training data only; on-policy "
                          "sampling (student_gen_ratio > 0) needs the live teacher")
    if not 0.0 < cfg.gen_top_p <= 1.0:
        raise ConfigError(f"gen_top_p must be in (0, 1], got {cfg.gen_top_p}")
    from ..losses import get_loss  # noqa: PLC0415  (checks the loss name and its arguments now)
    try:
        get_loss(cfg.loss, **cfg.loss_args)
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from None
    return cfg


def build_config(preset=None, config_file=None, smoke=False, overrides=None, set_args=None, loss_args=None,
                 full=False):
    """Assemble a checked DistillConfig.  ``overrides``: {key: value} from CLI flags;
    ``set_args``: ["key=value", "tiny.key=value"] from ``--set``; ``loss_args``:
    {name: value} merged over the configured loss's hyper-parameters."""
    cfg = DistillConfig()
    layers = []
    if preset is not None:
        layers.append(read_yaml(preset))
        cfg.preset = preset
    if config_file is not None:
        layers.append(read_yaml(config_file))
    for data, source in layers:
        apply_updates(cfg, data, source)
    if smoke:
        smoke_updates = {}
        for data, _ in layers:
            smoke_updates.update(data.get("smoke") or {})
        apply_updates(cfg, smoke_updates or DEFAULT_SMOKE, "smoke settings")
    if full:  # a preset's longer, stronger variant (tiny: the demo at a larger scale)
        if smoke:
            raise ConfigError("--full and --smoke contradict each other: pass one")
        full_updates = {}
        for data, _ in layers:
            full_updates.update(data.get("full") or {})
        if not full_updates:
            raise ConfigError(f"--full: preset {preset!r} has no full: section")
        apply_updates(cfg, full_updates, "full settings")
    if overrides:
        apply_updates(cfg, overrides, "command line")
    for item in set_args or ():
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        if key.startswith("tiny."):
            apply_updates(cfg, {"tiny": {key[5:]: value}}, f"--set {item}")
        else:
            apply_updates(cfg, {key: value}, f"--set {item}")
    if loss_args:
        cfg.loss_args = {**cfg.loss_args, **loss_args}
    return check_consistency(cfg)


# --smoke for presets that have no smoke: section: a couple of steps, a handful of prompts.
DEFAULT_SMOKE = {"max_steps": 2, "eval_max_examples": 4, "eval_seeds": [10], "max_new_tokens": 16,
                 "eval_holdout": 8, "log_every": 1}


def to_dict(cfg):
    return dataclasses.asdict(cfg)
