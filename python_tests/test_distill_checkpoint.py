"""Crash-safe checkpoints: atomic writes, manifest verification with fallback, and a run
killed with SIGKILL then resumed reaching bit-exactly the parameters of an uninterrupted run."""

import json
import os
import shutil
import signal

import pytest
import torch

from csd_ext.distill.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    atomic_write_bytes,
    finalize_checkpoint,
    latest_valid_checkpoint,
    truncate_metrics,
    verify_checkpoint,
)
from scale_utils import cli_args, finish, launch, load_final, make_tiny_setup, run_inprocess, subprocess_env


def _make_checkpoint(root, step, payload=b"weights"):
    tmp = os.path.join(root, f".tmp-checkpoint-{step}")
    os.makedirs(os.path.join(tmp, "shards"))
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(payload * 100)
    with open(os.path.join(tmp, "shards", "rank1.bin"), "wb") as f:
        f.write(b"shard")
    final = os.path.join(root, f"checkpoint-{step}")
    finalize_checkpoint(tmp, final, {"step": step})
    return final


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_bytes(str(path), b"old")
    atomic_write_bytes(str(path), b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["state.json"]


def test_finalized_checkpoint_verifies(tmp_path):
    path = _make_checkpoint(str(tmp_path), 5)
    assert not os.path.exists(tmp_path / ".tmp-checkpoint-5")
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 5
    assert sorted(manifest["files"]) == ["model.safetensors", "shards/rank1.bin"]


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"model.safetensors has 350 bytes, the manifest says 700 \(truncated"),
    ("flip", r"model.safetensors has SHA-256 .* the manifest says"),
    ("delete", r"shards/rank1.bin is missing"),
    ("no_manifest", r"is incomplete: it has no manifest.json"),
    ("bad_manifest", r"manifest.json is unreadable"),
])
def test_damaged_checkpoint_is_detected(tmp_path, damage, message):
    path = _make_checkpoint(str(tmp_path), 3)
    model = os.path.join(path, "model.safetensors")
    if damage == "truncate":
        with open(model, "r+b") as f:
            f.truncate(350)
    elif damage == "flip":
        data = bytearray(open(model, "rb").read())
        data[123] ^= 0x01
        open(model, "wb").write(bytes(data))
    elif damage == "delete":
        os.remove(os.path.join(path, "shards", "rank1.bin"))
    elif damage == "no_manifest":
        os.remove(os.path.join(path, MANIFEST))
    else:
        open(os.path.join(path, MANIFEST), "w").write("{not json")
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)


def test_latest_valid_checkpoint_falls_back(tmp_path):
    root = str(tmp_path)
    assert latest_valid_checkpoint(root) is None
    _make_checkpoint(root, 2)
    newest = _make_checkpoint(root, 4)
    os.makedirs(os.path.join(root, ".tmp-checkpoint-6"))  # an interrupted save: never considered
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.truncate(10)
    messages = []
    path, manifest = latest_valid_checkpoint(root, log=messages.append)
    assert os.path.basename(path) == "checkpoint-2" and manifest["step"] == 2
    assert len(messages) == 1 and "checkpoint-4 is corrupt" in messages[0] and "falling back" in messages[0]
    os.remove(os.path.join(root, "checkpoint-2", MANIFEST))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint(.|\n)*checkpoint-4 is corrupt(.|\n)*"
                                              r"checkpoint-2 is incomplete"):
        latest_valid_checkpoint(root, log=lambda *_: None)


def test_fresh_start_refuses_existing_checkpoints(tmp_path):
    _make_checkpoint(str(tmp_path), 7)
    with pytest.raises(CheckpointError, match="already holds checkpoints .*checkpoint-7.*--resume"):
        CheckpointManager(str(tmp_path), accelerator=None, fingerprint={}).check_fresh_start()


