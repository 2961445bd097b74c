"""Multi-process training: the sharded data stream, sharded evaluation, and a 2-process gloo
run (torchrun, CPU) that ends with the parameters of a 1-process run on the same global batch."""

import json
import os

import pytest
import torch

from csd_ext.distill.checkpoint import verify_checkpoint
from csd_ext.distill.data import IGNORE_INDEX, Collator
from csd_ext.distill.distributed import EvalShards, ShardedBatchStream, shard_items, token_denominator
from scale_utils import cli_args, finish, launch, load_final, make_tiny_setup, run_inprocess, subprocess_env


def _items(n):
    return [{"input_ids": [k, k + 1], "labels": [IGNORE_INDEX] * (k % 3) + [k] * (2 - k % 3), "prompt_ids": [k]}
            for k in range(n)]


def _keys(batch):
    return [it["input_ids"][0] for it in batch]


def test_ranks_together_see_the_single_process_batch():
    items = _items(24)
    one = ShardedBatchStream(items, 6, seed=5)
    ranks = [ShardedBatchStream(items, 3, seed=5, rank=r, world=2) for r in range(2)]
    assert one.batches_per_epoch == ranks[0].batches_per_epoch == 4
    for _ in range(3 * 4):  # three epochs
        whole = _keys(one.next())
        parts = [_keys(s.next()) for s in ranks]
        assert sorted(parts[0] + parts[1]) == sorted(whole)
        assert not set(parts[0]) & set(parts[1])


def test_every_epoch_is_a_fresh_permutation():
    items = _items(20)
    stream = ShardedBatchStream(items, 5, seed=1, rank=1, world=2)
    other = ShardedBatchStream(items, 5, seed=1, rank=0, world=2)
    epochs = []
    for _ in range(3):
        order = [k for _ in range(stream.batches_per_epoch) for k in _keys(stream.next())]
        order += [k for _ in range(other.batches_per_epoch) for k in _keys(other.next())]
        assert sorted(order) == list(range(20))  # each example once per epoch, over both ranks
        epochs.append(order)
    assert epochs[0] != epochs[1] != epochs[2]


def test_stream_resumes_where_it_stopped():
    items = _items(25)  # not a multiple of the world size: the sampler pads, ranks stay in step
    a = ShardedBatchStream(items, 4, seed=3, rank=1, world=2)
    assert a.batches_per_epoch == ShardedBatchStream(items, 4, seed=3, rank=0, world=2).batches_per_epoch == 4
    for _ in range(6):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    b = ShardedBatchStream(items, 4, seed=3, rank=1, world=2)
    b.load_state_dict(state)
    assert [_keys(a.next()) for _ in range(7)] == [_keys(b.next()) for _ in range(7)]


