"""``CSDTrainer``: an HF ``transformers.Trainer`` that distils a teacher into the model with CSD.

    trainer = CSDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                         train_dataset=..., data_collator=...,
                         csd_kwargs=dict(weighting="SS", temperature=1.0), kd_ratio=1.0)

Loss = (1 - kd_ratio) * CE + kd_ratio * CSD, both token means over the positions whose
(shifted) label is not -100.  Why a subclass and not a ``compute_loss_func``: the loss needs
the teacher's outputs, and the teacher must stay out of the optimiser and the checkpoints.

Gradient accumulation (transformers #37766): Trainer counts the label tokens of every
micro-batch of an optimiser step (and, with ``average_tokens_across_devices``, of every
process) *before* the step and passes that count as ``num_items_in_batch``.  This trainer
divides its token *sums* by it and tells Trainer the loss is already scaled
(``loss_is_scaled_for_ga``), so one step's gradient does not depend on how the batch is split
into micro-batches or processes.  The plain ``Trainer`` recipe of a per-micro-batch mean
divided by the accumulation steps weights tokens unequally and, where transformers skips that
division (models that accept loss kwargs), is off by the accumulation factor.
"""

import torch
import torch.nn.functional as F

from ._versions import require

require("transformers")

from transformers import Trainer  # noqa: E402

from ..fused_linear import fused_linear_csd  # noqa: E402
from ..loss import csd_loss  # noqa: E402
from ._options import check_csd_kwargs, check_kd_ratio  # noqa: E402
from ._heads import hidden_states_and_head, linear_cross_entropy_sum, output_head  # noqa: E402

