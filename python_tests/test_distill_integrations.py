"""csd-distill's --fused-linear, --report-to and data sources (chat / prompt-completion JSONL,
datasets files and save_to_disk directories)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate")

from distill_step_helpers import examples, models, split  # noqa: E402
from scale_utils import cli_args, make_tiny_setup, run_inprocess  # noqa: E402

from csd_ext.distill.config import ConfigError  # noqa: E402
from csd_ext.distill.data import DataError, build_prompt  # noqa: E402
from csd_ext.distill.fused import fused_distill_loss, use_fused_linear  # noqa: E402
from csd_ext.distill.sources import load_records  # noqa: E402
from csd_ext.distill.trainer import distill_loss  # noqa: E402
from csd_ext.losses import get_loss  # noqa: E402


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_fused_distill_loss_equals_the_logits_path(kd_ratio):
    batch = split(examples(), 8)[0]
    args = {"weighting": "TS", "temperature": 1.4}
    results = []
    for fused in (False, True):
        student, teacher = models()
        denominator = torch.tensor(7.0)
        if fused:
            loss, parts = fused_distill_loss(student, teacher, batch, args, kd_ratio, None, denominator)
        else:
            loss, parts = distill_loss(student, teacher, batch, get_loss("csd", **args), kd_ratio, None, denominator)
        loss.backward()
        results.append((loss.detach(), parts, torch.cat([p.grad.flatten() for p in student.parameters()])))
    (l0, p0, g0), (l1, p1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    for key in ("ce", "kd"):
        torch.testing.assert_close(p1[key], p0[key], rtol=1e-5, atol=1e-6)
    assert int(p1["tokens"]) == int(p0["tokens"])


def test_fused_linear_setting():
    student, _ = models()

    def cfg(**kw):
        return SimpleNamespace(**{"fused_linear": "auto", "loss": "csd", "kd_ratio": 1.0, **kw})

    assert not use_fused_linear(cfg(), student)                # V = 61
    assert use_fused_linear(cfg(), student, vocab=256_000)     # Gemma's vocabulary
    assert use_fused_linear(cfg(fused_linear="on"), student)
    assert not use_fused_linear(cfg(fused_linear="on", kd_ratio=0.0), student)  # SFT: nothing to fuse
    assert not use_fused_linear(cfg(loss="fkl"), student, vocab=256_000)
    with pytest.raises(ConfigError, match="needs --loss csd"):
        use_fused_linear(cfg(fused_linear="on", loss="fkl"), student)
    with pytest.raises(ConfigError, match="fused_linear must be one of"):
        use_fused_linear(cfg(fused_linear="yes"), student)


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_record_layouts(tmp_path):
    from distill_helpers import make_tokenizer

    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: c a b"},
        {"role": "assistant", "content": "a b c"}]}])
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2 + 2 =", "completion": " 4"},
                                        {"prompt": [{"role": "user", "content": "Hi"}],
                                         "completion": [{"role": "assistant", "content": "Hello"}]}])
    dolly = _jsonl(tmp_path / "dolly.jsonl", [{"instruction": "Say hi", "context": "", "response": "hi"}])
    tok = make_tokenizer(vocab_size=300)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")

    [c] = load_records(chat)
    assert c["response"] == "a b c" and c["instruction"] == "Sort: c a b"
    assert build_prompt(c, "minillm", tok) == "<system>Be brief.<user>Sort: c a b<assistant>"
    plain, conv = load_records(pc)
    assert build_prompt(plain, "minillm", tok) == "Q: 2 + 2 =" and plain["response"] == " 4"
    assert build_prompt(conv, "minillm", tok) == "<user>Hi<assistant>" and conv["response"] == "Hello"
    [d] = load_records(dolly)
    assert build_prompt(d, "compact", tok).startswith("### Instruction:\nSay hi")
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        build_prompt(c, "minillm", None)

    bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "no reply"}]}])
    with pytest.raises(DataError, match="assistant's reply"):
        load_records(bad)
    with pytest.raises(DataError, match="unknown record layout"):
        load_records(_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}]))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_datasets_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    assert [r["response"] for r in load_records(str(tmp_path / "single"))] == [f"A{i}" for i in range(5)]
    assert len(load_records(str(tmp_path / "dict"))) == 5
    assert len(load_records(str(tmp_path / "dict") + ":test")) == 2
    assert load_records(str(tmp_path / "data.parquet"))[3]["prompt_text"] == "Q3"
    with pytest.raises(DataError, match="without a 'dev' split"):
        load_records(str(tmp_path / "dict") + ":dev")


def test_cli_fused_linear_tensorboard_and_prompt_completion_data(tmp_path):
    """A short csd-distill run on prompt-completion JSONL with --fused-linear on and
    --report-to tensorboard: the event files hold the logged loss (read back offline)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths = make_tiny_setup(str(tmp_path / "tiny"), n_train=24, n_eval=4, dropout=0.0)
    rows = [json.loads(line) for line in open(paths["train"])]
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": r["instruction"] + "\n", "completion": r["response"]}
                                        for r in rows])
    out = str(tmp_path / "run")
    status, log = run_inprocess(cli_args(paths, out, train_data=pc, max_steps=2, batch_size=4, grad_accum=2,
                                         fused_linear="on", report_to="tensorboard"))
    assert status == 0, log[-3000:]
    assert "fused linear (no [N, V] logits)" in log
    event_dirs = [root for root, _, files in os.walk(os.path.join(out, "tensorboard"))
                  if any(f.startswith("events.out.tfevents") for f in files)]
    assert event_dirs, os.listdir(out)
    acc = EventAccumulator(event_dirs[0])
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and "val_ce" in acc.Tags()["scalars"]
    losses = [e.value for e in acc.Scalars("loss")]
    assert len(losses) == 2 and all(v == v and v > 0 for v in losses)
    status, log = run_inprocess(cli_args(paths, str(tmp_path / "bad"), report_to="mlflow"))
    assert status != 0 and "report_to must be one of" in log, log[-2000:]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from integration_helpers import reset_accelerate_state

    reset_accelerate_state()
