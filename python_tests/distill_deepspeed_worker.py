"""One csd-distill step under DeepSpeed ZeRO-1 on CPU (test_distill_accumulation.py)."""

import sys
from types import SimpleNamespace

import torch
from distill_step_helpers import examples, models, split, step_fns

from csd_ext.distill.accumulation import accumulate_step, configure_deepspeed
from csd_ext.distill.distributed import make_accelerator
from csd_ext.distill.models import ModelError


def main(out):
    cfg = SimpleNamespace(grad_accum=4, batch_size=2, max_grad_norm=0.0, lm_data=None)
    acc = make_accelerator("no", cfg.grad_accum)  # ZeRO stage from the environment, as accelerate launch sets it
    assert acc.distributed_type.name == "DEEPSPEED", acc.distributed_type
    errors = {}
    for key, bad in (("lm_error", dict(lm_data="x.jsonl")), ("gas_error", dict(grad_accum=3))):
        try:
            configure_deepspeed(acc, SimpleNamespace(**{**vars(cfg), **bad}))
        except ModelError as exc:
            errors[key] = str(exc)
        acc.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] = "auto"
    for key in ("train_micro_batch_size_per_gpu", "gradient_clipping", "train_batch_size"):
        acc.state.deepspeed_plugin.deepspeed_config[key] = "auto"
    if "gas_error" not in errors:  # a value the config fixed to 3 vs --grad-accum 4
        acc.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] = 3
        try:
            configure_deepspeed(acc, cfg)
        except ModelError as exc:
            errors["gas_error"] = str(exc)
        acc.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] = "auto"
    configure_deepspeed(acc, cfg)
    student, teacher = models()
    before = torch.cat([p.detach().flatten() for p in student.parameters()])
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    engine, optimizer = acc.prepare(student, optimizer)
    kd_loss, _ = step_fns(engine, teacher, 0.5)
    steps = []

    def counting(batch, denominator):
        steps.append(engine.global_steps)
        return kd_loss(batch, denominator)

    accumulate_step(acc, engine, split(examples(), 2), counting)
    optimizer.step()  # a no-op under DeepSpeed: the engine stepped on the last backward
    steps = steps[1:] + [engine.global_steps]
    after = torch.cat([p.detach().flatten() for p in acc.unwrap_model(engine).parameters()])
    torch.save({"update": before - after, "engine_steps": steps, **errors}, f"{out}/result.pt")


if __name__ == "__main__":
    main(sys.argv[1])
