"""A first look at csd_ext: the CSD loss on a GPT-2-sized batch, checked
against the plain PyTorch reference and timed against it.

    python examples/quickstart.py
"""

import time

import torch

import csd_ext
from csd_ext import CSDLoss
from csd_ext.reference import csd_loss_reference


def timed(fn, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    torch.manual_seed(0)
    tokens, vocab = 256, 50257  # a GPT-2 micro-batch
    teacher = torch.randn(tokens, vocab) * 4
    student = (teacher + torch.randn(tokens, vocab)).bfloat16().requires_grad_(True)
    teacher = teacher.bfloat16()
    labels = torch.randint(0, vocab, (tokens,))
    labels[:64] = -100  # prompt tokens are ignored

    print(f"csd_ext {csd_ext.__version__}: backends {csd_ext.compiled_backends()}, "
          f"CPU kernel {torch.ops.csd_ext.cpu_kernel_isa()}, {torch.get_num_threads()} threads")
    for weighting in ("SS", "TS", "US", "MM"):
        crit = CSDLoss(weighting=weighting, alpha=0.15)
        loss = crit(student, teacher, labels)
        ref = csd_loss_reference(student.double(), teacher.double(), labels, weighting=weighting, alpha=0.15)

        def ours():
            student.grad = None
            crit(student, teacher, labels).backward()

        def reference():
            student.grad = None
            csd_loss_reference(student, teacher, labels, weighting=weighting, alpha=0.15).backward()

        t_ours, t_ref = timed(ours), timed(reference, repeats=2)
        print(f"{weighting}: loss {loss.item():.6f} (fp64 reference {ref.item():.6f}); "
              f"forward+backward {t_ours * 1e3:.1f} ms vs reference {t_ref * 1e3:.1f} ms ({t_ref / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
