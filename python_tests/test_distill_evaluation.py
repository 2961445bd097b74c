"""The evaluation protocol: ROUGE-L with stemming, the five test sets' layouts, the multi-set
``csd-distill evaluate`` command, and best-checkpoint selection by dev ROUGE-L."""

import dataclasses
import json
import os

import pytest

from csd_ext.distill import main
from csd_ext.distill.config import build_config
from csd_ext.distill.data import DataError
from csd_ext.distill.eval_sets import eval_record, load_eval_set
from csd_ext.distill.evaluate import evaluate_model, rouge_l
from csd_ext.distill.models import load_causal_lm, load_pair
from csd_ext.distill.run import load_data
from csd_ext.distill.trainer import train
from distill_helpers import make_tokenizer, save_model, write_dolly


def test_rouge_l_stems_words():
    assert rouge_l(["running cats"], ["run cat"]) == pytest.approx(100.0)  # Porter stemming, as MiniLLM
    assert rouge_l(["dog"], ["cat"]) == 0.0


def test_eval_set_layouts(tmp_path):
    want = {"instruction": "Say hi.", "context": "", "response": "hi"}
    assert eval_record({"instruction": "Say hi.", "response": "hi"}) == want                   # Dolly
    assert eval_record({"instruction": "Say hi.", "input": "", "output": "hi"}) == want         # MiniLLM
    assert eval_record({"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}) == want  # SelfInst
    assert eval_record({"question_id": 1, "text": "Say hi.", "output": "hi"}) == want           # Vicuna
    assert eval_record({"definition": "Say hi.", "input": "x", "output": ["hi", "hello"]}) == dict(
        want, context="x")                                                                      # S-NI / UnNI
    with pytest.raises(DataError, match="no reference answer"):
        eval_record({"text": "Say hi."}, "v.jsonl:1")
    with pytest.raises(DataError, match=r"x.jsonl:3: no prompt field.*found keys \['foo'\]"):
        eval_record({"foo": 1}, "x.jsonl:3")
    d = tmp_path / "vicuna"
    d.mkdir()
    (d / "valid.jsonl").write_text(json.dumps({"text": "Say hi.", "output": "hi"}) + "\n")
    assert load_eval_set(str(d / "valid.jsonl")) == ("vicuna", [want])


def test_evaluate_command_over_several_models_sets_and_seeds(tmp_path, capsys):
    tok = make_tokenizer()
    a = save_model(tmp_path / "a", "gpt2", tok, seed=1)
    b = save_model(tmp_path / "b", "gpt2", tok, seed=2)
    dolly = write_dolly(tmp_path / "dolly.jsonl", n=3)
    vicuna = tmp_path / "vicuna.jsonl"
    vicuna.write_text("".join(json.dumps({"text": f"Add {i} and 1.", "output": str(i + 1)}) + "\n" for i in range(2)))
    out = tmp_path / "ev"
    argv = ["evaluate", "--model", a, "--model", b, "--eval-data", f"{dolly},{vicuna}", "--eval-seeds", "10,20",
            "--max-new-tokens", "4", "--no-repeat-ngram-size", "0", "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dolly" in printed and "vicuna" in printed and "average" in printed
    rows = json.loads((out / "eval_results.json").read_text())["results"]
    assert sorted((r["model"], r["set"]) for r in rows) == sorted((m, s) for m in (a, b) for s in ("dolly", "vicuna"))
    for r in rows:
        assert r["seeds"] == [10, 20] and len(r["rougeL_per_seed"]) == 2
        assert r["n_prompts"] == (3 if r["set"] == "dolly" else 2)
    # Deterministic per seed: the same command gives the same numbers.
    assert main(argv) == 0
    again = json.loads((out / "eval_results.json").read_text())["results"]
    assert [r["rougeL_per_seed"] for r in again] == [r["rougeL_per_seed"] for r in rows]
    assert (out / "eval_results.md").read_text().count("|") > 10
    assert main(["evaluate", "--model", a, "--eval-data", str(tmp_path / "none.jsonl")]) == 2


def test_best_checkpoint_is_the_best_dev_rouge(tmp_path):
    tok = make_tokenizer()
    t_dir = save_model(tmp_path / "t", "gpt2", tok, size="teacher", seed=1)
    s_dir = save_model(tmp_path / "s", "gpt2", tok, seed=2)
    data = write_dolly(tmp_path / "train.jsonl", n=8)
    evald = write_dolly(tmp_path / "eval.jsonl", n=4, start=100)
    cfg = build_config(overrides=dict(
        teacher=t_dir, student=s_dir, train_data=data, eval_data=evald, output_dir=str(tmp_path / "run"),
        max_length=200, max_prompt_length=160, batch_size=4, lr=3e-2, min_lr=3e-2, epochs=3, log_every=1,
        max_new_tokens=4, best_checkpoint=True, dev_seeds=[10, 20], dev_max_examples=4, no_repeat_ngram_size=0))
    teacher, student, tokenizer = load_pair(cfg, "no", log=lambda m: None)
    train_items, eval_items = load_data(cfg, tokenizer)
    result = train(cfg, student, teacher, tokenizer, train_items, eval_items, cfg.output_dir)
    records = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    dev = [r for r in records if "dev_rougeL" in r]
    assert [r["step"] for r in dev] == [2, 4, 6]  # 2 batches per epoch, 3 epochs
    top = max(r["dev_rougeL"] for r in dev)
    chosen = next(r for r in dev if r["dev_rougeL"] == top)  # ties: the earliest
    best = json.loads(open(os.path.join(cfg.output_dir, "best.json")).read())
    assert (best["step"], best["dev_rougeL"]) == (chosen["step"], top) == (result["best"]["step"], top)
    # The saved checkpoint scores what was recorded.
    model = load_causal_lm(result["best_dir"])
    row, _ = evaluate_model(model, tokenizer, eval_items, dataclasses.replace(cfg, eval_seeds=[10, 20],
                                                                              eval_greedy=False),
                            name="best", log=lambda m: None)
    assert row["rougeL"] == pytest.approx(top)
