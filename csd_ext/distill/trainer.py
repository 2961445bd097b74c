"""The training loop: (1 - kd_ratio) * CE + kd_ratio * KD, on accelerate.

Why accelerate rather than the HF Trainer: distillation runs two models and
computes its own loss from both sets of logits.  Trainer would need a
compute_loss override plus care to keep the teacher out of its optimiser,
checkpoints and device placement; accelerate gives the same DDP/FSDP/DeepSpeed,
mixed precision and gradient accumulation through a short explicit loop where
the teacher's handling is visible (and where on-policy sampling and exact
resume can be added).  docs/training.md shows csd_loss inside a Trainer too.
"""

import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..losses import get_loss
from .data import IGNORE_INDEX, Collator
from .logging_utils import MetricsLog, info
from .models import resolve_mixed_precision


CE_CHUNK_ROWS = 2048  # rows upcast at a time when CE is only logged (bounds the fp32 copy)


def token_cross_entropy(logits, labels):
    """Mean CE over positions whose label is not -100, computed in fp32 on those rows only.

    Returns 0 (not NaN) for a batch with no counted position.  Without
    autograd (CE only logged, kd_ratio = 1) the fp32 upcast is done a chunk of
    rows at a time, so a 256k vocabulary does not need a full fp32 copy.
    """
    mask = labels != IGNORE_INDEX
    rows, targets = logits[mask], labels[mask]
    if torch.is_grad_enabled() and rows.requires_grad:
        total = F.cross_entropy(rows.float(), targets, reduction="sum")
    else:
        total = sum((F.cross_entropy(rows[i:i + CE_CHUNK_ROWS].float(), targets[i:i + CE_CHUNK_ROWS],
                                     reduction="sum") for i in range(0, rows.shape[0], CE_CHUNK_ROWS)),
                    rows.new_zeros((), dtype=torch.float32))
    return total / mask.sum().clamp(min=1)


def model_inputs(batch):
    """What both models see: the very same ids, mask and positions."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def distill_loss(student, teacher, batch, kd_fn, kd_ratio, vocab=None):
    """(loss, detached parts) for one micro-batch.

    ``vocab``: keep only the first ``vocab`` logits of both models (shared
    tokenizer vocabulary when their heads differ in size).
    """
    labels = batch["labels"]
    logits = student(**model_inputs(batch), use_cache=False).logits
    if vocab is not None:
        logits = logits[..., :vocab]
    parts = {"tokens": (labels != IGNORE_INDEX).sum()}
    if kd_ratio < 1:
        ce = token_cross_entropy(logits, labels)
        loss = (1 - kd_ratio) * ce
    else:
        with torch.no_grad():  # CE is only logged: keep it out of the graph
            ce = token_cross_entropy(logits.detach(), labels)
        loss = None
    parts["ce"] = ce.detach()
    if kd_ratio > 0:
        with torch.no_grad():
            teacher_logits = teacher(**model_inputs(batch), use_cache=False).logits
        if vocab is not None:
            teacher_logits = teacher_logits[..., :vocab]
        kd = kd_fn(logits, teacher_logits, labels)
        parts["kd"] = kd.detach()
        loss = kd_ratio * kd if loss is None else loss + kd_ratio * kd
    return loss, parts


def param_groups(model, weight_decay):
    """AdamW groups: decay on matrices and embeddings, none on biases and norm weights.

    Every bias and every LayerNorm/RMSNorm weight is 1-D, so the rank decides
    (the rule HF Trainer applies by name for standard layers).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_scheduler(cfg, optimizer, total_steps):
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = int(round(cfg.warmup_ratio * total_steps))
    if cfg.lr_scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total_steps, min_lr=cfg.min_lr)
    if cfg.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def total_optimizer_steps(cfg, batches_per_epoch):
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    return max(1, math.ceil(cfg.epochs * per_epoch))


@torch.no_grad()
def validate(accelerator, student, teacher, loader, kd_fn, kd_ratio, vocab):
    """Token-weighted CE (and KD) of the student on held-out data, teacher-forced."""
    was_training = student.training
    student.eval()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        _, parts = distill_loss(student, teacher, batch, kd_fn, kd_ratio, vocab)
        n = parts["tokens"].double()
        sums += torch.stack([parts["ce"].double() * n, parts.get("kd", torch.zeros(())).double() * n, n])
    sums = accelerator.reduce(sums, reduction="sum")
    student.train(was_training)
    n = sums[2].clamp(min=1)
    out = {"val_ce": (sums[0] / n).item()}
    if kd_ratio > 0:
        out["val_kd"] = (sums[1] / n).item()
    return out


