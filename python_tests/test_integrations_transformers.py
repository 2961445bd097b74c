"""CSDTrainer (csd_ext.integrations.transformers): loss definition, gradient accumulation
equivalence (transformers #37766), teacher handling, checkpoints, 2 gloo processes."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from scale_utils import subprocess_env  # noqa: E402
from integration_helpers import ListDataset, stack_collator, tiny_lm, token_examples  # noqa: E402

from csd_ext import csd_loss  # noqa: E402
from csd_ext.integrations.transformers import CSDTrainer, shift_labels  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def make_args(out, batch, accum, **over):
    from transformers import TrainingArguments

    kw = dict(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
              max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
              weight_decay=0.0, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
              dataloader_num_workers=0, disable_tqdm=True)
    kw.update(over)
    return TrainingArguments(**kw)


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def one_step(tmp_path, batch, accum, kd_ratio, fused, **args):
    student, teacher = tiny_lm(seed=0), tiny_lm(size="teacher", seed=1)
    before = flat_params(student)
    trainer = CSDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path / f"{batch}x{accum}", batch,
                                                                              accum, **args),
                         train_dataset=ListDataset(token_examples()), data_collator=stack_collator,
                         kd_ratio=kd_ratio, use_fused_linear=fused, csd_kwargs=dict(weighting="SS", temperature=1.3))
    trainer.train()
    log = trainer.state.log_history[0]
    # SGD with lr 1 and no clipping: the update is minus the gradient
    return before - flat_params(student), log["loss"], log["grad_norm"]


def test_data_makes_micro_batch_means_differ():
    """The equivalence below only means something if the micro-batches hold different numbers
    of scored tokens (then a mean of per-micro-batch means is not the batch's token mean)."""
    counts = [int((shift_labels(stack_collator(token_examples()[i:i + 2])["labels"]) != -100).sum())
              for i in range(0, 8, 2)]
    assert len(set(counts)) > 1, counts


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_accumulation_equivalence(tmp_path, kd_ratio, fused):
    """One optimiser step of batch 8 x accumulation 1 == 2 x 4 == 4 x 2, to fp32 rounding."""
    grad8, loss8, norm8 = one_step(tmp_path, 8, 1, kd_ratio, fused)
    assert grad8.abs().max() > 1e-3  # the step did something
    for batch, accum in ((2, 4), (4, 2)):
        grad, loss, norm = one_step(tmp_path, batch, accum, kd_ratio, fused)
        torch.testing.assert_close(grad, grad8, rtol=1e-5, atol=1e-7, msg=f"{batch}x{accum}")
        assert loss == pytest.approx(loss8, rel=1e-5)
        assert norm == pytest.approx(norm8, rel=1e-5)


def test_fused_linear_equals_logits_path(tmp_path):
    grad_a, loss_a, _ = one_step(tmp_path / "a", 8, 1, 0.5, False)
    grad_b, loss_b, _ = one_step(tmp_path / "b", 8, 1, 0.5, True)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_is_ce_and_csd_token_means(tmp_path, family):
    """compute_loss on a padded batch == (1 - r) CE + r csd_loss over the shifted, non-ignored tokens."""
    student, teacher = tiny_lm(seed=0, family=family), tiny_lm(size="teacher", seed=1, family=family)
    batch = stack_collator(token_examples())
    for fused in (False, True):
        trainer = CSDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, 8, 1),
                             kd_ratio=0.25, use_fused_linear=fused, csd_kwargs=dict(weighting="TS"))
        loss = trainer.compute_loss(student, dict(batch))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        z = student(**inputs).logits[:, :-1]
        with torch.no_grad():
            t = teacher(**inputs).logits[:, :-1]
        y = batch["labels"][:, 1:]
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)
        expected = 0.75 * ce + 0.25 * csd_loss(z, t, y, weighting="TS")
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_teacher_frozen_not_saved_and_resume(tmp_path):
    """The teacher gets no gradient, stays unchanged and out of the checkpoints; training 4 steps
    straight == 2 steps, a checkpoint, and a resumed run to step 4 (AdamW state included)."""
    from safetensors.torch import load_file

    common = dict(optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear", max_grad_norm=1.0)

    from transformers import TrainerCallback

    class StopAt(TrainerCallback):  # an interrupted run: configured for 4 steps, stops after `step`
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                control.should_training_stop = True

    def run(out, stop_at=None, resume=None, save=False):
        student, teacher = tiny_lm(seed=0), tiny_lm(size="teacher", seed=1)
        teacher_before = flat_params(teacher)
        args = make_args(out, 2, 1, max_steps=4, save_strategy="steps" if save else "no", save_steps=2, **common)
        trainer = CSDTrainer(model=student, teacher_model=teacher, args=args, kd_ratio=0.5,
                             train_dataset=ListDataset(token_examples()), data_collator=stack_collator,
                             callbacks=[StopAt(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert torch.equal(flat_params(teacher), teacher_before)
        assert not teacher.training
        opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert not opt_params & {id(p) for p in teacher.parameters()}
        return student

    straight = run(tmp_path / "straight")
    run(tmp_path / "first", stop_at=2, save=True)
    ckpt = tmp_path / "first" / "checkpoint-2"
    saved = load_file(str(ckpt / "model.safetensors"))
    student_shapes = {k: tuple(v.shape) for k, v in tiny_lm(seed=0).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in saved.items()}.items() <= student_shapes.items()
    assert not any("teacher" in name for name in os.listdir(ckpt))
    resumed = run(tmp_path / "first", resume=str(ckpt))
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-5, atol=1e-6)


def run_two_processes(tmp_path, cases, mode):
    """integration_ddp_worker.py under torchrun with 2 processes; rank 0's saved results."""
    out = tmp_path / mode
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], HERE])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "integration_ddp_worker.py"), str(out), ",".join(cases), mode]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "result.pt")


