"""csd-distill's accumulation (csd_ext/distill/accumulation.py): one optimiser step of
micro-batch 2 x accumulation 4 gives the gradient of micro-batch 8, through accelerate's
accumulate(); under DeepSpeed ZeRO-1 on CPU too when DeepSpeed is installed."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")

from csd_testing import env_with_this_csd_ext  # noqa: E402
from distill_step_helpers import examples, models, split, step_fns  # noqa: E402

from csd_ext.distill.accumulation import accumulate_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def accelerator_with(steps):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.gradient_accumulation_steps = steps
    return acc


def grads(micro, kd_ratio, with_lm=False):
    student, teacher = models()
    items = examples()
    batches = split(items, micro)
    lm_batches = split(list(reversed(examples(seed=4))), micro) if with_lm else None
    kd_loss, lm_loss = step_fns(student, teacher, kd_ratio)
    acc = accelerator_with(len(batches))
    out = accumulate_step(acc, student, batches, kd_loss, lm_batches=lm_batches, lm_fn=lm_loss, lm_coef=0.3)
    assert acc.sync_gradients  # the last backward ended the window
    losses = torch.stack([loss for loss, _, _ in out])
    return torch.cat([p.grad.flatten() for p in student.parameters()]), losses.mean()


@pytest.mark.parametrize("with_lm", [False, True], ids=["kd", "kd+lm"])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_micro2_accum4_equals_micro8(kd_ratio, with_lm):
    g8, loss8 = grads(8, kd_ratio, with_lm)
    g2, loss2 = grads(2, kd_ratio, with_lm)
    assert g8.abs().max() > 1e-4
    torch.testing.assert_close(g2, g8, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss2, loss8, rtol=1e-5, atol=1e-7)


def test_per_micro_batch_means_would_differ():
    """Control: averaging each micro-batch's own token mean (the old loop) gives another
    gradient on this data, so the test above can fail."""
    student, teacher = models()
    kd_loss, _ = step_fns(student, teacher, 0.5)
    for batch in split(examples(), 2):
        loss, _ = kd_loss(batch, None)
        (loss / 4).backward()
    old = torch.cat([p.grad.flatten() for p in student.parameters()])
    g8, _ = grads(8, 0.5)
    assert (old - g8).abs().max() > 1e-3 * g8.abs().max()


def test_window_must_match_the_accelerator():
    student, teacher = models()
    kd_loss, _ = step_fns(student, teacher, 1.0)
    with pytest.raises(ValueError, match="accumulates 4"):
        accumulate_step(accelerator_with(4), student, split(examples(), 4), kd_loss)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero1_on_cpu_matches_micro8(tmp_path):
    """The same step under DeepSpeed ZeRO-1 (CPU accelerator, gloo), with SGD lr 1: the engine
    must step once, after the 4th backward, with the micro-batch-8 gradient.  DeepSpeed builds a
    CPU communication op the first time (minutes; cached in ~/.cache/torch_extensions)."""
    g8, _ = grads(8, 0.5)
    # This process's csd_ext (the installed one in CI: the clone has no compiled _C), then the helpers.
    env = env_with_this_csd_ext()
    env.update(PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], HERE]), OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "distill_deepspeed_worker.py"), str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["engine_steps"] == [0, 0, 0, 1]
    torch.testing.assert_close(result["update"], g8, rtol=1e-5, atol=1e-7)
    assert "--lm-data under DeepSpeed is not supported" in result["lm_error"]
    assert "gradient_accumulation_steps=3" in result["gas_error"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from integration_helpers import reset_accelerate_state

    reset_accelerate_state()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_csd_distill_under_deepspeed_zero1_matches_plain_run(tmp_path):
    """The whole csd-distill run (2 steps, batch 2 x accumulation 2) under DeepSpeed ZeRO-1 on
    CPU ends with the weights, losses and gradient norms of the same run without DeepSpeed."""
    import json

    from safetensors.torch import load_file
    from scale_utils import cli_args, make_tiny_setup, run_inprocess

    paths = make_tiny_setup(str(tmp_path / "tiny"), n_train=24, n_eval=4, dropout=0.0)
    common = dict(max_steps=2, batch_size=2, grad_accum=2, eval_max_examples=2, max_new_tokens=4)
    plain, ds = str(tmp_path / "plain"), str(tmp_path / "ds")
    status, out = run_inprocess(cli_args(paths, plain, **common))
    assert status == 0, out[-3000:]
    env = env_with_this_csd_ext()
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + (os.getpid() + 7) % 1000), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="1")
    proc = subprocess.run([sys.executable, "-m", "csd_ext.distill", *cli_args(paths, ds, **common)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = load_file(os.path.join(plain, "final", "model.safetensors")), load_file(os.path.join(ds, "final",
                                                                                                "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)

    def records(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [v for r in map(json.loads, f) if "loss" in r for v in (r["loss"], r["grad_norm"])]

    assert records(ds) == pytest.approx(records(plain), rel=1e-6)
