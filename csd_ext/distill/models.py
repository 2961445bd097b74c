"""Loading teacher, student and tokenizer; the tokenizer check, vocabulary slicing and LoRA."""

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelError(ValueError):
    """A teacher/student pair that cannot be distilled as configured."""


def resolve_mixed_precision(setting):
    """'auto' -> bf16 on GPUs that have it, fp16 on older GPUs, 'no' on CPU."""
    if setting != "auto":
        if setting != "no" and not torch.cuda.is_available():
            raise ModelError(f"mixed_precision={setting!r} needs a CUDA GPU; use 'no' (or 'auto') on CPU")
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_teacher_dtype(setting, mixed_precision):
    if setting != "auto":
        return DTYPES[setting]
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_tokenizer(name_or_path, *, trust_remote_code=False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load a tokenizer from {name_or_path!r} ({exc}). If that model "
                         f"directory has none, pass --tokenizer with the one teacher and student share") from exc
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer of {name_or_path!r} has no eos token; the data format ends each "
                         f"response with eos")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad = eos, as in MiniLLM; padded labels are -100 anyway
    tok.padding_side = "right"
    return tok


def check_same_tokenizer(teacher_tok, student_tok, teacher_name="teacher", student_name="student"):
    """Refuse pairs whose tokenizers differ: logit distillation compares token ids one to one."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        example = next(
            ((tok, tv.get(tok), sv.get(tok)) for tok in sorted(set(tv) | set(sv)) if tv.get(tok) != sv.get(tok)),
            None,
        )
        detail = f"token {example[0]!r} has id {example[1]} in the teacher's and {example[2]} in the student's"
        raise ModelError(
            f"the teacher ({teacher_name}) and the student ({student_name}) use different tokenizers "
            f"({len(tv)} vs {len(sv)} tokens; {detail}). Logit distillation needs one vocabulary: pick a "
            f"student from the teacher's model family, or pass --tokenizer if one is shared."
        )
    for attr in ("eos_token_id", "bos_token_id"):
        a, b = getattr(teacher_tok, attr), getattr(student_tok, attr)
        if a != b:
            raise ModelError(f"the teacher's and the student's tokenizers differ in {attr} ({a} vs {b})")


def output_vocab_size(model):
    return model.get_output_embeddings().weight.shape[0]


def shared_vocab(teacher, student, tokenizer, log=print):
    """How many logits to keep: None (all) when the heads agree, else the tokenizer's size.

    Padded heads differ across sizes of one family (Qwen2.5 1.5B: 151936, 7B:
    152064); the entries past the tokenizer are never targets, so both sides
    are sliced to the tokenizer's vocabulary.
    """
    if teacher is None:
        return None
    vt, vs = output_vocab_size(teacher), output_vocab_size(student)
    if vt == vs:
        return None
    v = len(tokenizer)
    if v > min(vt, vs):
        raise ModelError(f"the tokenizer has {v} tokens but the teacher's head has {vt} and the student's {vs}: "
                         f"they cannot share one vocabulary")
    log(f"vocab sizes differ (teacher head {vt}, student head {vs}): slicing both to the tokenizer's {v} entries")
    return v


def load_causal_lm(name_or_path, *, dtype=torch.float32, trust_remote_code=False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)


def freeze_teacher(teacher):
    """Frozen and in eval mode (no dropout): the teacher is a fixed target."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def apply_lora(student, *, r, alpha, dropout, target_modules, log=print):
    """Wrap the student with peft LoRA adapters (only they train)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    student = get_peft_model(student, config)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    log(f"LoRA r={r} alpha={alpha} dropout={dropout} on {target_modules}: "
        f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters train")
    return student


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def load_pair(cfg, mixed_precision, log=print):
    """(teacher or None, student, tokenizer) as configured; teacher frozen, tokenizers checked."""
    tok_name = cfg.tokenizer or cfg.student
    tokenizer = load_tokenizer(tok_name, trust_remote_code=cfg.trust_remote_code)
    teacher = None
    if cfg.kd_ratio > 0:
        if cfg.tokenizer is None:
            teacher_tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
            check_same_tokenizer(teacher_tok, tokenizer, cfg.teacher, cfg.student)
        teacher = freeze_teacher(load_causal_lm(
            cfg.teacher, dtype=resolve_teacher_dtype(cfg.teacher_dtype, mixed_precision),
            trust_remote_code=cfg.trust_remote_code))
        log(f"teacher {cfg.teacher}: {count_parameters(teacher) / 1e6:.2f}M parameters, "
            f"{next(teacher.parameters()).dtype}, frozen")
    # Trainable weights stay fp32 (autocast does the bf16/fp16 math); with LoRA the
    # frozen base can live in the half type.
    student_dtype = torch.float32
    if (cfg.lora_r > 0 or cfg.lora_adapter) and mixed_precision != "no":
        student_dtype = DTYPES[mixed_precision]
    student = load_causal_lm(cfg.student, dtype=student_dtype, trust_remote_code=cfg.trust_remote_code)
    log(f"{'student' if cfg.kd_ratio > 0 else 'model to fine-tune'} {cfg.student}: "
        f"{count_parameters(student) / 1e6:.2f}M parameters")
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        student.config.use_cache = False
    if cfg.lora_adapter:
        # ImitKD starts from the student's SFT: its LoRA adapter is loaded and trained further.
        from peft import PeftModel

        student = PeftModel.from_pretrained(student, cfg.lora_adapter, is_trainable=True)
        log(f"LoRA adapter {cfg.lora_adapter} loaded on the student; it trains on")
    elif cfg.lora_r > 0:
        student = apply_lora(student, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_target_modules, log=log)
    return teacher, student, tokenizer
