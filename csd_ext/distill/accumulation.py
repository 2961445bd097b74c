"""One optimiser step's forward/backward passes under gradient accumulation, through accelerate.

Why a window-level token count: the KD/CE objectives are token means.  Dividing each
micro-batch's token sum by its *own* count and then by the accumulation steps weights the
tokens of short micro-batches more than those of long ones, so batch 2 x accumulation 4 would
not give the gradient of batch 8.  Here every micro-batch of the step is fetched first, the
scored tokens of all of them (and, with ``token_mean="global"``, of all processes) are counted
once, and each micro-batch's token sum is divided by that one count: the accumulated gradient is
exactly the token mean over the whole step, however it is split (transformers #37766 is the same
pitfall in HF Trainer).

Why ``accelerator.accumulate``: the Accelerator is built with ``gradient_accumulation_steps``, so
accelerate itself decides on which backward gradients are synchronised (DDP ``no_sync``,
FSDP), and under DeepSpeed it marks the accumulation boundary so that the engine steps once per
window instead of on every backward.  ``accelerator.backward`` divides by the accumulation steps
(DeepSpeed's engine does the same), which the denominators below undo.
"""

import contextlib

import torch

from ..integrations._versions import require
from .data import IGNORE_INDEX

# gradient_accumulation_steps on the Accelerator, accumulate(), DeepSpeed accumulation boundaries
require("accelerate")


def window_denominator(label_batches, accelerator, mode="global"):
    """What each micro-batch's token sum is divided by, so that after accelerate's division by
    the accumulation steps and DDP's average over processes the gradient is the token mean of the
    whole step ("global": over every process's tokens; "per_rank": over this rank's own, then
    averaged over ranks).  Counted on the device; never 0."""
    count = sum((labels != IGNORE_INDEX).sum() for labels in label_batches)
    steps = accelerator.gradient_accumulation_steps
    world = accelerator.num_processes
    if mode == "global" and world > 1:
        count = count.clone()
        torch.distributed.all_reduce(count)  # int64: exact
        return count.clamp(min=1).to(torch.float32) / (world * steps)
    return count.clamp(min=1).to(torch.float32) / steps


def check_window(n_batches, accelerator):
    if n_batches != accelerator.gradient_accumulation_steps:
        raise ValueError(f"{n_batches} micro-batches for one optimiser step, but the Accelerator accumulates "
                         f"{accelerator.gradient_accumulation_steps}")


def accumulate_step(accelerator, model, batches, loss_fn, *, lm_batches=None, lm_fn=None, lm_coef=0.0,
                    token_mean="global"):
    """The forward and backward passes of one optimiser step; returns [(loss, parts, lm), ...] per micro-batch.

    ``loss_fn(batch, denominator) -> (loss, parts)``: the micro-batch's token sum / denominator.
    ``lm_fn(batch, denominator) -> lm``: the same for the optional LM term (a second forward and
    backward per micro-batch, weighted by ``lm_coef``: DDP allows one forward per backward).
    The optimiser step itself is left to the caller.
    """
    check_window(len(batches), accelerator)
    denominator = window_denominator([b["labels"] for b in batches], accelerator, token_mean)
    lm_denominator = None
    if lm_batches is not None:
        check_window(len(lm_batches), accelerator)
        lm_denominator = window_denominator([b["labels"] for b in lm_batches], accelerator, token_mean)
    results = []
    for k, batch in enumerate(batches):
        with accelerator.accumulate(model):
            # With an LM term, the last micro-batch's first backward is not the one that ends the step.
            hold = lm_batches is not None and accelerator.sync_gradients
            with accelerator.no_sync(model) if hold else contextlib.nullcontext():
                loss, parts = loss_fn(batch, denominator)
                accelerator.backward(loss)
            lm = None
            if lm_batches is not None:
                lm = lm_fn(lm_batches[k], lm_denominator)
                accelerator.backward(lm_coef * lm)
        results.append((loss.detach(), parts, None if lm is None else lm.detach()))
    return results


def configure_deepspeed(accelerator, cfg):
    """Fill a DeepSpeed config's "auto" entries from the run's settings and refuse the set-ups this
    loop cannot make correct (see docs/integrations.md).  A no-op without DeepSpeed.

    DeepSpeed clips gradients and steps inside ``engine.step()`` on the backward that ends a
    window, so its accumulation steps, micro-batch size and clipping must be this run's.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    from .models import ModelError

    if cfg.lm_data:
        raise ModelError("--lm-data under DeepSpeed is not supported: its second backward per micro-batch would "
                         "make the DeepSpeed engine step before the LM gradient is added (accelerate steps the "
                         "engine on the backward that ends a window). Use DDP or FSDP2 for --lm-data runs")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    want = {"gradient_accumulation_steps": cfg.grad_accum, "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_clipping": float(cfg.max_grad_norm or 0.0),
            "train_batch_size": cfg.batch_size * cfg.grad_accum * accelerator.num_processes}
    flags = {"gradient_accumulation_steps": "--grad-accum", "train_micro_batch_size_per_gpu": "--batch-size",
             "gradient_clipping": "--max-grad-norm", "train_batch_size": "--batch-size x --grad-accum x processes"}
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have in ("auto", None):
            ds[key] = value
        elif float(have) != float(value):
            raise ModelError(f"the DeepSpeed config has {key}={have} but this run needs {value} "
                             f"({flags[key]}): set it to \"auto\" or to {value}")
    accelerator.gradient_accumulation_steps = cfg.grad_accum
