"""The CSD loss written the way the paper's official PyTorch code computes it,
for every weighting the benchmark compares (SS, TS, US, MM).

This is the baseline users would otherwise run, eager or under
torch.compile, so it deliberately keeps that code's formulation:

- the logits are upcast to fp32 and every weight is a full [N, V] softmax
  tensor (S = softmax(z/tau), T = softmax(t/tau), U = 1/V, M = a*T + (1-a)*S);
- the gradient g = 1/2 [w1 (d - E_w2 d) + w2 (d - E_w1 d)] is formed under
  no_grad (detached weights) and the loss is the surrogate sum_k g_k z_k,
  whose gradient with respect to z is g -- the value itself is meaningless;
- per-token values are averaged over the tokens whose label is not ignored.

For SS it is csd_ext.reference.csd_surrogate_reference (same operations).
Its gradient equals csd_ext's; the benchmark checks that before timing.
"""

import torch

WEIGHTINGS = ("SS", "TS", "US", "MM")


def paper_style_csd(student_logits, teacher_logits, labels, weighting="SS", alpha=0.5, temperature=1.0,
                    ignore_index=-100):
    vocab = student_logits.shape[-1]
    z = student_logits.reshape(-1, vocab).float()
    t = teacher_logits.reshape(-1, vocab).float()
    with torch.no_grad():
        d = z - t
        need = set(weighting.replace("M", "ST"))
        s = torch.softmax(z / temperature, dim=-1) if "S" in need else None
        tw = torch.softmax(t / temperature, dim=-1) if "T" in need else None
        base = {"S": s, "T": tw}
        if "U" in need:
            base["U"] = torch.full_like(z, 1.0 / vocab)
        if "M" in weighting:
            base["M"] = alpha * tw + (1 - alpha) * s
        w1, w2 = base[weighting[0]], base[weighting[1]]
        if weighting[0] == weighting[1]:  # the official code's SS form: w (d - E_w d)
            g = w1 * (d - (w1 * d).sum(-1, keepdim=True))
        else:
            mean1 = (w1 * d).sum(-1, keepdim=True)
            mean2 = (w2 * d).sum(-1, keepdim=True)
            g = 0.5 * (w1 * (d - mean2) + w2 * (d - mean1))
    per_token = (g * z).sum(-1)
    valid = (labels.reshape(-1) != ignore_index).float()
    return (per_token * valid).sum() / valid.sum().clamp(min=1)
