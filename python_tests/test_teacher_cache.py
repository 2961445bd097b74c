"""The teacher-logit cache (csd_ext/distill/teacher_cache.py) and `csd-distill cache-teacher` / `--teacher-cache`."""

import dataclasses
import json
import os
import signal

import pytest
import torch

from csd_ext.distill.config import build_config
from csd_ext.distill.data import IGNORE_INDEX, Collator
from csd_ext.distill.models import load_pair
from csd_ext.distill.run import load_data
from csd_ext.distill.teacher_cache import (
    CachedTeacher,
    SparseTeacherBatch,
    TeacherCacheError,
    open_teacher_cache,
    run_fingerprint,
    write_teacher_cache,
)
from csd_ext.distill.trainer import distill_loss, train
from csd_ext.losses import get_loss
from distill_helpers import make_tokenizer, save_model, write_dolly
from scale_utils import cli_args, finish, launch, load_final, make_tiny_setup, run_inprocess, subprocess_env

QUIET = dict(log=lambda m: None, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    tok = make_tokenizer()
    t_dir = save_model(d / "t", "gpt2", tok, size="teacher", seed=1)
    s_dir = save_model(d / "s", "gpt2", tok, seed=2)
    cfg = build_config(overrides=dict(
        teacher=t_dir, student=s_dir, train_data=write_dolly(d / "train.jsonl", n=10),
        eval_data=write_dolly(d / "eval.jsonl", n=4, start=100), output_dir=str(d / "run"), max_length=200,
        max_prompt_length=160, batch_size=5, lr=1e-2, min_lr=1e-2, max_steps=1, log_every=1,
        eval_seeds=[10], eval_max_examples=2, max_new_tokens=4, mixed_precision="no"))
    teacher, student, tokenizer = load_pair(cfg, "no", log=lambda m: None)
    train_items, eval_items = load_data(cfg, tokenizer)
    fp = run_fingerprint(cfg, tokenizer)
    caches = {}
    for k in (0, 6):
        caches[k] = str(d / f"cache-k{k}")
        write_teacher_cache(caches[k], teacher, train_items + eval_items, fingerprint=fp, top_k=k,
                            shard_examples=3, batch_size=2, **QUIET)
    return dict(dir=d, cfg=cfg, teacher=teacher, student=student, tokenizer=tokenizer, train=train_items,
                eval=eval_items, fp=fp, caches=caches)


def _live_rows(setup, items):
    batch = Collator(setup["tokenizer"].pad_token_id)(items)
    with torch.no_grad():
        logits = setup["teacher"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"]).logits
    return batch, logits


def test_round_trip_full_and_top_k(setup):
    batch, logits = _live_rows(setup, setup["train"][:4])
    counted = batch["labels"] != IGNORE_INDEX
    full = open_teacher_cache(setup["caches"][0], setup["fp"])
    got = full.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.equal(got.cached, counted)
    torch.testing.assert_close(got.logits[counted], logits[counted], rtol=1e-5, atol=1e-5)
    assert torch.all(got.logits[~counted] == 0)

    sparse = open_teacher_cache(setup["caches"][6], setup["fp"])
    got = sparse.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert isinstance(got, SparseTeacherBatch) and got.ids.dtype == torch.int64
    values, ids = torch.topk(torch.log_softmax(logits[counted].float(), -1), 6)
    assert torch.equal(got.ids[counted], ids)
    torch.testing.assert_close(got.values[counted], values, rtol=1e-5, atol=1e-5)
    assert torch.all(got.ids[~counted] == -1)
    index = json.load(open(os.path.join(setup["caches"][6], "index.json")))
    assert index["complete"] and index["top_k"] == 6 and index["dtype"] == "fp32"
    assert index["n_sequences"] == len({tuple(it["input_ids"]) for it in setup["train"] + setup["eval"]})
    assert index["tokenizer"]["size"] == len(setup["tokenizer"]) and index["template"] == "minillm"
    assert set(index["data_sha256"]) == {"train", "eval"}
    assert all(len(s["sha256"]) == 64 for s in index["shards"].values())


def test_full_cache_gives_the_live_teachers_step(setup):
    """A run from a full fp32 cache takes the same optimiser step as one with the live teacher."""
    cfg = setup["cfg"]
    cached = CachedTeacher(open_teacher_cache(setup["caches"][0], setup["fp"]), "csd", {})
    batch = Collator(setup["tokenizer"].pad_token_id)(setup["train"][:5])
    kd = get_loss("csd")
    results = []
    for teacher in (setup["teacher"], cached):
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(cfg.student)
        loss, _ = distill_loss(student, teacher, batch, kd, 1.0)
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        out = str(setup["dir"] / f"step-{len(results)}")
        train(dataclasses.replace(cfg, output_dir=out), student, teacher, setup["tokenizer"], setup["train"],
              setup["eval"], out)
        results.append((loss.detach(), grads, [p.detach().clone() for p in student.parameters()]))
    (l0, g0, p0), (l1, g1, p1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for a, b in zip(g0 + p0, g1 + p1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_top_k_training_uses_sparse_csd(setup):
    from csd_ext import csd_loss

    cached = CachedTeacher(open_teacher_cache(setup["caches"][6], setup["fp"]), "csd", {"weighting": "TS"})
    batch = Collator(setup["tokenizer"].pad_token_id)(setup["train"][:5])
    student_logits = torch.randn(*batch["input_ids"].shape, len(setup["tokenizer"]), dtype=torch.float64)
    kd = cached.kd_loss(get_loss("csd", weighting="TS"), student_logits, batch)
    sparse = cached.lookup(batch)
    t_full = torch.full_like(student_logits, float("-inf")).scatter(
        -1, sparse.ids.clamp(min=0), torch.where(sparse.ids >= 0, sparse.values.double(), float("-inf")))
    t_full[~sparse.cached] = 0  # rows the labels ignore
    torch.testing.assert_close(kd, csd_loss(student_logits, t_full, batch["labels"], weighting="TS"))


def test_corrupt_and_missing_shards_are_named(setup, tmp_path):
    import shutil

    path = str(tmp_path / "c")
    shutil.copytree(setup["caches"][0], path)
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    with open(os.path.join(path, shards[1]), "r+b") as f:
        f.seek(os.path.getsize(f.name) - 3)
        f.write(b"\x00\x01\x02")
    with pytest.raises(TeacherCacheError, match=f"shard {shards[1]} is corrupt"):
        open_teacher_cache(path)
    os.remove(os.path.join(path, shards[2]))
    shutil.copy(os.path.join(setup["caches"][0], shards[1]), os.path.join(path, shards[1]))
    with pytest.raises(TeacherCacheError, match=f"shard {shards[2]} is missing"):
        open_teacher_cache(path)


@pytest.mark.parametrize("field, change, message", [
    ("template", dict(prompt_template="compact"), "the template differs"),
    ("max_length", dict(max_length=190), "the max_length differs"),
    ("data", "other-data", "the data differs"),
    ("tokenizer", "other-tokenizer", "the tokenizer differs"),
])
def test_an_index_for_another_run_is_refused(setup, tmp_path, field, change, message):
    cfg, tokenizer = setup["cfg"], setup["tokenizer"]
    if change == "other-data":
        cfg = dataclasses.replace(cfg, train_data=write_dolly(tmp_path / "other.jsonl", n=11))
    elif change == "other-tokenizer":
        tokenizer = make_tokenizer(vocab_size=300)
    else:
        cfg = dataclasses.replace(cfg, **change)
    with pytest.raises(TeacherCacheError, match=message):
        open_teacher_cache(setup["caches"][0], run_fingerprint(cfg, tokenizer))


def test_writing_over_a_cache_with_other_settings_is_refused(setup):
    with pytest.raises(TeacherCacheError, match="top_k=0.*top_k=4"):
        write_teacher_cache(setup["caches"][0], setup["teacher"], setup["train"], fingerprint=setup["fp"], top_k=4,
                            shard_examples=3, **QUIET)


def test_cli_cache_resume_after_sigkill_and_train_from_it(tmp_path):
    """cache-teacher SIGKILLed between writing shard 1 and renaming it; the rerun resumes from the
    complete shards and ends with exactly the uninterrupted run's shards.  Then a training run reads
    the cache without loading the teacher, and a run on other data is refused."""
    paths = make_tiny_setup(str(tmp_path / "tiny"), n_train=24, n_eval=4, dropout=0.0)
    cwd = str(tmp_path)
    common = cli_args(paths, str(tmp_path / "unused"))
    cache_args = ["--shard-examples", "5", "--cache-batch-size", "4"]
    ref, x = str(tmp_path / "ref"), str(tmp_path / "x")
    killed = launch(["cache-teacher", *common, "--output", x, *cache_args], cwd=cwd,
                    env=subprocess_env(CSD_DISTILL_FAULT="cache-shard:1"))
    status, out = run_inprocess(["cache-teacher", *common, "--output", ref, *cache_args])
    assert status == 0, out[-3000:]
    rc, out = finish(killed)
    assert rc == -signal.SIGKILL, out[-3000:]
    assert sorted(os.listdir(x)) == ["index.json", "progress-r000.json", "shard-r000-00000.safetensors",
                                     "shard-r000-00001.safetensors.tmp"]
    with pytest.raises(TeacherCacheError, match="incomplete"):
        open_teacher_cache(x)
    status, out = run_inprocess(["cache-teacher", *common, "--output", x, *cache_args])
    assert status == 0, out[-3000:]
    assert "caching teacher" in out
    ref_index = json.load(open(os.path.join(ref, "index.json")))
    x_index = json.load(open(os.path.join(x, "index.json")))
    assert len(ref_index["shards"]) == -(-ref_index["n_sequences"] // 5) >= 3
    assert x_index == ref_index

    run = str(tmp_path / "run")
    status, out = run_inprocess(cli_args(paths, run, teacher_cache=x, teacher="does/not/exist", max_steps=2))
    assert status == 0, out[-3000:]
    assert "the teacher model is not loaded" in out
    assert set(load_final(run))

    other = make_tiny_setup(str(tmp_path / "other"), n_train=20, n_eval=4, dropout=0.0)
    status, out = run_inprocess(cli_args({**paths, "train": other["train"]}, str(tmp_path / "run2"),
                                         teacher_cache=x, max_steps=1))
    assert status == 2 and "does not match this run: the data differs (data_sha256.train" in out, out[-2000:]
