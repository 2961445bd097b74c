"""LigerFusedLinearCSDLoss (csd_ext.integrations.liger): Liger's call signature, the values and
gradients of fused_linear_csd (and of CE + CSD), and why TRL's Liger path cannot be exercised."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from csd_ext import csd_loss, fused_linear_csd
from csd_ext.integrations.liger import LigerFusedLinearCSDLoss


def inputs(n=37, h=8, ht=12, v=29, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    labels[5] = 3  # keep a valid one among ignored
    student = [r(n, h).requires_grad_(), r(v, h).requires_grad_(), r(v).requires_grad_() if bias else None]
    teacher = [r(n, ht), r(v, ht), r(v) if bias else None]
    return student, teacher, labels


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighting", ["SS", "TM", "US"])
def test_soft_only_equals_fused_linear_csd(bias, weighting):
    (x, w, b), (tx, tw, tb), labels = inputs(bias=bias)
    fn = LigerFusedLinearCSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, weighting=weighting, alpha=0.3,
                                 temperature=1.7, chunk_size=8)
    ours = fn(x, w, tx, tw, labels, b, tb)
    ref = fused_linear_csd(x, w, None, labels, teacher_hidden=tx, teacher_weight=tw, student_bias=b,
                           teacher_bias=tb, weighting=weighting, alpha=0.3, temperature=1.7)
    torch.testing.assert_close(ours, ref)
    for a, r in zip(grads_of(ours, (x, w, b)), grads_of(ref, (x, w, b))):
        torch.testing.assert_close(a, r)


def test_hard_and_soft_equal_plain_pytorch():
    """weight_hard * CE + weight_soft * CSD, token means over labels != -100, against float64
    autograd on the materialised logits (same stop-gradient weights as csd_loss)."""
    (x, w, b), (tx, tw, tb), labels = inputs()
    fn = LigerFusedLinearCSDLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, temperature=1.2)
    # Liger's keyword names, as code written for LigerFusedLinearJSDLoss calls it
    ours = fn(student_input=x, student_weight=w, teacher_input=tx, teacher_weight=tw, true_labels=labels,
              student_bias=b, teacher_bias=tb)
    z = F.linear(x, w, b)
    t = F.linear(tx, tw, tb)
    ref = 0.3 * F.cross_entropy(z, labels, ignore_index=-100) + 0.7 * csd_loss(z, t, labels, temperature=1.2)
    torch.testing.assert_close(ours, ref)
    for a, r in zip(grads_of(ours, (x, w, b)), grads_of(ref, (x, w, b))):
        torch.testing.assert_close(a, r)


def test_batched_shapes_and_float32():
    (x, w, b), (tx, tw, tb), labels = inputs(n=24, dtype=torch.float32)
    fn = LigerFusedLinearCSDLoss()
    flat = fn(x, w, tx, tw, labels, b, tb)
    batched = fn(x.reshape(4, 6, -1), w, tx.reshape(4, 6, -1), tw, labels.reshape(4, 6), b, tb)
    torch.testing.assert_close(batched, flat)


def test_all_ignored_gives_zero_and_bad_args_are_named():
    (x, w, b), (tx, tw, tb), labels = inputs()
    loss = LigerFusedLinearCSDLoss()(x, w, tx, tw, torch.full_like(labels, -100), b, tb)
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="weight_hard_loss"):
        LigerFusedLinearCSDLoss(weight_hard_loss=-1)
    with pytest.raises(ValueError, match="weighting"):
        LigerFusedLinearCSDLoss(weighting="QQ")
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearCSDLoss(temperature=0)


def test_trl_has_no_liger_distillation_path_to_run_it_in():
    """Why this class is not tested inside TRL's `use_liger_kernel` path: TRL 1.16's GKDTrainer has
    no such path any more (it always calls `generalized_jsd_loss` on full logits), its
    `DistillationTrainer` uses its own chunked JSD, and the async distillation trainer raises
    NotImplementedError for `use_liger_kernel`.  Liger-Kernel itself needs Triton and a GPU.  If a
    TRL release brings a Liger distillation path back, this test fails: then test the class in it."""
    trl = pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer import distillation_trainer

    assert "liger" not in inspect.getsource(GKDTrainer).lower(), trl.__version__
    assert "LigerFusedLinearJSDLoss" not in inspect.getsource(distillation_trainer), trl.__version__


def test_version_checks_say_what_to_upgrade(monkeypatch):
    from packaging.version import Version

    from csd_ext.integrations import _versions

    monkeypatch.setattr(_versions, "installed_version", lambda name: Version("0.1"))
    with pytest.raises(ImportError, match=r"needs trl >= 1\.7, found 0\.1: pip install -U 'trl>=1\.7'"):
        _versions.require("trl")
    monkeypatch.setattr(_versions, "installed_version", lambda name: None)
    with pytest.raises(ImportError, match="not installed: pip install 'transformers>=4.46'"):
        _versions.require("transformers")
    monkeypatch.undo()
    assert _versions.require("transformers") >= Version("4.46")
