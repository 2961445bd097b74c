"""On-policy distillation: label alignment on generated sequences, the replay buffer,
plain-text LM data, and a two-step on-policy run on tiny models."""

import json
import os
import random

import pytest
import torch

from csd_ext import csd_loss
from csd_ext.distill.data import IGNORE_INDEX, Collator, DataError, encode_dataset, load_dolly_jsonl
from csd_ext.distill.lm_data import load_lm_texts, pack_lm_examples
from csd_ext.distill.onpolicy import generated_example, sample_responses
from csd_ext.distill.replay_buffer import ReplayBuffer, make_rng, rng_state, set_rng_state
from csd_ext.distill.trainer import distill_loss, model_inputs
from csd_ext.losses import get_loss
from scale_utils import make_tiny_setup

EOS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_setup(str(tmp_path_factory.mktemp("tiny_onpolicy")), dropout=0.0)


@pytest.fixture(scope="module")
def pair(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    items = encode_dataset(tok, load_dolly_jsonl(tiny["train"])[:4], template="minillm", max_length=80,
                           max_prompt_length=64, log=lambda *_: None)
    return tok, student, teacher, items


# --- alignment -----------------------------------------------------------------------------

def test_generated_example_layout_by_hand():
    # prompt p0 p1 p2, sampled g0 g1 eos, then padding (pad = eos) that must be dropped
    ex = generated_example([5, 6, 7], [8, 9, EOS, EOS, EOS], eos_token_id=EOS, max_length=32)
    assert ex["input_ids"] == [5, 6, 7, 8, 9]
    # position 2 (p2) predicts g0, position 3 (g0) predicts g1, position 4 (g1) predicts eos
    assert ex["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, EOS]
    assert ex["prompt_ids"] == [5, 6, 7]


def test_generated_example_without_eos_and_truncated():
    ex = generated_example([5, 6], [8, 9, 10, 11], eos_token_id=EOS, max_length=32)
    assert ex["input_ids"] == [5, 6, 8, 9, 10] and ex["labels"] == [IGNORE_INDEX, 8, 9, 10, 11]
    # max_length 4 input tokens: full sequence cut to 5 tokens
    ex = generated_example([5, 6], [8, 9, 10, 11], eos_token_id=EOS, max_length=4)
    assert ex["input_ids"] == [5, 6, 8, 9] and ex["labels"] == [IGNORE_INDEX, 8, 9, 10]
    # an immediate eos is still one trained decision
    ex = generated_example([5, 6], [EOS, EOS], eos_token_id=EOS, max_length=4)
    assert ex["input_ids"] == [5, 6] and ex["labels"] == [IGNORE_INDEX, EOS]
    assert generated_example([5, 6], [], eos_token_id=EOS, max_length=4) is None


def _cut(gen, eos):
    return gen[: gen.index(eos) + 1] if eos in gen else gen


def test_kd_covers_exactly_the_generated_tokens(pair):
    """Real samples from the tiny student: every generated token (the first included) is a
    label exactly once, at the position that predicts it, and the KD loss the trainer
    computes is the mean over exactly those logit rows -- not the rows one position later
    (the paper code's off-by-one)."""
    tok, student, teacher, items = pair
    torch.manual_seed(0)
    prompts = [it["prompt_ids"] for it in items]
    gens = sample_responses(student, tok, prompts, max_new_tokens=6)
    examples = [generated_example(p, g, eos_token_id=tok.eos_token_id, max_length=80) for p, g in zip(prompts, gens)]
    for ex, p, g in zip(examples, prompts, gens):
        full = p + _cut(g, tok.eos_token_id)
        assert ex["input_ids"] == full[:-1]
        counted = [i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX]
        assert counted == list(range(len(p) - 1, len(full) - 1))
        assert [ex["labels"][i] for i in counted] == _cut(g, tok.eos_token_id)
        assert all(ex["labels"][i] == full[i + 1] for i in counted)

    batch = Collator(tok.pad_token_id)(examples)
    with torch.no_grad():
        loss, _ = distill_loss(student, teacher, batch, get_loss("csd"), 1.0)
        z = student(**model_inputs(batch)).logits
        t = teacher(**model_inputs(batch)).logits
    rows = [(b, i) for b, ex in enumerate(examples) for i in range(len(ex["prompt_ids"]) - 1, len(ex["input_ids"]))]
    manual = torch.stack([csd_loss(z[b, i], t[b, i]) for b, i in rows]).mean()
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=0)
    shifted = [(b, i + 1) for b, i in rows if i + 1 < z.shape[1]]
    off_by_one = torch.stack([csd_loss(z[b, i], t[b, i]) for b, i in shifted]).mean()
    assert abs(off_by_one.item() - loss.item()) > 1e-3 * loss.item()


# --- replay buffer ---------------------------------------------------------------------------

def _entry(k):
    return {"input_ids": [k, k], "labels": [IGNORE_INDEX, k], "prompt_ids": [k]}


def test_buffer_is_fifo_with_capacity():
    buf = ReplayBuffer(3)
    buf.push([_entry(k) for k in range(2)])
    assert len(buf) == 2
    buf.push([_entry(k) for k in range(2, 5)])
    assert len(buf) == 3
    assert [e["input_ids"][0] for e in buf.items()] == [2, 3, 4]  # 0 and 1, the oldest, left first


def test_buffer_sampling_is_uniform_distinct_and_reproducible():
    buf = ReplayBuffer(10)
    buf.push([_entry(k) for k in range(10)])
    rng = make_rng(1)
    draws = [buf.sample(4, rng) for _ in range(2000)]
    for d in draws[:50]:
        keys = [e["input_ids"][0] for e in d]
        assert len(set(keys)) == 4
    counts = torch.bincount(torch.tensor([e["input_ids"][0] for d in draws for e in d]), minlength=10).float()
    expected = 2000 * 4 / 10
    assert ((counts - expected).abs() / expected).max() < 0.1  # each entry ~ 800 times
    assert len(buf.sample(50, rng)) == 10  # never more than it holds
    # the same generator state gives the same draws
    a, b = make_rng(5), make_rng(0)
    set_rng_state(b, rng_state(a))
    assert buf.sample(4, a) == buf.sample(4, b)


def test_buffer_state_round_trip_and_errors():
    buf = ReplayBuffer(4)
    buf.push([_entry(k) for k in range(6)])
    state = json.loads(json.dumps(buf.state_dict()))
    other = ReplayBuffer(4)
    other.load_state_dict(state)
    assert other.items() == buf.items()
    with pytest.raises(ValueError, match="capacity changed"):
        ReplayBuffer(5).load_state_dict(state)
    with pytest.raises(ValueError, match="capacity must be an integer > 0"):
        ReplayBuffer(0)
    with pytest.raises(ValueError, match="empty replay buffer"):
        ReplayBuffer(2).sample(1, random.Random(0))
    with pytest.raises(ValueError, match="missing labels"):
        ReplayBuffer(2).push([{"input_ids": [1], "prompt_ids": [1]}])


# --- LM data ---------------------------------------------------------------------------------

def test_lm_data_packing(tmp_path, pair):
    tok = pair[0]
    txt = tmp_path / "lm.txt"
    txt.write_text("first document\nstill first\n\nsecond document\n\n\n")
    texts = load_lm_texts(str(txt))
    assert texts == ["first document\nstill first", "second document"]
    items = pack_lm_examples(tok, texts, max_length=5)
    stream = [x for t in texts for x in tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]]
    rebuilt = []
    for it in items:
        assert len(it["input_ids"]) <= 5 and it["labels"][:-1] == it["input_ids"][1:]
        rebuilt += it["input_ids"] + it["labels"][-1:]
    assert rebuilt == stream[: len(rebuilt)] and len(stream) - len(rebuilt) <= 1  # a lone last token is dropped
    js = tmp_path / "lm.jsonl"
    js.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"txt": "c"}) + "\n")
    with pytest.raises(DataError, match=r"lm.jsonl:2: expected an object with a string 'text'"):
        load_lm_texts(str(js))
    with pytest.raises(DataError, match="does not exist"):
        load_lm_texts(str(tmp_path / "missing.txt"))


