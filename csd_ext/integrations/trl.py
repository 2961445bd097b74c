"""``CSDGKDTrainer``: TRL's GKD trainer with CSD in place of the generalised JSD.

Why GKD's ``generalized_jsd_loss``: it is TRL's documented point to change the divergence, and
GKD keeps everything else (the causal shift, the ``labels != -100`` completion mask, on-policy
sampling with probability ``lmbda``, ``seq_kd``, the teacher's placement).  TRL's newer
``DistillationTrainer`` computes its chunked JSD in a private module-level function with no
method to override, so it has no clean hook for another divergence.

Token normalisation is GKD's own: with ``num_items_in_batch`` (transformers counts the label
tokens of the whole accumulated batch) the loss is the token sum divided by it, otherwise the
mean over the micro-batch's counted tokens.  Note that with on-policy samples (``lmbda`` > 0) TRL
counts ``num_items_in_batch`` on the dataset's labels *before* the completions are regenerated;
the loss inherits that count from GKD unchanged.

Tested with TRL 1.16 (``trl.experimental.gkd``); needs TRL >= 1.7, whose GKD passes
``num_items_in_batch`` to the loss (huggingface/trl#6006).
"""

from ._versions import require

require("trl")
require("transformers")

from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from ..loss import csd_loss  # noqa: E402
from ._options import check_csd_kwargs  # noqa: E402

__all__ = ["CSDGKDTrainer", "GKDConfig"]

_REDUCTIONS = {"batchmean": "mean", "mean": "mean", "sum": "sum", "none": "none"}


class CSDGKDTrainer(GKDTrainer):
    """``GKDTrainer`` whose divergence is CSD.

    ``csd_kwargs``: ``weighting``, ``alpha``, ``temperature`` of :func:`csd_ext.csd_loss`.
    GKDConfig's ``beta`` is not used (it is the JSD's mixture weight); its ``temperature`` and
    ``lmbda`` keep their GKD meaning (sampling temperature, on-policy probability).
    """

    def __init__(self, *args, csd_kwargs=None, **kwargs):
        self.csd_kwargs = check_csd_kwargs(csd_kwargs)
        self.csd_kwargs.pop("chunk_size", None)
        super().__init__(*args, **kwargs)

    def generalized_jsd_loss(self, student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean", num_items_in_batch=None):
        """CSD with GKD's call signature (``beta`` and GKD's ``temperature`` argument are unused:
        CSD's temperature comes from ``csd_kwargs``)."""
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {sorted(_REDUCTIONS)}, got {reduction!r}")
        if num_items_in_batch is not None:
            total = csd_loss(student_logits, teacher_logits, labels, reduction="sum", **self.csd_kwargs)
            if hasattr(num_items_in_batch, "to"):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch
        return csd_loss(student_logits, teacher_logits, labels, reduction=_REDUCTIONS[reduction], **self.csd_kwargs)
