"""Run under torchrun (2 processes, gloo): one CSDTrainer step of 2 x batch 2 x accumulation 2;
rank 0 saves the parameter update and the logged loss (test_integrations_transformers.py)."""

import sys

import torch
from integration_helpers import ListDataset, stack_collator, tiny_lm, token_examples
from transformers import TrainingArguments

from csd_ext.integrations.transformers import CSDTrainer


def main(out):
    student, teacher = tiny_lm(seed=0), tiny_lm(size="teacher", seed=1)
    before = torch.cat([p.detach().flatten() for p in student.parameters()])
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                             max_grad_norm=0.0, weight_decay=0.0, report_to="none", save_strategy="no",
                             logging_steps=1, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                             ddp_backend="gloo")
    trainer = CSDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(token_examples()),
                         data_collator=stack_collator, kd_ratio=0.5, csd_kwargs=dict(weighting="SS", temperature=1.3))
    trainer.train()
    if trainer.is_world_process_zero():
        after = torch.cat([p.detach().flatten() for p in student.parameters()])
        torch.save({"update": before - after, "loss": trainer.state.log_history[0]["loss"]}, f"{out}/result.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