def assert_equals_one_process(tmp_path, results, cases, rtol, atol):
    """Each case ("ddp:0.5", "fsdp2cpu:1.0", "ddp:0.5+fused") equals one process x batch 8."""
    for case in cases:
        spec = case.split(":")[1]
        kd_ratio, fused = float(spec.split("+")[0]), spec.endswith("+fused")
        grad8, loss8, _ = one_step(tmp_path / case.replace(":", "_"), 8, 1, kd_ratio, fused)
        torch.testing.assert_close(results[case]["update"], grad8, rtol=rtol, atol=atol,
                                   msg=lambda m: f"case {case}: {m}")
        assert results[case]["loss"] == pytest.approx(loss8, rel=rtol), case


def test_two_gloo_processes_equal_one(tmp_path):
    """2 processes x batch 2 x accumulation 2 (tokens averaged across devices) == 1 process x
    batch 8, in one optimiser step, all in one torchrun (start-up dominates the cost):
    - DDP: kd_ratio 0.5 and 1 on the logits path, kd_ratio 0.5 on the fused path;
    - FSDP2 through Trainer (fsdp_config version 2), forced on CPU: kd_ratio 0.5 and 1, logits and
      fused paths (the LM head sits in the root FSDP2 group, unsharded from forward to backward).
    accelerate 1.16 enables FSDP only on accelerator processes: on CPU it drops the plugin and
    Trainer runs DDP (checked below).  The worker sets, after Trainer built its Accelerator, what
    accelerate would set on GPUs; from there Trainer's and accelerate's own FSDP2 code runs."""
    ddp = ["ddp:0.5", "ddp:1.0", "ddp:0.5+fused"]
    fsdp2 = ["fsdp2cpu:0.5", "fsdp2cpu:1.0", "fsdp2cpu:0.5+fused", "fsdp2cpu:1.0+fused"]
    results = run_two_processes(tmp_path, ddp + fsdp2, "ddp")
    assert all(results[c]["wrapper"] == "DistributedDataParallel" for c in ddp), results
    # really sharded: FSDP2's fully_shard wrapper class, parameters as DTensors
    assert all(results[c]["wrapper"].startswith("FSDP") and results[c]["head_weight"] == "DTensor"
               for c in fsdp2), results
    assert_equals_one_process(tmp_path, results, ddp + fsdp2, rtol=1e-5, atol=1e-7)
    # If accelerate starts enabling FSDP on CPU, drop force_fsdp2 from the worker.
    fsdp = results["fsdp2_on_cpu"]
    assert fsdp["plugin_requested"] and not fsdp["is_fsdp_enabled"], fsdp
    assert fsdp["distributed_type"] == "DistributedType.MULTI_CPU", fsdp


