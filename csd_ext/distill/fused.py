"""``--fused-linear``: the KD (CSD) and CE terms straight from hidden states and LM heads.

With it neither the student's nor the teacher's ``[B, T, V]`` logits are materialised: both
models' final hidden states go through :func:`csd_ext.fused_linear_csd` (and the CE through a
chunked, recomputed cross-entropy), which is what keeps a 256k vocabulary (Gemma) from needing
``[N, 256k]`` buffers.  "auto" turns it on for the CSD loss from 100k vocabulary entries.
Only the CSD loss has a fused kernel: other losses with ``--fused-linear on`` are an error.
"""

import torch

from ..integrations._heads import output_head
from ..integrations.transformers import FUSED_VOCAB_THRESHOLD, distillation_sums
from .config import ConfigError
from .data import IGNORE_INDEX

CHOICES = ("auto", "on", "off")


def use_fused_linear(cfg, student, vocab=None):
    """Whether this run takes the fused path; raises ValueError for an impossible request."""
    setting = str(cfg.fused_linear).lower()
    if setting not in CHOICES:
        raise ConfigError(f"fused_linear must be one of {list(CHOICES)}, got {cfg.fused_linear!r}")
    if setting == "off" or cfg.kd_ratio == 0:
        return False
    if cfg.loss != "csd":
        if setting == "on":
            raise ConfigError(f"--fused-linear on needs --loss csd (no fused kernel for {cfg.loss!r})")
        return False
    if setting == "on":
        return True
    size = vocab if vocab is not None else output_head(student).weight.shape[0]
    return size >= FUSED_VOCAB_THRESHOLD


def fused_distill_loss(student, teacher, batch, loss_args, kd_ratio, vocab=None, denominator=None):
    """``trainer.distill_loss`` on the fused path: same (loss, parts) contract and values.

    The labels are already aligned with the positions (csd-distill shifts them when encoding).
    """
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    inputs["use_cache"] = False
    csd_kwargs = {k: v for k, v in (loss_args or {}).items() if k in ("weighting", "alpha", "temperature")}
    total, sums, _ = distillation_sums(student, teacher, inputs, labels, kd_ratio=kd_ratio, csd_kwargs=csd_kwargs,
                                       use_fused_linear=True, vocab_size=vocab, log_ce=True)
    tokens = (labels != IGNORE_INDEX).sum()
    div = tokens.clamp(min=1).to(torch.float32) if denominator is None else denominator
    parts = {"tokens": tokens}
    parts["ce"] = (sums["ce"] / div).detach()
    if "kd" in sums:
        parts["kd"] = (sums["kd"] / div).detach()
    return total / div, parts
