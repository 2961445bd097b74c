"""Run under torchrun (2 processes): one CSDTrainer step of 2 x batch 2 x accumulation 2 for each
case given (a kd_ratio, ``+fused`` for use_fused_linear), all in one process group (process
start-up dominates the cost); rank 0 saves each case's parameter update and logged loss
(test_integrations_transformers.py).

    integration_ddp_worker.py OUT ddp:0.5,ddp:0.5+fused,fsdp2cpu:1.0 ddp   # CPU, gloo: DDP, then
                                                      # FSDP2 forced (below); fsdp2cpu cases last
    integration_ddp_worker.py OUT fsdp2:0.5,fsdp2:1.0 fsdp2   # >= 2 CUDA GPUs, nccl, Trainer's FSDP2

A case without a ``mode:`` prefix runs in the mode given last.

The ddp mode also records what Trainer makes of an FSDP2 ``fsdp_config`` on CPU: accelerate
1.16 drops the FSDP plugin unless the processes are on an accelerator (MULTI_GPU, ...), so on
CPU Trainer silently wraps the model in DDP instead (docs/integrations.md).  The fsdp2cpu mode
sets, right after Trainer built its Accelerator, what accelerate would have set on GPUs
(``distributed_type = FSDP`` and the plugin Trainer made from ``fsdp_config``): from there on
Trainer and accelerate run their own FSDP2 code (``fully_shard`` per GPT2Block and the root,
DTensor parameters) on CPU.
"""

import sys

import torch
from integration_helpers import ListDataset, stack_collator, tiny_lm, token_examples
from transformers import Trainer, TrainingArguments

from csd_ext.distill.distributed import exit_program
from csd_ext.integrations.transformers import CSDTrainer

FSDP2 = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]})


def make_args(out, mode):
    extra = {"ddp": dict(use_cpu=True, ddp_backend="gloo"), "fsdp2cpu": dict(use_cpu=True, ddp_backend="gloo", **FSDP2),
             "fsdp2": dict(ddp_backend="nccl", **FSDP2)}[mode]
    return TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                             max_grad_norm=0.0, weight_decay=0.0, report_to="none", save_strategy="no",
                             logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True, **extra)


def full_flat(model):
    """All parameters in one flat fp32 CPU vector (FSDP2 shards them as DTensors: gather them)."""
    parts = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().float().cpu().flatten() for p in parts])


def make_trainer(out, mode, kd_ratio, fused):
    student, teacher = tiny_lm(seed=0), tiny_lm(size="teacher", seed=1)
    original = Trainer.create_accelerator_and_postprocess
    if mode == "fsdp2cpu":  # force FSDP2 where Trainer sets is_fsdp_enabled, so CSDTrainer.__init__ sees it
        Trainer.create_accelerator_and_postprocess = lambda self: (original(self), force_fsdp2(self))
    try:
        trainer = CSDTrainer(model=student, teacher_model=teacher, args=make_args(out, mode),
                             train_dataset=ListDataset(token_examples()), data_collator=stack_collator,
                             kd_ratio=kd_ratio, use_fused_linear=fused,
                             csd_kwargs=dict(weighting="SS", temperature=1.3))
    finally:
        Trainer.create_accelerator_and_postprocess = original
    return trainer, student


def force_fsdp2(trainer):
    """Enable accelerate's FSDP2 on CPU processes as accelerate does for GPU ones (state.py)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def fsdp2_on_cpu(out):
    """What Trainer does with an FSDP2 config when the processes run on CPU."""
    args = TrainingArguments(output_dir=out, use_cpu=True, ddp_backend="gloo", report_to="none", **FSDP2)
    trainer = CSDTrainer(model=tiny_lm(seed=0), teacher_model=tiny_lm(size="teacher", seed=1), args=args)
    return {"is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "plugin_requested": args.fsdp_plugin_args is not None}


def main(out, cases, mode):
    results = {}
    if mode == "ddp":
        results["fsdp2_on_cpu"] = fsdp2_on_cpu(out)
    for case in cases:  # "fsdp2cpu:0.5" runs after the DDP cases (forcing FSDP changes the shared state)
        case_mode, case = case.split(":") if ":" in case else (mode, case)
        kd_ratio, fused = float(case.split("+")[0]), case.endswith("+fused")
        trainer, student = make_trainer(out, case_mode, kd_ratio, fused)
        before = full_flat(student)
        trainer.train()
        results[f"{case_mode}:{case}"] = {"update": before - full_flat(trainer.model),
                                          "loss": trainer.state.log_history[0]["loss"],
                                          "wrapper": type(trainer.model_wrapped).__name__,
                                          "head_weight": type(trainer.model.lm_head.weight).__name__}
    if trainer.is_world_process_zero():
        torch.save(results, f"{out}/result.pt")
    # Destroys the group and skips interpreter teardown (a finished gloo rank can abort there).
    exit_program(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3] if len(sys.argv) > 3 else "ddp")