def test_truncate_metrics_drops_only_this_runs_later_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"run": "a", "step": 1}, {"run": "a", "step": 2}, {"run": "b", "step": 3}, {"run": "a", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_metrics(str(path), "a", 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]


# --- end to end: SIGKILL, resume, compare -----------------------------------------------------

def _records(out_dir):
    """The logged training records without wall-clock fields."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")} for r in rows]


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(tmp_path):
    """Dropout on, on-policy sampling (p = 0.5) into a replay buffer, an LM loss, gradient
    accumulation and an epoch boundary (8 steps per epoch): every kind of state a resume must
    restore.  Checkpoints every 3 of 10 steps.

    ref: uninterrupted (in this process, one thread, like the launched runs).
    X: a launched run SIGKILLed inside the save of checkpoint 6 (files written, not yet
       renamed); resumed in a launched run that is SIGKILLed after step 8; resumed again.
    ref again: its newest checkpoint (9) truncated, then resumed: falls back to 6.
    Every one of them must end with exactly the reference's parameters and metrics.
    """
    paths = make_tiny_setup(str(tmp_path / "tiny"), dropout=0.1)
    lm = tmp_path / "lm.txt"
    lm.write_text("\n\n".join(f"some plain text, document {k}, for the language model term" for k in range(20)))
    common = dict(max_steps=10, save_every=3, grad_accum=2, student_gen_ratio=0.5, replay_buffer_size=12,
                  gen_max_new_tokens=6, lm_data=str(lm))
    ref, x = str(tmp_path / "ref"), str(tmp_path / "X")
    cwd = str(tmp_path)

    killed = launch(cli_args(paths, x, **common), cwd=cwd, env=subprocess_env(CSD_DISTILL_FAULT="mid-checkpoint:6"))
    status, out = run_inprocess(cli_args(paths, ref, **common))
    assert status == 0, out[-3000:]
    rc, out = finish(killed)
    assert rc == -signal.SIGKILL, out[-3000:]
    assert sorted(os.listdir(x)) == [".tmp-checkpoint-6", "checkpoint-3", "config.yaml", "metrics.jsonl"]
    assert os.path.isfile(os.path.join(x, ".tmp-checkpoint-6", "model.safetensors"))
    reference = load_final(ref)
    reference_records = _records(ref)

    killed = launch(cli_args(paths, x, resume=True, **common), cwd=cwd,
                    env=subprocess_env(CSD_DISTILL_FAULT="after-step:8"))
    with open(os.path.join(ref, "checkpoint-9", "model.safetensors"), "r+b") as f:
        f.truncate(100)
    status, out = run_inprocess(cli_args(paths, ref, resume=True, **common))
    assert status == 0, out[-3000:]
    assert "checkpoint-9 is corrupt: model.safetensors has 100 bytes" in out and "falling back" in out
    assert f"resumed from {ref}/checkpoint-6 (step 6)" in out
    assert any(n.startswith("checkpoint-9.invalid-") for n in os.listdir(ref))
    rc, out = finish(killed)
    assert rc == -signal.SIGKILL, out[-3000:]
    assert f"resumed from {x}/checkpoint-3 (step 3)" in out
    assert sorted(n for n in os.listdir(x) if "checkpoint" in n) == ["checkpoint-3", "checkpoint-6"]

    status, out = run_inprocess(cli_args(paths, x, resume=True, **common))
    assert status == 0, out[-3000:]
    assert f"resumed from {x}/checkpoint-6 (step 6)" in out

    for name, run in (("X (killed twice)", x), ("ref (corrupt checkpoint)", ref)):
        got = load_final(run)
        assert sorted(got) == sorted(reference)
        for key, tensor in reference.items():
            assert torch.equal(got[key], tensor), f"{name}: {key} differs from the uninterrupted run"
        assert _records(run) == reference_records, f"{name}: logged metrics differ"
    # Resuming with settings that change the data order is refused with a clear error.
    status, out = run_inprocess(cli_args(paths, x, resume=True, batch_size=2, **common))
    assert status == 2
    assert "other settings that fix the data order: batch_size 4 (now 2)" in out
    # The runs moved away from the initial weights (the comparison is not vacuous).
    from safetensors.torch import load_file

    init = load_file(os.path.join(paths["student"], "model.safetensors"))
    assert max((init[n] - reference[n]).abs().max().item() for n in reference) > 1e-4
    shutil.rmtree(tmp_path / "tiny")
