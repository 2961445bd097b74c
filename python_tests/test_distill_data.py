"""csd-distill's data pipeline: loader errors, template, masking with the causal shift, truncation, padding."""

import json

import pytest
import torch

from csd_ext.distill.data import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    Collator,
    DataError,
    build_prompt,
    encode_dataset,
    encode_example,
    left_padded_prompts,
    load_dolly_jsonl,
    special_prefix,
    split_holdout,
)
from distill_helpers import make_tokenizer, write_dolly, write_lines


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    return make_tokenizer(with_bos=True)


def test_template_is_minillm_format():
    with_ctx = build_prompt({"instruction": "Do X.", "context": "some input", "response": "y"})
    assert with_ctx == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\nsome input\n\n### Response:\n")
    no_ctx = build_prompt({"instruction": "Do X.", "context": "", "response": "y"})
    assert no_ctx == PROMPT_NO_INPUT.format(instruction="Do X.")
    assert no_ctx.endswith("### Instruction:\nDo X.\n\n### Response:\n") and "### Input" not in no_ctx
    assert "{context}" in PROMPT_WITH_INPUT


def test_chat_template_needs_a_tokenizer_with_one(tok):
    with pytest.raises(DataError, match="chat template"):
        build_prompt({"instruction": "a", "context": "", "response": "b"}, "chat", tok)


@pytest.mark.parametrize("use_bos", [False, True])
def test_labels_are_response_tokens_shifted_by_one(tok, bos_tok, use_bos):
    t = bos_tok if use_bos else tok
    prefix = special_prefix(t)
    assert prefix == ([t.bos_token_id] if use_bos else [])
    prompt = build_prompt({"instruction": "Add the two numbers.", "context": "1 + 2", "response": "3"})
    enc = encode_example(t, prompt, "3", max_length=256, max_prompt_length=200, prefix=prefix)
    p = enc["prompt_ids"]
    full = enc["input_ids"] + [enc["labels"][-1]]
    assert full[: len(p)] == p and p[: len(prefix)] == prefix
    assert full[-1] == t.eos_token_id  # the response ends with eos, which is trained
    assert len(enc["input_ids"]) == len(enc["labels"])
    # labels[i] is the token after input[i]; positions predicting prompt tokens are -100.
    for i, lab in enumerate(enc["labels"]):
        if i < len(p) - 1:
            assert lab == IGNORE_INDEX
        else:
            assert lab == full[i + 1]
    response_ids = full[len(p):-1]
    assert t.decode(response_ids) == "3"
    assert enc["labels"][len(p) - 1] == response_ids[0]  # the last prompt position predicts the answer


def test_truncation_and_dropping(tok):
    prompt = build_prompt({"instruction": "Reverse the letters.", "context": "", "response": ""})
    n_prompt = len(tok.encode(prompt))
    long_response = " ".join("abcdefgh" * 10)
    enc = encode_example(tok, prompt, long_response, max_length=n_prompt + 5, max_prompt_length=n_prompt)
    assert len(enc["input_ids"]) == n_prompt + 5  # the model sees at most max_length tokens
    assert sum(x != IGNORE_INDEX for x in enc["labels"]) == 6  # response truncated, no eos kept
    assert tok.eos_token_id not in enc["labels"]
    # A prompt longer than max_prompt_length is dropped, as in MiniLLM.
    assert encode_example(tok, prompt, "x", max_length=400, max_prompt_length=n_prompt - 1) is None
    # A prompt that fills max_length leaves no response token: dropped too.
    assert encode_example(tok, prompt, "x", max_length=n_prompt - 1, max_prompt_length=n_prompt) is None


def test_encode_dataset_logs_drops_and_refuses_empty(tok):
    exs = [{"instruction": "Reverse the letters.", "context": "", "response": "a"},
           {"instruction": "Reverse the letters. " * 30, "context": "", "response": "a"}]
    limit = len(tok.encode(build_prompt(exs[0]))) + 5
    logs = []
    kept = encode_dataset(tok, exs, template="minillm", max_length=300, max_prompt_length=limit, log=logs.append)
    assert len(kept) == 1 and kept[0]["reference"] == "a" and "dropped 1 of 2" in logs[0]
    with pytest.raises(DataError, match="every example was dropped"):
        encode_dataset(tok, exs[1:], template="minillm", max_length=300, max_prompt_length=limit, log=logs.append)
    with pytest.raises(DataError, match="empty"):
        encode_dataset(tok, [], template="minillm", max_length=300, max_prompt_length=limit)


def test_collator_right_pads_with_masked_labels(tok):
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 7, 9]}, {"input_ids": [5], "labels": [8]}]
    b = Collator(pad_token_id=tok.pad_token_id)(items)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, tok.pad_token_id, tok.pad_token_id]]
    assert b["labels"].tolist() == [[-100, 7, 9], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    ids, mask = left_padded_prompts([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_loader_reads_dolly_and_minillm_fields(tmp_path):
    rows = load_dolly_jsonl(write_dolly(tmp_path / "d.jsonl", n=4))
    assert len(rows) == 4 and set(rows[0]) == {"instruction", "context", "response"}
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"instruction": "i", "input": "c", "output": "o"}), ""])
    assert load_dolly_jsonl(path) == [{"instruction": "i", "context": "c", "response": "o"}]
    path = write_lines(tmp_path / "n.jsonl", [json.dumps({"instruction": "i", "response": "o"})])
    assert load_dolly_jsonl(path)[0]["context"] == ""


@pytest.mark.parametrize("line,message", [
    ('{"instruction": "i", "context": "c"}', r"d.jsonl:2: missing field 'response'"),
    ('{"context": "c", "response": "r"}', r"d.jsonl:2: missing field 'instruction'"),
    ('{"instruction": "i", "response": 3}', r"d.jsonl:2: field 'response' must be a string"),
    ('[1, 2]', r"d.jsonl:2: expected a JSON object"),
    ('{"instruction": ', r"d.jsonl:2: not valid JSON"),
])
def test_loader_errors_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "d.jsonl", ['{"instruction": "i", "context": "", "response": "r"}', line])
    with pytest.raises(DataError, match=message):
        load_dolly_jsonl(path)


def test_empty_or_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="holds no examples"):
        load_dolly_jsonl(write_lines(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="does not exist"):
        load_dolly_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="eval_holdout=4 leaves no training data"):
        split_holdout([{}] * 4, 4)


def test_collated_batch_feeds_a_model_consistently(tok):
    """Right padding + explicit positions: a padded row's logits equal the unpadded row's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    items = [{"input_ids": [3, 4, 5, 6, 7], "labels": [1] * 5}, {"input_ids": [3, 4], "labels": [1, 1]}]
    b = Collator(tok.pad_token_id)(items)
    with torch.no_grad():
        batched = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=b["position_ids"]).logits
        alone = model(input_ids=torch.tensor([[3, 4]])).logits
    torch.testing.assert_close(batched[1, :2], alone[0], rtol=1e-5, atol=1e-5)
