"""The paper's recipes: presets, the Gemma prompt / stop / '####' rules, the whole chat turn, and
generation stopping at every id of the model's generation_config."""

import pytest
import torch

from csd_ext.distill.config import build_config
from csd_ext.distill.data import IGNORE_INDEX, build_prompt, encode_dataset
from csd_ext.distill.evaluate import exact_match, generate, gsm8k_answer
from csd_ext.distill.onpolicy import generated_example
from csd_ext.distill.stops import chat_turn_end, cut_at_stop_ids, cut_at_stop_strings, stop_token_ids
from distill_helpers import make_tokenizer

# A Gemma-style chat template (the real one's shape: turns end with <end_of_turn>, roles user/model).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_like_tokenizer():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def test_presets_follow_the_paper():
    g = build_config("gpt2-xl-to-gpt2", overrides={"train_data": "d.jsonl"})
    assert g.teacher_dtype == "fp16" and g.best_checkpoint
    m = build_config("gemma-7b-it-to-2b-it", overrides={"train_data": "d.jsonl"})
    assert (m.teacher, m.prompt_template, m.eval_prompt_template, m.stop_strings, m.max_new_tokens,
            m.answer_format, m.max_train_examples, m.loss_args["weighting"]) == (
        "runs/gemma-7b-it-sft/final", "chat", "qa", ["\n\n"], 512, "gsm8k", 1000, "TS")
    sft = build_config("gemma-7b-it-sft", overrides={"train_data": "d.jsonl"})
    assert sft.kd_ratio == 0 and sft.student == "google/gemma-7b-it" and sft.output_dir + "/final" == m.teacher
    o = build_config("openllama-7b-to-3b", overrides={"train_data": "d.jsonl"})
    assert (o.student, o.teacher.endswith("final"), o.lora_adapter, o.lora_target_modules, o.lr, o.batch_size,
            o.grad_accum, o.student_gen_ratio, o.replay_buffer_size, o.lm_coef) == (
        "openlm-research/open_llama_3b_v2", True, "runs/open-llama-3b-v2-sft/final", "q_proj,v_proj", 1e-4, 8, 1,
        1.0, 1000, 1.0)
    off = build_config("openllama-7b-to-3b-offpolicy", overrides={"train_data": "d.jsonl"})
    assert off.student_gen_ratio == 0 and off.lora_r == 16


def test_paper_gsm8k_prompt_and_answer_rule():
    rec = {"instruction": "Tom has 3 apples and buys 4. How many?", "context": "", "response": "3+4=7\n#### 7"}
    assert build_prompt(rec, "qa") == "Q: Tom has 3 apples and buys 4. How many?\n\nA:"
    # Counted only with '####': the last number of a '####'-less output is not read.
    assert gsm8k_answer("so it is 7", strict=True) is None and gsm8k_answer("so it is 7") == 7.0
    assert exact_match(["3+4=7 so 7", " 3+4=7\n#### 7", "#### 8"], [rec["response"]] * 3, "gsm8k") == \
        pytest.approx(100 / 3)
    # Stop at "\n\n": the second question a model starts is cut off.
    assert cut_at_stop_strings(" 7\n#### 7\n\nQ: next", ["\n\n"]) == " 7\n#### 7"
    assert cut_at_stop_strings("abc", []) == "abc" and cut_at_stop_strings("a|b#c", ["#", "|"]) == "a"


def test_chat_template_covers_the_whole_turn():
    tok = gemma_like_tokenizer()
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert chat_turn_end(tok) == "<end_of_turn>"
    rec = {"instruction": "Add 1 and 2.", "context": "", "response": "1+2=3\n#### 3"}
    (item,) = encode_dataset(tok, [rec], template="chat", max_length=128, max_prompt_length=100, log=lambda *_: None)
    assert item["prompt"].endswith("<start_of_turn>model\n")
    answer = [t for t in item["labels"] if t != IGNORE_INDEX]
    # The last label is <end_of_turn> (the turn's end), and no eos follows it.
    assert answer[-1] == end and tok.eos_token_id not in answer
    assert tok.decode(answer[:-1]) == rec["response"]
    # Templates without a chat template: eos ends the response, as before.
    (plain,) = encode_dataset(make_tokenizer(), [rec], template="qa", max_length=128, max_prompt_length=100,
                              log=lambda *_: None)
    assert plain["labels"][-1] == make_tokenizer().eos_token_id


