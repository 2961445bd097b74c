"""Drop-in integrations of the CSD loss with the trainers people already use.

- ``csd_ext.integrations.transformers.CSDTrainer``: an HF ``Trainer`` that distils.
- ``csd_ext.integrations.trl.CSDGKDTrainer``: TRL's GKD trainer with CSD in place of the JSD.
- ``csd_ext.integrations.liger.LigerFusedLinearCSDLoss``: a fused linear + CSD loss with the call
  signature of Liger-Kernel's distillation losses (``LigerFusedLinearJSDLoss``).

Each submodule imports its framework only when imported itself, so ``import csd_ext`` never
needs transformers or TRL.  docs/integrations.md has runnable examples.
"""
