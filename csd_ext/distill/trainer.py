"""The training loop: (1 - kd_ratio) * CE + kd_ratio * KD, on accelerate.

Why accelerate rather than the HF Trainer: distillation runs two models and
computes its own loss from both sets of logits.  Trainer would need a
compute_loss override plus care to keep the teacher out of its optimiser,
checkpoints and device placement; accelerate gives the same DDP/FSDP/DeepSpeed,
mixed precision and gradient accumulation through a short explicit loop where
the teacher's handling, on-policy sampling (onpolicy.py), the global token mean
over processes (distributed.py) and exact resume (checkpoint.py) are visible.
docs/training.md shows csd_loss inside a Trainer too.
"""

import math
import os
import time

import torch
import torch.nn.functional as F
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


def distill_loss(student, teacher, batch, kd_fn, kd_ratio, vocab=None, denominator=None):
    """(loss, detached parts) for one micro-batch.

    ``vocab``: keep only the first ``vocab`` logits of both models (shared
    tokenizer vocabulary when their heads differ in size).  ``denominator``:
    token sums are divided by it instead of the micro-batch's own token count
    (multi-process runs: the global count / world size).
    """
    labels = batch["labels"]
    logits = student(**model_inputs(batch), use_cache=False).logits
    if vocab is not None:
        logits = logits[..., :vocab]
    parts = {"tokens": (labels != IGNORE_INDEX).sum()}
    # Token means rescaled to (sum / denominator); exactly 1 when the denominator is this
    # micro-batch's own count.
    scale = 1.0 if denominator is None else parts["tokens"].clamp(min=1).to(torch.float32) / denominator
    if kd_ratio < 1:
        ce = token_cross_entropy(logits, labels) * scale
        loss = (1 - kd_ratio) * ce
    else:
        with torch.no_grad():  # CE is only logged: keep it out of the graph
            ce = token_cross_entropy(logits.detach(), labels) * scale
        loss = None
    parts["ce"] = ce.detach()
    if kd_ratio > 0 and getattr(teacher, "is_teacher_cache", False):  # --teacher-cache (teacher_cache.py)
        kd = teacher.kd_loss(kd_fn, logits, batch, vocab) * scale
        parts["kd"] = kd.detach()
        loss = kd_ratio * kd if loss is None else loss + kd_ratio * kd
    elif kd_ratio > 0:
        with torch.no_grad():
            teacher_logits = teacher(**model_inputs(batch), use_cache=False).logits
        if vocab is not None:
            teacher_logits = teacher_logits[..., :vocab]
        kd = kd_fn(logits, teacher_logits, labels) * scale
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
def validate(accelerator, student, teacher, loader, kd_fn, kd_ratio, vocab, loss_fn=None):
    """Token-weighted CE (and KD) of the student on held-out data, teacher-forced.
    ``loss_fn(batch) -> (loss, parts)`` replaces ``distill_loss`` (the fused path)."""
    was_training = student.training
    student.eval()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        _, parts = (loss_fn(batch) if loss_fn is not None
                    else distill_loss(student, teacher, batch, kd_fn, kd_ratio, vocab))
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
    state_dict = accelerator.get_state_dict(model)  # full weights; every rank takes part under FSDP / ZeRO-3
    if accelerator.is_main_process:
        os.makedirs(path, exist_ok=True)
        # safetensors is the default format
        accelerator.unwrap_model(model).save_pretrained(path, state_dict=state_dict)
        tokenizer.save_pretrained(path)
        if extra is not None:
            with open(os.path.join(path, "training_state.json"), "w") as f:
                json.dump(extra, f, indent=1)
    accelerator.wait_for_everyone()


def _new_window():
    return {"loss": 0.0, "ce": 0.0, "kd": 0.0, "lm": 0.0, "tokens": 0, "micro": 0, "generated": 0}


