"""``--report-to tensorboard|wandb|none``: metrics to experiment trackers through accelerate.

accelerate's trackers (``Accelerator(log_with=...)``, ``init_trackers``, ``log``,
``end_training``) handle the main-process-only logging; TensorBoard writes event files under
``<output_dir>/tensorboard/<run>`` and needs no network (the tested one); wandb follows
``WANDB_MODE`` (``offline`` works without a network).  ``metrics.jsonl`` is written either way.
"""

from .config import ConfigError

CHOICES = ("none", "tensorboard", "wandb")


def check_report_to(value):
    value = str(value or "none").lower()
    if value not in CHOICES:
        raise ConfigError(f"report_to must be one of {list(CHOICES)}, got {value!r}")
    if value == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") \
                    from None
    if value == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to wandb needs the wandb package: pip install wandb") from None
    return value


def accelerator_kwargs(cfg, out_dir):
    """Extra ``Accelerator`` arguments for the configured tracker (none for "none")."""
    value = check_report_to(getattr(cfg, "report_to", "none"))
    if value == "none":
        return {}
    import os

    return {"log_with": value, "project_dir": os.path.join(out_dir, value)}


class Trackers:
    """Forwards metric records to accelerate's trackers; a no-op with ``report_to: none``."""

    def __init__(self, accelerator, cfg, run_name):
        self.accelerator = accelerator
        self.enabled = check_report_to(getattr(cfg, "report_to", "none")) != "none"
        if self.enabled:
            config = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(run_name, config=config)

    def log(self, record):
        if self.enabled:
            values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.accelerator.log(values, step=record.get("step"))

    def close(self):
        if self.enabled:
            self.accelerator.end_training()