def save_model(accelerator, model, tokenizer, path, extra=None):
    """HF directory with safetensors weights (LoRA: the adapter), config and tokenizer."""
    import json

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(path, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(path)  # safetensors is the default format
        tokenizer.save_pretrained(path)
        if extra is not None:
            with open(os.path.join(path, "training_state.json"), "w") as f:
                json.dump(extra, f, indent=1)
    accelerator.wait_for_everyone()


def train(cfg, student, teacher, tokenizer, train_items, val_items, out_dir, *, vocab=None, run_name="train"):
    """Train ``student`` on ``train_items`` and save it to ``out_dir/final``.

    Returns a summary dict (steps, seconds, final validation metrics, paths).
    The teacher (None when kd_ratio == 0) stays frozen and is never prepared
    for training: it only moves to the device.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    if cfg.kd_ratio > 0 and teacher is None:
        raise ValueError("kd_ratio > 0 needs a teacher")
    kd_fn = get_loss(cfg.loss, **cfg.loss_args) if cfg.kd_ratio > 0 else None

    collate = Collator(tokenizer.pad_token_id)
    train_loader = DataLoader(train_items, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(cfg.seed), drop_last=False)
    val_loader = DataLoader(val_items, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    student, optimizer, train_loader, val_loader = accelerator.prepare(student, optimizer, train_loader, val_loader)
    total = total_optimizer_steps(cfg, len(train_loader))
    # The scheduler is stepped by hand once per optimiser step: accelerate's
    # wrapper would step it num_processes times per step under DDP.
    scheduler = build_scheduler(cfg, optimizer, total)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)

    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), run_name, enabled=main)
    objective = "CE (SFT, no teacher)" if cfg.kd_ratio == 0 else (
        ("" if cfg.kd_ratio == 1 else f"{1 - cfg.kd_ratio:g} CE + {cfg.kd_ratio:g} ")
        + f"{cfg.loss}{cfg.loss_args or ''}")
    info(f"{run_name}: {len(train_items)} training examples, {total} optimiser steps "
         f"(batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {accelerator.num_processes} processes), "
         f"loss = {objective}, device {accelerator.device}, mixed precision {mixed_precision}", main_process=main)

    student.train()
    step, epoch, start = 0, 0, time.time()
    window = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "tokens": 0, "micro": 0}
    window_start = time.time()
    bar = tqdm(total=total, desc=run_name, disable=not main, dynamic_ncols=True, leave=True)
    while step < total:
        for index, batch in enumerate(train_loader):
            with accelerator.accumulate(student):
                loss, parts = distill_loss(student, teacher, batch, kd_fn, cfg.kd_ratio, vocab)
                accelerator.backward(loss)
                # Summed as tensors: no host sync until the next log line.
                window["loss"] = window["loss"] + loss.detach().float()
                window["ce"] = window["ce"] + parts["ce"]
                window["kd"] = window["kd"] + parts.get("kd", 0.0)
                window["tokens"] = window["tokens"] + parts["tokens"]
                window["micro"] += 1
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm or float("inf"))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                m = window["micro"]
                record = {"step": step, "epoch": round(epoch + (index + 1) / len(train_loader), 4),
                          "lr": scheduler.get_last_lr()[0], "loss": float(window["loss"]) / m,
                          "ce": float(window["ce"]) / m, "grad_norm": float(grad_norm),
                          "tokens_per_s": float(window["tokens"]) / max(time.time() - window_start, 1e-9)}
                if cfg.kd_ratio > 0:
                    record["kd"] = float(window["kd"]) / m
                log.write(**record)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "ce", "kd") if k in record})
                window = {k: 0 for k in window}
                window_start = time.time()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                log.write(step=step, **validate(accelerator, student, teacher, val_loader, kd_fn, cfg.kd_ratio, vocab))
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_model(accelerator, student, tokenizer, os.path.join(out_dir, f"checkpoint-{step}"),
                           extra={"step": step, "epoch": epoch})
            if step >= total:
                break
        epoch += 1
    bar.close()
    seconds = time.time() - start
    final_val = validate(accelerator, student, teacher, val_loader, kd_fn, cfg.kd_ratio, vocab)
    log.write(step=step, **final_val)
    final_dir = os.path.join(out_dir, "final")
    save_model(accelerator, student, tokenizer, final_dir, extra={"step": step, "epoch": epoch})
    info(f"{run_name}: {step} steps in {seconds:.1f}s; validation " +
         ", ".join(f"{k} {v:.4f}" for k, v in final_val.items()) + f"; saved {final_dir}", main_process=main)
    return {"run": run_name, "steps": step, "train_seconds": seconds, "final_dir": final_dir,
            "model": accelerator.unwrap_model(student), **final_val}