def _tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).eval()


def test_generation_stops_at_every_generation_config_eos():
    tok = make_tokenizer()
    model = _tiny_gpt2(tok)
    prompts = [tok.encode("Reverse the letters. a b c"), tok.encode("Add the two numbers.")]
    model.generation_config.eos_token_id = tok.eos_token_id
    free = generate(model, tok, prompts, do_sample=False, max_new_tokens=6, batch_size=2)
    assert all(free)
    # Make each prompt's first greedy token an end-of-turn id of the model: the response is then empty.
    from csd_ext.distill.data import left_padded_prompts

    first = []
    for p in prompts:  # one prompt at a time, as generate(batch_size=1) below decodes them
        ids, mask = left_padded_prompts([p], tok.pad_token_id)
        first.append(int(model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=1,
                                        pad_token_id=tok.pad_token_id)[0, -1]))
    assert tok.eos_token_id not in first
    model.generation_config.eos_token_id = [tok.eos_token_id, *first]
    assert stop_token_ids(model, tok) == list(dict.fromkeys([tok.eos_token_id, *first]))
    assert generate(model, tok, prompts, do_sample=False, max_new_tokens=6, batch_size=1) == ["", ""]
    # On-policy examples are cut after the first stop id (kept: stopping is the student's choice).
    assert cut_at_stop_ids([5, 9, 7, 3], [7, 0], keep_stop=True) == [5, 9, 7]
    ex = generated_example([1, 2], [5, 9, 7, 3], eos_token_id=[0, 7], max_length=16)
    assert ex["input_ids"] == [1, 2, 5, 9] and ex["labels"] == [IGNORE_INDEX, 5, 9, 7]


def test_generation_stops_at_stop_strings():
    tok = make_tokenizer()
    model = _tiny_gpt2(tok)
    prompt = tok.encode("Reverse the letters. a b c")
    free = generate(model, tok, [prompt], do_sample=False, max_new_tokens=8)[0]
    assert len(free) >= 3
    stop = free[len(free) // 2: len(free) // 2 + 2]
    cut = generate(model, tok, [prompt], do_sample=False, max_new_tokens=8, stop_strings=[stop])[0]
    assert cut == free[: free.find(stop)].strip()


def test_imitkd_student_continues_its_sft_lora_adapter(tmp_path):
    """openllama-7b-to-3b starts from the student's Dolly SFT adapter (lora_adapter) and trains it on."""
    import dataclasses

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from csd_ext.distill.models import load_pair
    from distill_helpers import save_model, write_dolly

    tok = make_tokenizer()
    t_dir = save_model(tmp_path / "t", "llama", tok, size="teacher", seed=1)
    s_dir = save_model(tmp_path / "s", "llama", tok, seed=2)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(s_dir),
                         LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for n, p in sft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # a trained adapter, not peft's zero start
    sft.save_pretrained(tmp_path / "adapter")
    cfg = build_config("openllama-7b-to-3b", overrides={"train_data": write_dolly(tmp_path / "d.jsonl")})
    cfg = dataclasses.replace(cfg, teacher=t_dir, student=s_dir, lora_adapter=str(tmp_path / "adapter"),
                              mixed_precision="no", teacher_dtype="fp32", gradient_checkpointing=False)
    _, student, _ = load_pair(cfg, "no", log=lambda m: None)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    saved = dict(sft.named_parameters())
    assert set(trainable) == {n for n in saved if "lora_" in n}
    for n, p in trainable.items():
        torch.testing.assert_close(p, saved[n])  # the SFT adapter's weights, not a fresh LoRA
