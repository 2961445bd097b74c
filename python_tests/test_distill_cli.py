"""csd-distill's configuration, command line, evaluation helpers, and the tiny demo end to end (--smoke)."""

import json
import os

import pytest
import torch

from csd_ext.distill import main
from csd_ext.distill.cli import parse_config
from csd_ext.distill.config import ConfigError, build_config, preset_names
from csd_ext.distill.evaluate import distinct_n, exact_match, generate, gsm8k_answer, rouge_l
from csd_ext.distill.report import results_table
from csd_ext.distill.tiny.tasks import make_dataset
from distill_helpers import make_tokenizer

REQUIRED = {"train_data": "d.jsonl"}


def test_presets_load_with_the_issue_recipes():
    assert set(preset_names()) >= {"gpt2-xl-to-gpt2", "openllama-7b-to-3b", "gemma-7b-it-to-2b-it", "tiny"}
    g = build_config("gpt2-xl-to-gpt2", overrides=REQUIRED)
    assert (g.loss, g.loss_args, g.kd_ratio, g.lr, g.batch_size, g.epochs, g.max_length, g.max_prompt_length) == (
        "csd", {"weighting": "SS", "temperature": 1.0}, 1.0, 1e-4, 8, 20, 512, 256)
    o = build_config("openllama-7b-to-3b", overrides=REQUIRED)
    assert (o.lora_r, o.lora_alpha, o.lora_dropout, o.mixed_precision) == (16, 64, 0.1, "bf16")
    m = build_config("gemma-7b-it-to-2b-it", overrides=REQUIRED)
    assert (m.loss_args["weighting"], m.lr, m.grad_accum, m.mixed_precision, m.eval_greedy, m.answer_format,
            m.eval_seeds) == ("TS", 1e-5, 8, "bf16", True, "gsm8k", [])
    t = build_config("tiny")
    assert t.pipeline == "tiny" and t.tiny.teacher_layers > t.tiny.student_layers


def test_cli_flags_override_the_preset():
    _, cfg = parse_config(["--preset", "gpt2-xl-to-gpt2", "--train-data", "x.jsonl", "--lr", "3e-5",
                           "--kd-ratio", "0.5", "--eval-seeds", "1,2", "--eval-greedy", "--loss-arg", "weighting=TS",
                           "--set", "max_length=384", "--max-steps", "7"])
    assert (cfg.lr, cfg.kd_ratio, cfg.eval_seeds, cfg.eval_greedy, cfg.max_length, cfg.max_steps) == (
        3e-5, 0.5, [1, 2], True, 384, 7)
    assert cfg.loss_args == {"weighting": "TS", "temperature": 1.0}
    # Another loss drops the preset's CSD hyper-parameters instead of failing on them.
    _, cfg = parse_config(["--preset", "gpt2-xl-to-gpt2", "--train-data", "x", "--loss", "srkl",
                           "--loss-arg", "lam=0.2"])
    assert (cfg.loss, cfg.loss_args) == ("srkl", {"lam": 0.2})
    _, cfg = parse_config(["--preset", "tiny", "--set", "tiny.teacher_steps=3", "--smoke"])
    assert cfg.tiny.teacher_steps == 3 and cfg.tiny.n_train == 256  # --set beats the smoke section


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--loss", "foo"], "unknown loss 'foo'"),
    (["--preset", "tiny", "--lr", "abc"], "lr must be a float, got 'abc'"),
    (["--preset", "tiny", "--kd-ratio", "2"], r"kd_ratio must be in \[0, 1\]"),
    (["--preset", "tiny", "--mixed-precision", "fp8"], "mixed_precision must be one of"),
    (["--preset", "tiny", "--set", "tiny.bogus=1"], "unknown key tiny.bogus"),
    (["--preset", "tiny", "--loss-arg", "lam=0.1"], "has no hyper-parameter 'lam'"),
    (["--preset", "gpt2-xl-to-gpt2"], "missing train_data: pass --train-data"),
    (["--student", "s", "--train-data", "d"], "missing teacher"),
    ([], "nothing to run"),
])
def test_bad_configuration_is_a_clear_error(argv, message, capsys):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)
    assert main(argv) == 2
    assert message.split("'")[0].replace("\\", "") in capsys.readouterr().err


def test_unknown_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate' \(.*c.yaml\)"):
        build_config("tiny", config_file=str(path))


def test_scores():
    assert gsm8k_answer("so 3 + 4 = 7\n#### 7") == 7.0
    assert gsm8k_answer("The answer is 1,234.") == 1234.0 and gsm8k_answer("no number") is None
    assert exact_match(["x #### 12", "#### 5"], ["... #### 12", "#### 6"], "gsm8k") == 50.0
    assert exact_match([" a  b ", "c"], ["a b", "d"]) == 50.0
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(100 * 2 / 4)
    assert distinct_n(["a-b-a-b"], 2) == pytest.approx(100 * 2 / 3) and distinct_n(["a"], 2) is None
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert 0 < rouge_l(["the cat"], ["the cat sat on"]) < 100
    table = results_table([{"name": "teacher", "rougeL": 50.0, "rougeL_sd": 1.0}, {"name": "s", "val_ce": 1.5}])
    assert "50.00 ± 1.00" in table and "1.500" in table


def test_batched_left_padded_generation_matches_one_by_one():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    prompts = [tok.encode("Reverse the letters. a b c"), tok.encode("Add"), tok.encode("What is the city? x")]
    batched = generate(model, tok, prompts, do_sample=False, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], do_sample=False, max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    a = generate(model, tok, prompts, do_sample=True, seed=10, max_new_tokens=6)
    assert a == generate(model, tok, prompts, do_sample=True, seed=10, max_new_tokens=6)


def test_synthetic_data_is_deterministic_and_split():
    tasks = ["reverse", "sort", "add", "lookup", "first", "last", "copy"]
    tr1, ev1 = make_dataset(200, 21, tasks, seed=3)
    tr2, ev2 = make_dataset(200, 21, tasks, seed=3)
    assert tr1 == tr2 and ev1 == ev2
    key = lambda r: (r["task"], r["context"])  # noqa: E731
    assert not {key(r) for r in ev1} & {key(r) for r in tr1}
    for r in tr1:
        if r["task"] == "reverse":
            assert r["response"] == "-".join(reversed(r["context"].split("-")))
        if r["task"] == "add":
            assert int(r["response"]) == sum(map(int, r["context"].split("+")))
        if r["task"] == "lookup":
            fields = dict(f.split("=") for f in r["context"].split(";"))
            asked = r["context"].rsplit(";", 1)[1].split("=")[0]
            assert fields[asked] == "?" and r["response"] == dict(
                f.split("=") for f in r["context"].split(";")[:-1])[asked]
    with pytest.raises(ValueError, match="unknown tiny task"):
        make_dataset(5, 1, tasks=["reverse", "fly"])
