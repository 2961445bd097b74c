"""csd-distill end to end on tiny random models of each preset's family (GPT-2, LLaMA, Gemma)."""

import dataclasses
import json
import os

import pytest
import torch

from csd_ext.distill.config import build_config
from csd_ext.distill.data import Collator
from csd_ext.distill.models import ModelError, check_same_tokenizer, load_pair, shared_vocab
from csd_ext.distill.run import load_data
from csd_ext.distill.trainer import distill_loss, param_groups, train
from csd_ext.losses import get_loss
from distill_helpers import make_tokenizer, save_model, write_dolly


def make_cfg(tmp_path, teacher, student, **changes):
    data = write_dolly(tmp_path / "train.jsonl", n=8)
    evald = write_dolly(tmp_path / "eval.jsonl", n=4, start=100)
    cfg = build_config(overrides=dict(teacher=teacher, student=student, train_data=data, eval_data=evald,
                                      output_dir=str(tmp_path / "run"), max_length=200, max_prompt_length=160,
                                      batch_size=8, lr=1e-2, min_lr=1e-2, max_steps=2, log_every=1,
                                      eval_seeds=[10], eval_max_examples=2, max_new_tokens=4))
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_two_csd_steps_reduce_the_loss_on_a_fixed_batch(tmp_path, family):
    tok = make_tokenizer(with_bos=family != "gpt2")
    teacher_dir = save_model(tmp_path / "teacher", family, tok, size="teacher", seed=1)
    student_dir = save_model(tmp_path / "student", family, tok, size="student", seed=2)
    cfg = make_cfg(tmp_path, teacher_dir, student_dir, loss_args={"weighting": "SS"})
    teacher, student, tokenizer = load_pair(cfg, "no", log=lambda m: None)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    train_items, eval_items = load_data(cfg, tokenizer)
    assert len(train_items) == 8  # one batch: the same 8 examples every step
    batch = Collator(tokenizer.pad_token_id)(train_items)
    kd = get_loss("csd", weighting="SS")

    def loss_now():
        student.eval()
        with torch.no_grad():
            return distill_loss(student, teacher, batch, kd, 1.0)[0].item()

    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = loss_now()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(
        {k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "position_ids")}), with_kwargs=True)
        for m in (student, teacher)]
    result = train(cfg, student, teacher, tokenizer, train_items, eval_items, cfg.output_dir)
    for h in hooks:
        h.remove()
    after = loss_now()
    assert result["steps"] == 2
    assert after < before, f"{family}: CSD loss {before:.5f} -> {after:.5f} after two steps"
    # The teacher is untouched and saw exactly the student's inputs (student, teacher, student, teacher, ...).
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    for s_in, t_in in zip(seen[0::2], seen[1::2]):
        for k in s_in:
            assert torch.equal(s_in[k], t_in[k])
    # Outputs: safetensors checkpoint, metrics log.
    final = os.path.join(cfg.output_dir, "final")
    assert os.path.exists(os.path.join(final, "model.safetensors"))
    records = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert "val_ce" in records[-1] and "val_kd" in records[-1]


def test_mixed_objective_and_sft_without_teacher(tmp_path):
    tok = make_tokenizer()
    t_dir = save_model(tmp_path / "t", "gpt2", tok, size="teacher", seed=1)
    s_dir = save_model(tmp_path / "s", "gpt2", tok, seed=2)
    cfg = make_cfg(tmp_path, t_dir, s_dir, loss="srkl", loss_args={"lam": 0.1}, kd_ratio=0.5)
    teacher, student, tokenizer = load_pair(cfg, "no", log=lambda m: None)
    batch = Collator(tokenizer.pad_token_id)(load_data(cfg, tokenizer)[0])
    loss, parts = distill_loss(student, teacher, batch, get_loss("srkl", lam=0.1), 0.5)
    torch.testing.assert_close(loss.detach(), 0.5 * parts["ce"] + 0.5 * parts["kd"])
    # kd_ratio 0: plain SFT, no teacher is loaded or needed.
    sft = dataclasses.replace(cfg, kd_ratio=0.0, teacher=None)
    teacher, student, tokenizer = load_pair(sft, "no", log=lambda m: None)
    assert teacher is None
    loss, parts = distill_loss(student, None, batch, None, 0.0)
    assert "kd" not in parts and torch.equal(loss.detach(), parts["ce"])


def test_padded_head_is_sliced_to_the_shared_vocabulary(tmp_path):
    tok = make_tokenizer()
    t_dir = save_model(tmp_path / "t", "llama", tok, size="teacher", extra_vocab=24, seed=1)
    s_dir = save_model(tmp_path / "s", "llama", tok, seed=2)
    cfg = make_cfg(tmp_path, t_dir, s_dir)
    teacher, student, tokenizer = load_pair(cfg, "no", log=lambda m: None)
    logs = []
    vocab = shared_vocab(teacher, student, tokenizer, log=logs.append)
    assert vocab == len(tokenizer) and "slicing both" in logs[0]
    train_items, eval_items = load_data(cfg, tokenizer)
    result = train(cfg, student, teacher, tokenizer, train_items, eval_items, cfg.output_dir, vocab=vocab)
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["val_kd"]))


def test_mismatched_tokenizers_are_refused(tmp_path):
    a = make_tokenizer(vocab_size=300)
    b = make_tokenizer(vocab_size=330)
    with pytest.raises(ModelError, match=r"different tokenizers \(300 vs 330 tokens"):
        check_same_tokenizer(a, b, "T", "S")
    t_dir = save_model(tmp_path / "t", "gpt2", a, size="teacher")
    s_dir = save_model(tmp_path / "s", "gpt2", b)
    with pytest.raises(ModelError, match="use different tokenizers"):
        load_pair(make_cfg(tmp_path, t_dir, s_dir), "no", log=lambda m: None)


def test_no_weight_decay_on_biases_and_norms():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(".bias" in names[id(p)] or "ln_" in names[id(p)] for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"}


def test_lora_student_trains_only_adapters(tmp_path):
    tok = make_tokenizer()
    t_dir = save_model(tmp_path / "t", "llama", tok, size="teacher", seed=1)
    s_dir = save_model(tmp_path / "s", "llama", tok, seed=2)
    cfg = make_cfg(tmp_path, t_dir, s_dir, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    teacher, student, tokenizer = load_pair(cfg, "no", log=lambda m: None)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    train_items, eval_items = load_data(cfg, tokenizer)
    train(cfg, student, teacher, tokenizer, train_items, eval_items, cfg.output_dir)
    assert os.path.exists(os.path.join(cfg.output_dir, "final", "adapter_model.safetensors"))
