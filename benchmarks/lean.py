"""The CSD loss in lean PyTorch: the strongest formulation a user could write
in twenty lines, for every weighting the benchmark compares (SS, TS, US, MM).

Where paper_style.py copies the official code (`z / temperature`, fp32 copies
of both logit tensors, a full uniform tensor), this one does only what the
math needs:

- weights `softmax(x, -1, dtype=float32)`, read straight from the student's
  dtype (no upcast copy of the input), with no `/tau` at tau = 1;
- U as the scalar 1/V and E_U d as a mean (no [N, V] tensor of 1/V);
- the gradient g = 1/2 [w1 (d - E_w2 d) + w2 (d - E_w1 d)] formed under
  no_grad from the detached weights and cast to the student's dtype;
- the surrogate loss `(g * z).sum(-1)` on the student's own dtype, whose
  gradient with respect to z is g (its value is meaningless, as in the
  official code);
- the token mean over the tokens whose label is not ignored.

Its gradient equals csd_ext's (python_tests/test_bench_quick.py checks it),
so timing it against csd_ext is a fair race.
"""

import torch

WEIGHTINGS = ("SS", "TS", "US", "MM")


def _weights(z, t, weighting, alpha, temperature):
    """{name: [N, V] fp32 weights, or the float 1/V for U}."""
    def soft(x):
        return torch.softmax(x if temperature == 1.0 else x / temperature, dim=-1, dtype=torch.float32)

    need = set(weighting.replace("M", "ST"))
    w = {}
    if "S" in need:
        w["S"] = soft(z)
    if "T" in need:
        w["T"] = soft(t)
    if "U" in need:
        w["U"] = 1.0 / z.shape[-1]
    if "M" in weighting:
        w["M"] = torch.lerp(w["S"], w["T"], alpha)  # alpha T + (1 - alpha) S
    return w


def _mean(w, d):
    """E_w d over the last axis, [N, 1]."""
    if isinstance(w, float):
        return d.mean(-1, keepdim=True)
    return (w * d).sum(-1, keepdim=True)


def lean_csd(student_logits, teacher_logits, labels, weighting="SS", alpha=0.5, temperature=1.0,
             ignore_index=-100):
    vocab = student_logits.shape[-1]
    z = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    with torch.no_grad():
        d = z.float() - t.float()
        w = _weights(z, t, weighting, alpha, temperature)
        w1, w2 = w[weighting[0]], w[weighting[1]]
        if weighting[0] == weighting[1]:
            g = w1 * (d - _mean(w1, d))
        else:
            g = 0.5 * (w1 * (d - _mean(w2, d)) + w2 * (d - _mean(w1, d)))
        g = g.to(z.dtype)
    per_token = (g * z).sum(-1)
    valid = labels.reshape(-1) != ignore_index
    return (per_token.float() * valid).sum() / valid.sum().clamp(min=1)