IGNORE_INDEX = -100
FUSED_VOCAB_THRESHOLD = 100_000  # use_fused_linear=None turns the fused path on from this vocabulary size
def shift_labels(labels):
    """labels[:, 1:] padded back to the same length with -100: position i is scored on token i + 1.

    Keeping the length lets the logits be used whole (a ``logits[:, :-1]`` slice would be copied)."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def head_for(head, hidden, vocab_size):
    """The LM head's (weight, bias) for fused_linear_csd: refused if sharded, cut to the first
    ``vocab_size`` rows (the shared vocabulary), and in the hidden states' dtype (under autocast
    the two may differ: compute as the head would)."""
    weight, bias = head.weight, head.bias
    check_unsharded(weight)
    if vocab_size is not None:
        weight, bias = weight[:vocab_size], None if bias is None else bias[:vocab_size]
    return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


def distillation_sums(student, teacher, inputs, labels, *, kd_ratio, csd_kwargs, use_fused_linear, vocab_size=None,
                      log_ce=False):
    """(loss sum over counted tokens, {"ce": sum, "kd": sum}, student outputs) for one micro-batch.

    ``labels`` are already shifted (aligned with the logits).  The teacher runs under no_grad.
    With ``use_fused_linear`` neither model's ``[B, T, V]`` logits are computed.  ``log_ce``:
    with kd_ratio = 1, also return the CE sum, computed without a graph (for logging).
    """
    parts = {}
    loss = None
    if use_fused_linear:
        hidden, head, outputs = hidden_states_and_head(student, inputs)
        weight, bias = head_for(head, hidden, vocab_size)
        if kd_ratio < 1:
            parts["ce"] = linear_cross_entropy_sum(hidden, weight, bias, labels)
            loss = (1 - kd_ratio) * parts["ce"]
        elif log_ce:
            with torch.no_grad():
                parts["ce"] = linear_cross_entropy_sum(hidden.detach(), weight.detach(),
                                                       None if bias is None else bias.detach(), labels)
        if kd_ratio > 0:
            with torch.no_grad():
                t_hidden, t_head, _ = hidden_states_and_head(teacher, inputs)
            t_weight, t_bias = head_for(t_head, t_hidden, vocab_size)
            check_same_vocab(weight.shape[0], t_weight.shape[0])
            parts["kd"] = fused_linear_csd(
                hidden, weight, None, labels, teacher_hidden=t_hidden, teacher_weight=t_weight,
                student_bias=bias, teacher_bias=t_bias, reduction="sum", **csd_kwargs)
            loss = kd_ratio * parts["kd"] if loss is None else loss + kd_ratio * parts["kd"]
        return loss, parts, outputs

    outputs = student(**inputs)
    logits = outputs.logits if vocab_size is None else outputs.logits[..., :vocab_size]
    if kd_ratio < 1:
        parts["ce"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="sum")
        loss = (1 - kd_ratio) * parts["ce"]
    if kd_ratio > 0:
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        if vocab_size is not None:
            t_logits = t_logits[..., :vocab_size]
        check_same_vocab(logits.shape[-1], t_logits.shape[-1])
        kwargs = {k: v for k, v in csd_kwargs.items() if k != "chunk_size"}
        parts["kd"] = csd_loss(logits, t_logits, labels, reduction="sum", **kwargs)
        loss = kd_ratio * parts["kd"] if loss is None else loss + kd_ratio * parts["kd"]
    return loss, parts, outputs


def check_unsharded(weight):
    """The fused path needs the whole LM head weight after the forward.  Under FSDP2 it is a
    DTensor shard there when the head is its own FSDP unit that reshards after forward."""
    if type(weight).__name__ == "DTensor":
        raise ValueError("use_fused_linear: lm_head.weight is still sharded (a DTensor) after the forward; keep "
                         "the LM head in the root FSDP module (do not fully_shard it on its own) or pass "
                         "use_fused_linear=False")


def check_same_vocab(student_vocab, teacher_vocab):
    if student_vocab != teacher_vocab:
        raise ValueError(f"the student's LM head has {student_vocab} outputs and the teacher's {teacher_vocab}: "
                         "pass vocab_size=<shared tokenizer size> to compare only the shared entries")


class CSDTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``(1 - kd_ratio) * CE + kd_ratio * CSD(student, teacher)``.

    Args (besides Trainer's):
        teacher_model: the frozen teacher (same tokenizer).  It is put in eval mode with
            ``requires_grad_(False)``, moved to the student's device and cast to the student's
            floating dtype; it is not part of the optimiser or of any checkpoint (pass
            ``teacher_dtype`` to keep another dtype).
        csd_kwargs: options of :func:`csd_ext.csd_loss`: ``weighting``, ``alpha``, ``temperature``
            (and ``chunk_size`` of the fused path).
        kd_ratio: weight of the CSD term in [0, 1]; 0 is plain SFT (the teacher is not run).
        use_fused_linear: compute both models' LM heads inside :func:`csd_ext.fused_linear_csd`
            (and the CE chunk by chunk), so no ``[B, T, V]`` logits exist.  ``None``: on when
            the vocabulary has >= 100k entries.
        vocab_size: compare only the first ``vocab_size`` logits (heads padded past the shared
            tokenizer's size).

    Labels follow HF's convention (``labels = input_ids`` with -100 on prompt and padding); the
    causal shift is done here, once.  A batch may carry padding and ignored labels anywhere.
    """

    # compute_loss returns token sums / num_items_in_batch: already normalised over the whole
    # accumulated batch, so Trainer must not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *trainer_args, teacher_model=None, csd_kwargs=None, kd_ratio=1.0,
                 use_fused_linear=None, vocab_size=None, teacher_dtype=None, **kwargs):
        self.kd_ratio = check_kd_ratio(kd_ratio)
        self.csd_kwargs = check_csd_kwargs(csd_kwargs)
        if self.kd_ratio > 0 and teacher_model is None:
            raise ValueError("CSDTrainer: kd_ratio > 0 needs a teacher_model")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be None or an int >= 1, got {vocab_size!r}")
        super().__init__(model, args, *trainer_args, **kwargs)
        # The fused path multiplies lm_head.weight after the head's own (emptied) forward.  Under
        # FSDP2 the head normally sits in the root's group, which stays unsharded from the forward
        # to the backward, and the weight's gradient is reduce-scattered with the root's: tested
        # (forced FSDP2 on CPU).  FSDP1's flat parameters are untested: refuse there.
        fsdp = bool(getattr(self, "is_fsdp_enabled", False))
        fsdp_version = None
        if fsdp:
            fsdp_version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        if use_fused_linear is None:
            use_fused_linear = (fsdp_version in (None, 2)
                                and output_head(self.model).weight.shape[0] >= FUSED_VOCAB_THRESHOLD)
        if use_fused_linear and fsdp_version not in (None, 2):
            raise ValueError("CSDTrainer: use_fused_linear=True is not supported under FSDP version 1 (the fused path "
                             "reads lm_head.weight outside the head's forward, untested with FSDP1's flat "
                             "parameters); use FSDP2 (fsdp_config={'version': 2}) or pass use_fused_linear=False")
        self.use_fused_linear = bool(use_fused_linear)
        self.vocab_size = vocab_size
        # Make Trainer count the label tokens of the whole accumulated batch (it does so only
        # for models that take loss kwargs), over labels[..., 1:] as our loss shifts them.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.teacher_model = None if teacher_model is None else self._place_teacher(teacher_model, teacher_dtype)

    def _place_teacher(self, teacher, dtype):
        if dtype is None:
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        teacher = teacher.eval().requires_grad_(False)
        return teacher.to(device=self.args.device, dtype=dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["shift_labels"] if "shift_labels" in inputs else shift_labels(inputs["labels"])
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        model_inputs.setdefault("use_cache", False)
        loss_sum, parts, outputs = distillation_sums(
            model, self.teacher_model, model_inputs, labels, kd_ratio=self.kd_ratio, csd_kwargs=self.csd_kwargs,
            use_fused_linear=self.use_fused_linear, vocab_size=self.vocab_size)
        if num_items_in_batch is None:  # evaluation, or a caller that does not count: this batch's mean
            count = (labels != IGNORE_INDEX).sum()
        else:
            count = num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch counts every process's tokens and DDP averages the
                # gradients over processes: scale back up so the result is the global token mean.
                loss_sum = loss_sum * self.accelerator.num_processes
        if torch.is_tensor(count):
            count = count.to(loss_sum.device)
        loss = loss_sum / (count.clamp(min=1) if torch.is_tensor(count) else max(count, 1))
        return (loss, outputs) if return_outputs else loss
