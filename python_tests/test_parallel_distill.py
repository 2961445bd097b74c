"""csd-distill --tensor-parallel (issue 14): tiny Llama teacher and student split over 2 gloo
processes by transformers' tp_plan, LM heads sharded over the vocabulary and fed to the
vocab-parallel CSD loss and CE, against the same run in one process without tensor parallelism."""

import json
import os

import pytest

from scale_utils import cli_args, finish, launch, load_final, make_records, run_inprocess, write_jsonl


def make_llama_setup(root, seed=0):
    """Data, a BPE tokenizer and untied tiny Llama teacher/student directories (from configs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from csd_ext.distill.data import build_prompt
    from csd_ext.distill.tiny.tokenizer import train_bpe

    os.makedirs(root, exist_ok=True)
    train, evals = make_records(24, seed), make_records(4, seed + 1000)
    paths = {"train": os.path.join(root, "train.jsonl"), "eval": os.path.join(root, "eval.jsonl")}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], evals)
    tok = train_bpe([build_prompt(r) + r["response"] for r in train], 509)
    for name, dim, s in (("teacher", 32, seed + 1), ("student", 16, seed + 2)):
        torch.manual_seed(s)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        path = os.path.join(root, name)
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths


def _records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tensor_parallel_steps_match_one_process(tmp_path):
    paths = make_llama_setup(str(tmp_path / "tiny"))
    common = dict(max_steps=2, grad_accum=2, kd_ratio=0.7, lr=3e-3,
                  eval_teacher=False, eval_max_examples=0)
    tp, one = str(tmp_path / "tp"), str(tmp_path / "one")
    proc = launch(cli_args(paths, tp, tensor_parallel=True, **common) + ["--loss-arg", "weighting=TS",
                  "--loss-arg", "temperature=1.5"], cwd=str(tmp_path), nproc=2)
    try:
        status, out_one = run_inprocess(cli_args(paths, one, **common) + ["--loss-arg", "weighting=TS",
                                        "--loss-arg", "temperature=1.5"])
        assert status == 0, out_one[-3000:]
        rc, out_tp = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, out_tp[-4000:]
    assert "tensor parallel over 2 processes" in out_tp
    a, b = load_final(one), load_final(tp)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    from safetensors.torch import load_file

    init = load_file(os.path.join(paths["student"], "model.safetensors"))
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    print(f"\ntensor parallel vs 1 process: max |parameter difference| {diff:.3g}; training moved them {moved:.3g}")
    assert moved > 1e-3
    assert diff < 1e-5, f"tensor-parallel parameters differ by {diff} (training moved them {moved})"
    for r1, r2 in zip(_records(one), _records(tp), strict=True):
        for key in ("loss", "ce", "kd", "val_ce", "val_kd"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), (key, r1, r2)


def test_tensor_parallel_refuses_a_family_without_tp_plan(tmp_path):
    from scale_utils import make_tiny_setup

    paths = make_tiny_setup(str(tmp_path / "gpt2"), n_train=8, n_eval=2)  # GPT-2: no base_model_tp_plan
    status, out = run_inprocess(cli_args(paths, str(tmp_path / "out"), tensor_parallel=True))
    assert status == 2
    assert "has no tensor-parallel plan" in out and "gpt2" in out, out[-2000:]
