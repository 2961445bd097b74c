"""``csd-distill --tensor-parallel``: student and teacher split over the processes by
transformers' own tensor parallelism (``tp_plan``, DTensor), with each LM head's output
kept sharded over the vocabulary and fed to csd_ext.parallel's vocab-parallel CSD loss
(and a vocab-parallel CE), so no process ever holds a full ``[tokens, V]`` logits tensor.

Every process sees the same batches (tensor parallelism splits the model, not the data),
so token means are those of one process.  The head is loaded with the plan entry
``{"lm_head": "colwise"}``, which overrides the model's default ``colwise_gather_output``
(an all-gather of the logits).  Families whose transformers config has no
``base_model_tp_plan`` are refused.  What this path does not support is refused up front
(see ``check_tp_config``); docs/parallel.md lists what has run.
"""

import os
import time

import torch
import torch.distributed as dist

from .data import IGNORE_INDEX, Collator
from .logging_utils import MetricsLog, info
from .models import ModelError

SHARDED_HEAD_PLAN = {"lm_head": "colwise"}


def check_tp_family(name_or_path, *, trust_remote_code=False, role="model"):
    """Refuse a model whose family has no tensor-parallel plan in transformers, or whose head
    is tied to its input embeddings (the head's rows cannot then be split on their own)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "base_model_tp_plan", None):
        raise ModelError(
            f"--tensor-parallel: the {role} {name_or_path!r} ({config.model_type}) has no tensor-parallel plan "
            f"in transformers (its config's base_model_tp_plan is empty), so transformers cannot split it. "
            f"Families with one include llama, mistral, qwen2, qwen3, phi3 and olmo2; gpt2 and opt have none. "
            f"Run without --tensor-parallel (data parallel, optionally --teacher-sharding shard)."
        )
    if getattr(text, "tie_word_embeddings", False):
        raise ModelError(
            f"--tensor-parallel: the {role} {name_or_path!r} ties its LM head to its input embeddings "
            f"(tie_word_embeddings=True); keeping the head's output sharded over the vocabulary needs an "
            f"untied head"
        )
    return config


def check_tp_config(cfg):
    """Refuse the settings this path does not implement, each with the reason."""
    from ..losses import canonical_name

    unsupported = {
        "lora_r": (cfg.lora_r > 0, "LoRA adapters on DTensor layers are not supported"),
        "student_gen_ratio": (cfg.student_gen_ratio > 0, "on-policy sampling is not supported"),
        "lm_data": (cfg.lm_data is not None, "the extra LM loss is not supported"),
        "teacher_sharding": (cfg.teacher_sharding != "replicate", "the teacher is already split by tensor parallelism"),
        "save_every": (cfg.save_every > 0, "resumable checkpoints of DTensor models are not supported"),
        "resume": (cfg.resume, "resumable checkpoints of DTensor models are not supported"),
        "gradient_checkpointing": (cfg.gradient_checkpointing, "not tested with tensor parallelism"),
    }
    for key, (bad, why) in unsupported.items():
        if bad:
            raise ModelError(f"--tensor-parallel: {key} = {getattr(cfg, key)!r}: {why}")
    if cfg.kd_ratio > 0 and canonical_name(cfg.loss) != "csd":
        raise ModelError(f"--tensor-parallel trains with the vocab-parallel CSD loss only; got --loss {cfg.loss}")


def tp_world():
    """(rank, world) of the launch; the process group is initialised here if torchrun has not."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ModelError("--tensor-parallel needs a multi-process launch: "
                             "torchrun --nproc_per_node K -m csd_ext.distill ... --tensor-parallel")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def load_tp_model(name_or_path, *, dtype, trust_remote_code=False):
    """A causal LM split over all processes by its tp_plan, its LM head's output left sharded."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    return AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
        distributed_config=DistributedConfig(tp_size=dist.get_world_size(), tp_plan=dict(SHARDED_HEAD_PLAN)),
    )


def head_vocab_range(model):
    """(start, end) of the vocabulary rows of the LM head held by this process, and the group."""
    from torch.distributed.tensor import DTensor, Shard

    weight = model.get_output_embeddings().weight
    if not isinstance(weight, DTensor) or not isinstance(weight.placements[0], Shard):
        raise ModelError("--tensor-parallel: the LM head was not sharded by transformers' tp_plan")
    vocab, local = weight.shape[0], weight.to_local().shape[0]
    mesh = weight.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    per = -(-vocab // world)  # DTensor's Shard: torch.chunk sizes, the last rank shorter
    start = min(vocab, rank * per)
    if min(vocab, start + per) - start != local:
        raise ModelError(f"--tensor-parallel: unexpected LM-head shard of {local} rows on rank {rank} (V = {vocab})")
    return start, start + local, mesh.get_group()


def tp_distill_loss(student, teacher, batch, cfg, group, vocab_start):
    """(loss, parts) of one batch, from vocab-sharded logits; every process gets the same values."""
    from ..parallel import vocab_parallel_csd_loss
    from ..parallel.cross_entropy import vocab_parallel_cross_entropy
    from .trainer import model_inputs

    labels = batch["labels"]
    logits = student(**model_inputs(batch), use_cache=False).logits
    parts = {"tokens": (labels != IGNORE_INDEX).sum()}
    ce = vocab_parallel_cross_entropy(logits if cfg.kd_ratio < 1 else logits.detach(), labels, vocab_start,
                                      group=group, ignore_index=IGNORE_INDEX)
    parts["ce"] = ce.detach()
    loss = (1 - cfg.kd_ratio) * ce if cfg.kd_ratio < 1 else None
    if cfg.kd_ratio > 0:
        with torch.no_grad():
            teacher_logits = teacher(**model_inputs(batch), use_cache=False).logits
        kd = vocab_parallel_csd_loss(logits, teacher_logits, labels, group=group, ignore_index=IGNORE_INDEX,
                                     **cfg.loss_args)
        parts["kd"] = kd.detach()
        loss = cfg.kd_ratio * kd if loss is None else loss + cfg.kd_ratio * kd
    return loss, parts


def grad_norm_and_clip(params, max_norm):
    """Global grad norm over DTensor (sharded or replicated) and plain parameters, and clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    squares = []
    for g in grads:
        n = torch.linalg.vector_norm(g.float())
        squares.append((n.full_tensor() if isinstance(n, DTensor) else n) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if max_norm:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
    return total


def full_state_dict(model):
    """Every parameter and buffer as a full tensor (an all-gather for the sharded ones)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
            for k, v in model.state_dict().items()}


@torch.no_grad()
def validate_tp(student, teacher, batches, cfg, group, vocab_start, device):
    from .distributed import to_device

    was = student.training
    student.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        _, parts = tp_distill_loss(student, teacher, to_device(batch, device), cfg, group, vocab_start)
        n = parts["tokens"].double().cpu()
        sums += torch.stack([parts["ce"].double().cpu() * n, parts.get("kd", torch.zeros(())).double().cpu() * n, n])
    student.train(was)
    n = sums[2].clamp(min=1)
    out = {"val_ce": float(sums[0] / n)}
    if cfg.kd_ratio > 0:
        out["val_kd"] = float(sums[1] / n)
    return out


def train_tp(cfg, student, teacher, tokenizer, train_items, val_items, out_dir, *, run_name="student"):
    """The training loop of trainer.train for tensor-parallel models (no DDP: every process
    runs the same batches); saves the full student to out_dir/final on rank 0."""
    from accelerate.utils import set_seed

    from .distributed import ShardedBatchStream, to_device
    from .trainer import build_scheduler, param_groups, total_optimizer_steps

    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    set_seed(cfg.seed)
    start_v, end_v, group = head_vocab_range(student)
    if teacher is not None and head_vocab_range(teacher)[:2] != (start_v, end_v):
        raise ModelError("--tensor-parallel: the teacher's and the student's heads are split differently")
    device = student.get_output_embeddings().weight.to_local().device
    collate = Collator(tokenizer.pad_token_id)
    stream = ShardedBatchStream(train_items, cfg.batch_size, seed=cfg.seed, rank=0, world=1)
    val_batches = [collate(val_items[i:i + cfg.eval_batch_size]) for i in range(0, len(val_items), cfg.eval_batch_size)]
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    total = total_optimizer_steps(cfg, stream.batches_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, total)
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), run_name, enabled=main)
    info(f"{run_name}: tensor parallel over {world} processes (LM-head rows {start_v}:{end_v} on rank 0), "
         f"{len(train_items)} training examples, {total} optimiser steps (batch {cfg.batch_size} x accumulation "
         f"{cfg.grad_accum}), loss = {cfg.loss}{cfg.loss_args or ''}, kd_ratio {cfg.kd_ratio:g}", main_process=main)
    student.train()
    start = time.time()
    step = 0
    while step < total:
        window = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "tokens": 0}
        window_start = time.time()
        # Every micro-batch of the step first, so that the objective is the token mean over the
        # whole step however it is split, as in the data-parallel trainer (accumulation.py).
        # Tensor parallelism: every process holds the same batch, so the count is local.
        batches = [to_device(collate(stream.next()), device) for _ in range(cfg.grad_accum)]
        window_tokens = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).clamp(min=1)
        for batch in batches:
            loss, parts = tp_distill_loss(student, teacher, batch, cfg, group, start_v)
            share = parts["tokens"].to(loss.dtype) / window_tokens  # this micro-batch's token-mean weight
            (loss * share).backward()
            window["loss"] += (loss.detach() * share).item()
            window["ce"] += (parts["ce"] * share).item()
            window["kd"] += (parts.get("kd", torch.zeros(())) * share).item()
            window["tokens"] += int(parts["tokens"])
        grad_norm = grad_norm_and_clip([p for p in student.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == total:
            record = {"step": step, "epoch": round(stream.epoch_progress, 4), "lr": scheduler.get_last_lr()[0],
                      "loss": window["loss"], "ce": window["ce"], "grad_norm": float(grad_norm),
                      "tokens_per_s": window["tokens"] / max(time.time() - window_start, 1e-9)}
            if cfg.kd_ratio > 0:
                record["kd"] = window["kd"]
            log.write(**record)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            log.write(step=step, **validate_tp(student, teacher, val_batches, cfg, group, start_v, device))
    seconds = time.time() - start
    final_val = validate_tp(student, teacher, val_batches, cfg, group, start_v, device)
    log.write(step=step, **final_val)
    final_dir = os.path.join(out_dir, "final")
    state = full_state_dict(student)  # a collective: every rank takes part
    if main:
        # Written by hand: save_pretrained runs collectives of its own when a process group
        # exists, which would pair with the other ranks' barrier below.
        from safetensors.torch import save_file

        os.makedirs(final_dir, exist_ok=True)
        student.config.save_pretrained(final_dir)
        save_file(state, os.path.join(final_dir, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(final_dir)
    dist.barrier()
    info(f"{run_name}: {step} steps in {seconds:.1f}s (tensor parallel); validation "
         + ", ".join(f"{k} {v:.4f}" for k, v in final_val.items()) + f"; saved {final_dir}", main_process=main)
    return {"run": run_name, "steps": step, "train_seconds": seconds, "final_dir": final_dir, **final_val}


def train_from_config_tp(cfg, run_name):
    """run.train_from_config for --tensor-parallel: the result has the student reloaded whole from
    out_dir/final (for evaluation) and no teacher (teacher evaluation is skipped: its point here
    is that it does not fit one process)."""
    from .models import (check_same_tokenizer, load_causal_lm, load_tokenizer, resolve_mixed_precision,
                         resolve_teacher_dtype)
    from .run import load_data, save_config

    check_tp_config(cfg)
    check_tp_family(cfg.student, trust_remote_code=cfg.trust_remote_code, role="student")
    if cfg.kd_ratio > 0:
        check_tp_family(cfg.teacher, trust_remote_code=cfg.trust_remote_code, role="teacher")
    tp_world()
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, trust_remote_code=cfg.trust_remote_code)
    teacher = None
    if cfg.kd_ratio > 0:
        if cfg.tokenizer is None:
            check_same_tokenizer(load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code), tokenizer,
                                 cfg.teacher, cfg.student)
        teacher = load_tp_model(cfg.teacher, dtype=resolve_teacher_dtype(cfg.teacher_dtype, mixed_precision),
                                trust_remote_code=cfg.trust_remote_code)
        teacher.eval()
        teacher.requires_grad_(False)
    student = load_tp_model(cfg.student, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise ModelError(f"--tensor-parallel: the teacher's head has {teacher.config.vocab_size} rows and the "
                         f"student's {student.config.vocab_size}; vocabulary slicing is not supported here")
    train_items, eval_items = load_data(cfg, tokenizer)
    save_config(cfg, cfg.output_dir)
    result = train_tp(cfg, student, teacher, tokenizer, train_items, eval_items, cfg.output_dir, run_name=run_name)
    del student, teacher
    if cfg.eval_teacher:
        info("--tensor-parallel: the teacher is not evaluated (it is only held split over the processes)")
    whole = load_causal_lm(result["final_dir"], trust_remote_code=cfg.trust_remote_code)
    result["model"] = whole
    return {"result": result, "teacher": None, "student": whole, "tokenizer": tokenizer,
            "eval_items": eval_items, "mixed_precision": mixed_precision}