FSDP2_GPU_REASON = (
    "needs >= 2 CUDA GPUs (nccl). On CPU, accelerate 1.16 drops the FSDP plugin (AcceleratorState sets "
    "DistributedType.FSDP only for MULTI_GPU/XPU/NPU/... processes) and transformers 5.24's Trainer runs DDP; "
    "test_two_gloo_processes_equal_one runs Trainer's FSDP2 on CPU by forcing that state instead")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason=FSDP2_GPU_REASON)
def test_fsdp2_processes_equal_one(tmp_path):
    """2 GPUs x batch 2 x accumulation 2 under Trainer's FSDP2 (nccl), unforced == 1 CPU process x
    batch 8, one optimiser step, logits path, kd_ratio 0.5 and 1 (GPU vs CPU reductions: rtol 1e-4)."""
    cases = ["fsdp2:0.5", "fsdp2:1.0"]
    results = run_two_processes(tmp_path, cases, "fsdp2")
    assert all(results[c]["wrapper"].startswith("FSDP") for c in cases), results
    assert_equals_one_process(tmp_path, results, cases, rtol=1e-4, atol=1e-6)


def test_fused_linear_refused_under_fsdp1(tmp_path, monkeypatch):
    """use_fused_linear=True under FSDP version 1 is refused with a clear error; the automatic
    choice (None) falls back to the logits path there.  FSDP cannot be enabled on CPU (see
    above), so Trainer's flag is set right after Trainer computes it (no FSDP2 plugin: version 1)."""
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def as_if_fsdp(self):
        original(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_if_fsdp)
    args = make_args(tmp_path, 2, 1)
    student, teacher = tiny_lm(vocab=100_000, seed=0), tiny_lm(vocab=100_000, size="teacher", seed=1)
    with pytest.raises(ValueError, match="use_fused_linear=True is not supported under FSDP version 1"):
        CSDTrainer(model=student, teacher_model=teacher, args=args, use_fused_linear=True)
    assert not CSDTrainer(model=student, teacher_model=teacher, args=args).use_fused_linear
    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", original)
    assert CSDTrainer(model=student, teacher_model=teacher, args=args).use_fused_linear  # V >= 100k, no FSDP


def test_bad_arguments_are_named(tmp_path):
    student, teacher = tiny_lm(seed=0), tiny_lm(size="teacher", seed=1)
    args = make_args(tmp_path, 2, 1)
    with pytest.raises(ValueError, match="csd_kwargs: unknown key"):
        CSDTrainer(model=student, teacher_model=teacher, args=args, csd_kwargs=dict(beta=0.5))
    with pytest.raises(ValueError, match="weighting"):
        CSDTrainer(model=student, teacher_model=teacher, args=args, csd_kwargs=dict(weighting="XX"))
    with pytest.raises(ValueError, match="kd_ratio"):
        CSDTrainer(model=student, teacher_model=teacher, args=args, kd_ratio=2)
    with pytest.raises(ValueError, match="needs a teacher_model"):
        CSDTrainer(model=student, args=args)
    other = tiny_lm(vocab=70, seed=2)
    trainer = CSDTrainer(model=student, teacher_model=other, args=args)
    with pytest.raises(ValueError, match="vocab_size"):
        trainer.compute_loss(student, stack_collator(token_examples(2)))
    trainer = CSDTrainer(model=student, teacher_model=other, args=args, vocab_size=61)
    assert torch.isfinite(trainer.compute_loss(student, stack_collator(token_examples(2))))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from integration_helpers import reset_accelerate_state

    reset_accelerate_state()


def test_fused_linear_names_a_sharded_head(tmp_path):
    """Under FSDP2 an LM head that is its own FSDP unit is resharded after the forward: its
    weight is then a DTensor and the fused path says so instead of computing with a shard."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from csd_ext.integrations.transformers import check_unsharded

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = distribute_tensor(torch.randn(8, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(ValueError, match="lm_head.weight is still sharded"):
            check_unsharded(sharded)
        check_unsharded(torch.randn(8, 4))
    finally:
        dist.destroy_process_group()
