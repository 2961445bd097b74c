"""The tiny demo: its teacher-logit cache gives the live teacher's gradients, its stages are cached
by config, and the whole pipeline runs in a reduced --smoke form."""

import json

import pytest
import torch

from csd_ext.distill import main
from csd_ext.distill.config import ConfigError, build_config
from csd_ext.distill.data import Collator, encode_dataset
from csd_ext.distill.teacher_cache import CachedTeacher, open_teacher_cache, write_teacher_cache
from csd_ext.distill.tiny import stages
from csd_ext.distill.tiny.pipeline import run_tiny
from csd_ext.distill.tiny.tasks import make_dataset
from csd_ext.distill.tiny.tokenizer import train_bpe
from csd_ext.distill.trainer import distill_loss
from csd_ext.losses import get_loss


@pytest.mark.parametrize("loss,args", [("csd", {"weighting": "SS", "temperature": 1.5}),
                                       ("csd", {"weighting": "TS"}), ("fkl", {}), ("srkl", {"lam": 0.1})])
def test_cached_teacher_logits_give_the_live_teachers_gradients(tmp_path, loss, args):
    records, _ = make_dataset(24, 0, ["copy", "reverse", "lookup"], seed=3)
    tok = train_bpe([r["instruction"] + r["context"] + r["response"] for r in records], 300)
    items = encode_dataset(tok, records, template="compact", max_length=96, max_prompt_length=80, log=lambda m: None)
    teacher = stages.new_gpt2(stages.gpt2_config(tok, 2, 32, 2, 128), seed=1).eval()
    student = stages.new_gpt2(stages.gpt2_config(tok, 1, 16, 2, 128), seed=2)
    # Cached in batches of 5 (other paddings than the training batch below), read back from disk.
    write_teacher_cache(str(tmp_path / "c"), teacher, items, fingerprint={}, batch_size=5, shard_examples=7,
                        progress=False, log=lambda m: None)
    cached = CachedTeacher(open_teacher_cache(str(tmp_path / "c")), loss=loss, loss_args=args)
    batch = Collator(tok.pad_token_id)(items[:16])
    kd_fn = get_loss(loss, **args)

    def grads(use_cache):
        student.zero_grad()
        if use_cache:
            logits = student(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
            value = cached.kd_loss(kd_fn, logits, batch)
        else:
            value, _ = distill_loss(student, teacher, batch, kd_fn, 1.0)
        value.backward()
        return value.detach(), [p.grad.clone() for p in student.parameters()]

    live_value, live = grads(False)
    cached_value, from_cache = grads(True)
    # fp32 rows stored as computed: equal up to the teacher's own batch-shape rounding.
    torch.testing.assert_close(cached_value, live_value, rtol=1e-5, atol=1e-7)
    for a, b in zip(from_cache, live):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().max() > 0 for g in live)


def test_stage_keys_follow_the_config():
    a = {"layers": 2, "dim": 32, "steps": 10}
    assert stages.config_key(a) == stages.config_key(dict(a))
    assert stages.config_key(a) != stages.config_key(dict(a, steps=11))
    cfg = build_config("tiny")
    assert cfg.tiny.seeds and len(cfg.tiny.seeds) >= 3 and len(cfg.tiny.lr_grid) >= 2
    names = [c["name"] for c in cfg.tiny.contestants]
    assert names == ["FKL", "SS-CSD t=1", "SS-CSD t=1.5", "TS-CSD", "SRKL"] and "RKL" not in names
    full = build_config("tiny", full=True)
    assert len(full.tiny.seeds) == 5 and full.tiny.student_steps > cfg.tiny.student_steps
    assert full.output_dir != cfg.output_dir and full.tiny.contestants == cfg.tiny.contestants
    with pytest.raises(ConfigError, match="--full and --smoke"):
        build_config("tiny", full=True, smoke=True)
    with pytest.raises(ConfigError, match="random_start names no contestant"):
        run_tiny(build_config("tiny", set_args=["tiny.random_start=XYZ"]))
    with pytest.raises(ConfigError, match=r"tiny.contestants\[0\]"):
        run_tiny(build_config("tiny", set_args=["tiny.contestants=[{loss: nope}]"]))


def test_tiny_smoke_run_end_to_end_and_cached_rerun(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["--preset", "tiny", "--smoke", "--set", f"tiny.cache_dir={cache}", "--set", "tiny.workers=2"]
    assert main(argv + ["--output-dir", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "ROUGE-L (sampled)" in printed and "Who wins" in printed
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    names = [r["name"] for r in first["rows"]]
    assert names == ["FKL", "SS-CSD t=1", "SS-CSD t=1.5", "TS-CSD", "SRKL", "SS-CSD t=1 [random start]",
                     "pretrained student, no distillation"]
    for r in first["rows"]:
        assert r["seeds"] == [1, 2] and 0 <= r["rougeL"] <= 100 and r["tf_fkl"] >= 0
        assert (r["lr"] in (1e-3, 3e-3)) == (r["contestant"] != "no distillation")
    assert "paired_rougeL" in first["rows"][1] and "paired_rougeL" not in first["rows"][0]
    assert first["rkl_identity"]["relative"] < 1e-5
    assert len(first["grid"]) == 6 * 2 and first["verdict"]
    assert not first["timing"]["teacher_cached"] and not first["timing"]["student_cached"]
    where = json.loads((tmp_path / "a" / "stages.json").read_text())
    assert (tmp_path / "a" / "data" / "test.jsonl").exists() and str(cache) in where["teacher"]
    # Second run: teacher, pretrained student and logits come from the cache; the same numbers.
    assert main(argv + ["--output-dir", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert second["timing"]["teacher_cached"] and second["timing"]["student_cached"]
    key = lambda s: [(r["name"], r["rougeL_per_seed"], r["tf_fkl_per_seed"]) for r in s["rows"]]  # noqa: E731
    assert key(second) == key(first)
    assert len([p for p in cache.iterdir() if p.name.startswith("teacher-logits-")]) == 1
