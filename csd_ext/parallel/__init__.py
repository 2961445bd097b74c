"""Vocab-parallel (tensor-parallel) CSD: the loss and the fused linear path on logits and
LM heads split over the vocabulary across ranks.  See docs/parallel.md."""

from .fused import vocab_parallel_fused_linear_csd
from .loss import VocabParallelCSDLoss, vocab_parallel_csd_loss

__all__ = ["vocab_parallel_csd_loss", "VocabParallelCSDLoss", "vocab_parallel_fused_linear_csd"]
