"""The reference distillation script: ``csd-distill`` / ``python -m csd_ext.distill``.

Modules, one job each: config (presets and flags), cli, data (Dolly JSONL,
template, masking, padding), models (loading, tokenizer check, vocab slicing,
LoRA), trainer (the accelerate loop), evaluate (generation and scores),
report (table and plot), run (the standard pipeline) and tiny/ (the CPU demo).
"""


def main(argv=None):
    """Console-script entry point; returns the exit status."""
    from .cli import main as cli_main

    status = cli_main(argv)
    if argv is None:  # run as the program: torchrun workers skip interpreter teardown
        from .distributed import exit_program

        exit_program(status)
    return status