# --- a two-step on-policy run ---------------------------------------------------------------

def test_two_step_onpolicy_run(tiny, tmp_path):
    """student_gen_ratio 1, buffer of 6, batch 4, plus an LM loss: the teacher scores exactly
    the student's generated sequences, and the buffer evicts FIFO."""
    from csd_ext.distill.config import build_config
    from csd_ext.distill.lm_data import load_lm_data
    from csd_ext.distill.models import load_pair
    from csd_ext.distill.run import load_data
    from csd_ext.distill.trainer import train

    lm_path = tmp_path / "lm.txt"
    lm_path.write_text("\n\n".join(f"plain text number {k} for the language model loss" for k in range(12)))
    out = str(tmp_path / "run")
    cfg = build_config(overrides=dict(
        teacher=tiny["teacher"], student=tiny["student"], train_data=tiny["train"], eval_data=tiny["eval"],
        output_dir=out, max_length=80, max_prompt_length=64, batch_size=4, max_steps=2, log_every=1, lr=1e-3,
        student_gen_ratio=1.0, replay_buffer_size=6, gen_max_new_tokens=8, lm_data=str(lm_path), lm_coef=1.0,
        save_every=1, eval_seeds=[], seed=4))
    teacher, student, tok = load_pair(cfg, "no", log=lambda *_: None)
    train_items, eval_items = load_data(cfg, tok)
    lm_items = load_lm_data(cfg.lm_data, tok, cfg.max_length, log=lambda *_: None)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["input_ids"].clone(),
                                                                     kw["attention_mask"].clone())), with_kwargs=True)
    result = train(cfg, student, teacher, tok, train_items, eval_items, out, lm_items=lm_items)
    assert result["steps"] == 2
    assert result["onpolicy"] == {"generated_batches": 2, "generated_sequences": 8,
                                  "generated_tokens": result["onpolicy"]["generated_tokens"], "buffer": 6}
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in records if "generated_frac" in r]
    assert [(r["step"], r["generated_frac"], r["buffer"]) for r in steps] == [(1, 1.0, 4), (2, 1.0, 6)]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kd"], r["lm"]])).all() for r in steps)
    assert all(r["lm"] > 0 for r in steps)

    # After step 1 the buffer held exactly the 4 sequences generated then, and step 1 trained on all
    # of them: the teacher's first forward pass saw exactly those sequences.
    with open(os.path.join(out, "checkpoint-1", "trainer_state_rank0.json")) as f:
        state = json.load(f)
    buffered = sorted(tuple(e["input_ids"]) for e in state["onpolicy"]["buffer"]["items"])
    assert len(buffered) == 4
    ids, mask = seen[0]
    teacher_rows = sorted(tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask))
    assert teacher_rows == buffered
    dataset_rows = {tuple(it["input_ids"]) for it in train_items}
    assert not any(r in dataset_rows for r in teacher_rows)  # generated, not the references
