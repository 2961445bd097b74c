"""Name -> loss registry used by the training script: ``get_loss("srkl", lam=0.1)``."""

import functools
import inspect

from .._validate import check_alpha, check_temperature, check_weighting
from ..loss import csd_loss
from ._common import check_lam
from .ab import ab_divergence, check_ab
from .dld import check_dld, dld
from .divergences import (
    fkl,
    jeffreys,
    rkl,
    skew_forward_kl,
    skew_reverse_kl,
    skewed_js,
    symmetric_kl,
    total_variation,
)


def _check_csd(weighting="SS", alpha=0.5, temperature=1.0):
    check_weighting(weighting)
    check_alpha(alpha)
    check_temperature(temperature)


def _check_dld(weight="U", norm="none", temperature=1.0):
    check_dld(weight, norm)
    check_temperature(temperature)


# name -> (function, check of its hyper-parameters, one-line description)
LOSSES = {
    "csd": (csd_loss, _check_csd, "Concrete Score Distillation (weighting, alpha, temperature)"),
    "fkl": (fkl, None, "forward KL(p || q)"),
    "rkl": (rkl, None, "reverse KL(q || p)"),
    "skl": (symmetric_kl, lambda lam=0.9: check_lam(lam), "(1-lam) FKL + lam RKL, lam=0.9"),
    "jeffreys": (jeffreys, None, "KL(p || q) + KL(q || p)"),
    "tv": (total_variation, None, "total variation 1/2 sum |p - q|"),
    "js": (skewed_js, lambda lam=0.9: check_lam(lam), "skewed Jensen-Shannon, lam=0.9"),
    "sfkl": (skew_forward_kl, lambda lam=0.1: check_lam(lam), "KL(p || lam p + (1-lam) q), lam=0.1"),
    "srkl": (skew_reverse_kl, lambda lam=0.1: check_lam(lam), "KL(q || (1-lam) p + lam q), lam=0.1"),
    "ab": (ab_divergence, lambda alpha=0.2, beta=0.7: check_ab(alpha, beta), "AB-divergence, alpha=0.2, beta=0.7"),
    "dld": (dld, _check_dld, "weighted squared logit difference (weight S/T/U, norm)"),
}

ALIASES = {
    "kl": "fkl", "forward_kl": "fkl", "reverse_kl": "rkl", "symmetric_kl": "skl", "jsd": "js",
    "skewed_js": "js", "total_variation": "tv", "ab_divergence": "ab", "skew_forward_kl": "sfkl",
    "skew_reverse_kl": "srkl",
}

_CALL_ARGS = ("ignore_index", "reduction")


def loss_names():
    """The registered loss names (aliases not included)."""
    return sorted(LOSSES)


def canonical_name(name):
    if not isinstance(name, str):
        raise ValueError(f"loss name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(
            f"unknown loss {name!r}; choose one of: {', '.join(loss_names())} "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        )
    return key


def hparam_names(name):
    """Hyper-parameters the loss accepts, e.g. ('lam',) for 'srkl'."""
    fn = LOSSES[canonical_name(name)][0]
    return tuple(
        p.name for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CALL_ARGS
    )


def get_loss(name, **hparams):
    """The loss called ``name`` with its hyper-parameters bound and checked now.

    The result has the call shape of :func:`csd_ext.csd_loss`:
    ``loss(student_logits, teacher_logits, labels=None, *, ignore_index=-100, reduction="mean")``.

        get_loss("csd", weighting="TS")
        get_loss("srkl", lam=0.1)
    """
    key = canonical_name(name)
    fn, check, _ = LOSSES[key]
    allowed = hparam_names(key) + _CALL_ARGS
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(
            f"loss {key!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
            f"it accepts {', '.join(allowed) if allowed else 'none'}"
        )
    if check is not None:
        check(**{k: v for k, v in hparams.items() if k not in _CALL_ARGS})
    bound = functools.partial(fn, **hparams)
    bound.loss_name = key
    return bound