def test_eval_shards_pad_with_tokenless_copies():
    items = _items(7)
    shards = [shard_items(items, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4]
    assert all(label == IGNORE_INDEX for label in shards[1][-1]["labels"])
    real = [it for s in shards for it in s if any(x != IGNORE_INDEX for x in it["labels"])]
    assert sorted(_keys(real)) == [k for k in range(7) if k % 3 != 2]  # k % 3 == 2 has no label anyway

    class One:
        process_index, num_processes, device = 0, 1, torch.device("cpu")

    batches = list(EvalShards(items, 3, Collator(0), One()))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert float(token_denominator(batches[0]["labels"], One())) == 2 + 1 + 0  # its own count on one process


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), batch 2 per rank, accumulation 2, an LM loss, the
    teacher sharded with FSDP2, killed after step 3 and resumed (checkpoints written by rank 0
    with every rank's RNG and stream state), against one process with batch 4, the teacher whole.

    Dropout is off: its masks depend on how the batch is split, which is not what is compared.
    The per-rank token counts differ within the global batches (checked below), so a per-rank
    token mean would give other gradients; the global count makes them equal.  Evaluation is
    sharded (7 prompts over 2 ranks) and gathered: the teacher's greedy outputs must be the ones
    one process produces.
    """
    from transformers import AutoTokenizer

    from csd_ext.distill.lm_data import pack_lm_examples

    paths = make_tiny_setup(str(tmp_path / "tiny"), n_eval=7, dropout=0.0)
    tok = AutoTokenizer.from_pretrained(paths["student"])
    # LM text that packs into an even number of blocks (else the sampler repeats one on one
    # rank, and the two runs would not see the same global batches).
    docs = [f"text for the language model, number {k}" for k in range(60)]
    while len(pack_lm_examples(tok, docs, 80)) % 2:
        docs.append("one more document")
    lm = tmp_path / "lm.txt"
    lm.write_text("\n\n".join(docs))
    common = dict(max_steps=4, grad_accum=2, lm_data=str(lm), eval_greedy=True, eval_teacher=True,
                  max_new_tokens=4, eval_batch_size=3, lr=3e-3)
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    # The 2-process run is also killed after step 3 and resumed from its step-2 checkpoint.
    two_args = cli_args(paths, two, batch_size=2, teacher_sharding="shard", save_every=2, **common)
    proc = launch(two_args, cwd=str(tmp_path), nproc=2, env=subprocess_env(CSD_DISTILL_FAULT="after-step:3"))
    status, out_one = run_inprocess(cli_args(paths, one, batch_size=4, **common))
    assert status == 0, out_one[-3000:]
    rc, out_killed = finish(proc)
    assert rc != 0 and not os.path.exists(os.path.join(two, "final")), out_killed[-4000:]
    checkpoint = os.path.join(two, "checkpoint-2")
    manifest = verify_checkpoint(checkpoint)  # written by rank 0, with each rank's own state files
    assert manifest["world_size"] == 2
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
            "trainer_state_rank0.json", "trainer_state_rank1.json"} <= set(manifest["files"])
    rc, out_two = finish(launch(two_args + ["--resume"], cwd=str(tmp_path), nproc=2))
    assert rc == 0, out_two[-4000:]
    assert f"resumed from {checkpoint} (step 2)" in out_two
    assert "batch 2 x accumulation 2 x 2 processes" in out_two and "token mean global" in out_two
    assert "teacher sharded over 2 processes (FSDP2" in out_two
    assert out_two.count("[csd-distill] student: 4 steps") == 1  # rank 0 alone logs

    from safetensors.torch import load_file

    a, b = load_final(one), load_final(two)
    init = load_file(os.path.join(paths["student"], "model.safetensors"))
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3
    print(f"\n2 processes vs 1: max |parameter difference| {diff:.3g}; training moved parameters by up to {moved:.3g}")
    assert diff < 1e-6, f"2-process parameters differ from 1-process by {diff} (training moved them {moved})"

    def records(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    for r1, r2 in zip(records(one), records(two), strict=True):
        for key in ("loss", "kd", "lm", "ce", "val_ce", "val_kd"):
            if key in r1:
                assert abs(r1[key] - r2[key]) <= 1e-5 * abs(r1[key]) + 1e-7, (key, r1, r2)

    def greedy(d, name):
        with open(os.path.join(d, f"generations-{name}.jsonl")) as f:
            return [json.loads(line)["greedy"] for line in f]

    assert greedy(one, "teacher") == greedy(two, "teacher")
    assert len(greedy(two, "student-csd")) == 7
    results = json.load(open(os.path.join(two, "results.json")))["results"]
    assert [r["name"] for r in results] == ["teacher", "student (csd)"]

    # The data really splits unevenly: some global micro-batch has ranks with different token counts.
    from csd_ext.distill.data import encode_dataset, load_dolly_jsonl

    items = encode_dataset(tok, load_dolly_jsonl(paths["train"]), template="minillm", max_length=80,
                           max_prompt_length=64, log=lambda *_: None)
    streams = [ShardedBatchStream(items, 2, seed=3, rank=r, world=2) for r in range(2)]
    counts = [[sum(x != IGNORE_INDEX for it in s.next() for x in it["labels"]) for _ in range(8)] for s in streams]
    assert counts[0] != counts[1]


def test_release_process_group_destroys_the_default_group(tmp_path):
    """The CLI ends every run with release_process_group: left to the
    interpreter's teardown, gloo threads can abort a finished rank."""
    from csd_ext.distill.distributed import release_process_group

    release_process_group()  # no group: nothing to do
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert torch.distributed.is_initialized()
        release_process_group()
        assert not torch.distributed.is_initialized()
        release_process_group()  # twice is fine
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_resume_with_dropout_is_bit_exact(tmp_path):
    """Dropout on, two gloo processes, accumulation 2: a run killed after step 3 and resumed
    from its step-2 checkpoint ends with bit-identical parameters and logged metrics to an
    uninterrupted 2-process run.  Each rank's dropout masks come from its own RNG stream, so
    this holds only if every rank's RNG (and data stream) state is saved and restored."""
    paths = make_tiny_setup(str(tmp_path / "tiny"), dropout=0.1)
    common = dict(max_steps=4, grad_accum=2, batch_size=2, save_every=2, lr=3e-3)
    ref, x = str(tmp_path / "ref"), str(tmp_path / "X")
    cwd = str(tmp_path)
    uninterrupted = launch(cli_args(paths, ref, **common), cwd=cwd, nproc=2)
    killed = launch(cli_args(paths, x, **common), cwd=cwd, nproc=2, env=subprocess_env(CSD_DISTILL_FAULT="after-step:3"))
    rc, out = finish(uninterrupted)
    assert rc == 0, out[-4000:]
    rc, out = finish(killed)
    assert rc != 0 and not os.path.exists(os.path.join(x, "final")), out[-4000:]
    rc, out = finish(launch(cli_args(paths, x, resume=True, **common), cwd=cwd, nproc=2))
    assert rc == 0, out[-4000:]
    assert f"resumed from {x}/checkpoint-2 (step 2)" in out

    from safetensors.torch import load_file

    reference, resumed = load_final(ref), load_final(x)
    assert sorted(resumed) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.equal(resumed[key], tensor), f"{key} differs from the uninterrupted 2-process run"
    init = load_file(os.path.join(paths["student"], "model.safetensors"))
    assert max((init[k] - reference[k]).abs().max().item() for k in reference) > 1e-4  # training moved them

    def records(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "tokens_per_s")} for line in f]

    assert records(x) == records(ref) and any("loss" in r for r in records(ref))