def train(cfg, student, teacher, tokenizer, train_items, val_items, out_dir, *, vocab=None, run_name="train",
          lm_items=None):
    """Train ``student`` on ``train_items`` and save it to ``out_dir/final``.

    Returns a summary dict (steps, seconds, final validation metrics, paths).
    The teacher (None when kd_ratio == 0) stays frozen and is never prepared
    for training: it is placed on the device whole, or sharded across the
    processes (``teacher_sharding``).  ``lm_items``: packed plain-text
    examples for the optional LM loss (``lm_coef``).

    One optimiser step takes ``grad_accum`` micro-batches on every process;
    token means are over the global micro-batch (``token_mean``), gradients
    are all-reduced on the last one only.  With ``student_gen_ratio`` > 0 the
    micro-batches come from the on-policy replay buffer (onpolicy.py).  With
    ``save_every`` the run writes resumable checkpoints; ``resume`` continues
    from the newest valid one, bit-exact on CPU (checkpoint.py).
    """
    from accelerate.utils import set_seed

    from .accumulation import accumulate_step, configure_deepspeed
    from .checkpoint import CheckpointError, CheckpointManager, inject_fault, truncate_metrics
    from .distributed import (
        EvalShards,
        ShardedBatchStream,
        check_generation_support,
        is_sharded,
        make_accelerator,
        place_teacher,
        reduce_mean,
        to_device,
    )
    from .fused import fused_distill_loss, use_fused_linear
    from .onpolicy import OnPolicy
    from .tracking import Trackers, accelerator_kwargs

    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    accelerator = make_accelerator(mixed_precision, cfg.grad_accum, **accelerator_kwargs(cfg, out_dir))
    configure_deepspeed(accelerator, cfg)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)
    if cfg.kd_ratio > 0 and teacher is None:
        raise ValueError("kd_ratio > 0 needs a teacher")
    kd_fn = get_loss(cfg.loss, **cfg.loss_args) if cfg.kd_ratio > 0 else None

    collate = Collator(tokenizer.pad_token_id)
    stream = ShardedBatchStream(train_items, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    lm_stream = (ShardedBatchStream(lm_items, cfg.batch_size, seed=cfg.seed + 1, rank=rank, world=world)
                 if lm_items else None)
    val_batches = EvalShards(val_items, cfg.eval_batch_size, collate, accelerator)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    fused = use_fused_linear(cfg, student, vocab)
    torch_optimizer = optimizer  # DeepSpeed's wrapper has no .defaults, which the schedules read
    student, optimizer = accelerator.prepare(student, optimizer)
    total = total_optimizer_steps(cfg, stream.batches_per_epoch)
    # The scheduler is stepped by hand once per optimiser step: accelerate's
    # wrapper would step it num_processes times per step under DDP.  Registered
    # so that checkpoints hold its state.
    scheduler = build_scheduler(cfg, torch_optimizer, total)
    accelerator.register_for_checkpointing(scheduler)
    teacher = place_teacher(accelerator, teacher, cfg.teacher_sharding, log=info)
    onpolicy = None
    if cfg.student_gen_ratio > 0:
        check_generation_support(accelerator)
        onpolicy = OnPolicy(cfg, tokenizer, rank=rank, synced_gpus=is_sharded(student),
                            mixed_precision=mixed_precision)

    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), run_name, enabled=main)
    trackers = Trackers(accelerator, cfg, run_name)

    def eval_loss(batch):  # validation on the training path's kernels
        return fused_distill_loss(student, teacher, batch, cfg.loss_args, cfg.kd_ratio, vocab)
    ckpt = CheckpointManager(out_dir, accelerator, keep=cfg.save_total_limit, log=info, fingerprint={
        "seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "train_examples": len(train_items), "lm_examples": len(lm_items or ())})
    step, window = 0, _new_window()
    best = None
    if cfg.best_checkpoint:  # dev ROUGE-L every epoch, the best kept in out_dir/best (best_checkpoint.py)
        from .best_checkpoint import BestCheckpoint

        best = BestCheckpoint(cfg, tokenizer, val_items, out_dir, accelerator, mixed_precision=mixed_precision,
                              log=lambda m: info(m, main_process=main))
    if cfg.resume:
        state = ckpt.resume()
        if state is not None:
            step, window = state["step"], state["window"]
            try:
                stream.load_state_dict(state["stream"])
                if lm_stream is not None and state.get("lm_stream") is not None:
                    lm_stream.load_state_dict(state["lm_stream"])
                if onpolicy is not None and state.get("onpolicy") is not None:
                    onpolicy.load_state_dict(state["onpolicy"])
            except ValueError as exc:
                raise CheckpointError(f"cannot resume from {ckpt.resumed_from}: {exc}") from None
            if main:
                truncate_metrics(log.path, run_name, step)
            if best is not None:
                best.restore(stream.epoch_progress)
    elif cfg.save_every:
        ckpt.check_fresh_start()

    def trainer_state():
        return {"step": step, "window": window, "stream": stream.state_dict(),
                "lm_stream": lm_stream.state_dict() if lm_stream is not None else None,
                "onpolicy": onpolicy.state_dict() if onpolicy is not None else None}

    objective = "CE (SFT, no teacher)" if cfg.kd_ratio == 0 else (
        ("" if cfg.kd_ratio == 1 else f"{1 - cfg.kd_ratio:g} CE + {cfg.kd_ratio:g} ")
        + f"{cfg.loss}{cfg.loss_args or ''}")
    if lm_stream is not None:
        objective += f" + {cfg.lm_coef:g} LM CE ({len(lm_items)} text blocks)"
    info(f"{run_name}: {len(train_items)} training examples, {total} optimiser steps "
         f"(batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {world} processes), "
         f"loss = {objective}, device {accelerator.device}, mixed precision {mixed_precision}"
         + (", fused linear (no [N, V] logits)" if fused else "")
         + (f", token mean {cfg.token_mean}" if world > 1 else "")
         + (f"; on-policy: student samples with probability {cfg.student_gen_ratio:g} per micro-batch "
            f"(T={cfg.gen_temperature:g}, top-p {cfg.gen_top_p:g}, top-k {cfg.gen_top_k}, <= "
            f"{cfg.gen_max_new_tokens} new tokens) into a replay buffer of {cfg.replay_buffer_size}"
            if onpolicy is not None else ""), main_process=main)

    student.train()
    start = time.time()
    window_start = time.time()
    bar = tqdm(total=total, initial=step, desc=run_name, disable=not main, dynamic_ncols=True, leave=True)
    while step < total:
        # Every micro-batch of the step first: the token mean is over all of them (accumulation.py).
        micro_items = []
        for _ in range(cfg.grad_accum):
            items = stream.next()
            if onpolicy is not None:
                items, generated = onpolicy.training_items(items, accelerator.unwrap_model(student))
                window["generated"] += int(generated)
            micro_items.append(items)
        batches = [to_device(collate(items), accelerator.device) for items in micro_items]
        lm_batches = ([to_device(collate(lm_stream.next()), accelerator.device) for _ in range(cfg.grad_accum)]
                      if lm_stream is not None else None)

        def kd_loss(batch, denominator):
            if fused:
                return fused_distill_loss(student, teacher, batch, cfg.loss_args, cfg.kd_ratio, vocab, denominator)
            return distill_loss(student, teacher, batch, kd_fn, cfg.kd_ratio, vocab, denominator)

        def lm_loss(lm_batch, lm_denominator):
            lm_logits = student(**model_inputs(lm_batch), use_cache=False).logits
            if vocab is not None:
                lm_logits = lm_logits[..., :vocab]
            lm_tokens = (lm_batch["labels"] != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
            return token_cross_entropy(lm_logits, lm_batch["labels"]) * (lm_tokens / lm_denominator)

        for loss, parts, lm in accumulate_step(accelerator, student, batches, kd_loss, lm_batches=lm_batches,
                                               lm_fn=lm_loss, lm_coef=cfg.lm_coef, token_mean=cfg.token_mean):
            # Each value is (micro-batch token sum) / (window count / accumulation steps): their mean
            # over the window's micro-batches is the window's token mean.
            window["loss"] += loss.item()
            window["ce"] += parts["ce"].item()
            window["kd"] += parts.get("kd", torch.zeros(())).item()
            window["tokens"] += int(parts["tokens"])
            window["micro"] += 1
            if lm is not None:
                window["lm"] += lm.item()
                window["loss"] += cfg.lm_coef * lm.item()
        grad_norm = accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            m = max(window["micro"], 1)
            # Per-rank values are (rank's token sum) / (global count / K): their mean over
            # ranks is the global token mean.  A collective: every rank gets here together.
            loss_m, ce_m, kd_m, lm_m, tokens = reduce_mean(
                [window["loss"] / m, window["ce"] / m, window["kd"] / m, window["lm"] / m, window["tokens"]],
                accelerator)
            record = {"step": step, "epoch": round(stream.epoch_progress, 4), "lr": scheduler.get_last_lr()[0],
                      "loss": loss_m, "ce": ce_m,
                      # DeepSpeed reports no norm before its engine has stepped
                      "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                      "tokens_per_s": tokens * world / max(time.time() - window_start, 1e-9)}
            if cfg.kd_ratio > 0:
                record["kd"] = kd_m
            if lm_stream is not None:
                record["lm"] = lm_m
            if onpolicy is not None:
                record.update(generated_frac=window["generated"] / m, buffer=len(onpolicy.buffer))
            log.write(**record)
            trackers.log(record)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "ce", "kd") if k in record})
            window = _new_window()
            window_start = time.time()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            val = validate(accelerator, student, teacher, val_batches, kd_fn, cfg.kd_ratio, vocab,
                           eval_loss if fused else None)
            log.write(step=step, **val)
            trackers.log(dict(step=step, **val))
        if best is not None:
            record = best.maybe_evaluate(student, step, stream.epoch_progress, step == total)
            if record is not None:
                log.write(**record)
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            ckpt.save(step, trainer_state())
        inject_fault("after-step", step)
    bar.close()
    seconds = time.time() - start
    final_val = validate(accelerator, student, teacher, val_batches, kd_fn, cfg.kd_ratio, vocab,
                         eval_loss if fused else None)
    log.write(step=step, **final_val)
    trackers.log(dict(step=step, **final_val))
    trackers.close()
    final_dir = os.path.join(out_dir, "final")
    save_model(accelerator, student, tokenizer, final_dir, extra={"step": step, "epoch": stream.epoch_progress})
    info(f"{run_name}: {step} steps in {seconds:.1f}s; validation " +
         ", ".join(f"{k} {v:.4f}" for k, v in final_val.items()) + f"; saved {final_dir}", main_process=main)
    summary = {"run": run_name, "steps": step, "train_seconds": seconds, "final_dir": final_dir,
               "model": accelerator.unwrap_model(student), **final_val}
    if best is not None and best.best is not None:
        summary.update(best_dir=best.dir, best=dict(best.best))
    if onpolicy is not None:
        summary["onpolicy"] = dict(onpolicy.stats, buffer=len(onpolicy.buffer))
    return summary
