"""Bad input gets a clear error that names the argument."""

import math

import pytest
import torch

from csd_ext import CSDLoss, csd_loss

Z = torch.randn(2, 3, 10)
T = torch.randn(2, 3, 10)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(teacher_logits=torch.randn(2, 3, 12)), ValueError, r"vocabulary size 10 .* 12; slice both to the shared vocabulary"),
        (dict(teacher_logits=torch.randn(3, 2, 10)), ValueError, r"same leading shape"),
        (dict(student_logits=torch.randint(0, 5, (2, 3, 10))), TypeError, r"student_logits must be a floating-point"),
        (dict(teacher_logits=torch.randn(2, 3, 10).to(torch.complex64)), TypeError, r"teacher_logits must be a floating-point"),
        (dict(student_logits=[1.0, 2.0]), TypeError, r"student_logits must be a torch.Tensor"),
        (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, r"student_logits must have shape \[\.\.\., V\]"),
        (dict(student_logits=torch.randn(2, 0), teacher_logits=torch.randn(2, 0)), ValueError, r"empty vocabulary"),
        (dict(teacher_logits=torch.randn(2, 3, 10, device="meta")), ValueError, r"student_logits is on cpu but teacher_logits is on meta"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"labels must have the logits' leading shape \(2, 3\)"),
        (dict(labels=torch.zeros(2, 3)), TypeError, r"labels must be an integer tensor"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.bool)), TypeError, r"labels must be an integer tensor"),
        (dict(labels=[[1, 2, 3]]), TypeError, r"labels must be a torch.Tensor"),
        (dict(weighting="SX"), ValueError, r"weighting must be two letters from S .*'SX'"),
        (dict(weighting="S"), ValueError, r"weighting must be two letters"),
        (dict(weighting="ss"), ValueError, r"weighting must be two letters"),
        (dict(alpha=1.5), ValueError, r"alpha must be a number in \[0, 1\], got 1.5"),
        (dict(alpha=-0.1), ValueError, r"alpha must be"),
        (dict(alpha=math.nan), ValueError, r"alpha must be"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1.0), ValueError, r"temperature must be"),
        (dict(temperature=math.inf), ValueError, r"temperature must be"),
        (dict(temperature=math.nan), ValueError, r"temperature must be"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
    ],
)
def test_bad_input_is_named(kwargs, exc, match):
    args = dict(student_logits=Z, teacher_logits=T, labels=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        csd_loss(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels"), **args)


def test_module_checks_arguments_at_construction():
    with pytest.raises(ValueError, match="weighting"):
        CSDLoss(weighting="XY")
    with pytest.raises(ValueError, match="temperature"):
        CSDLoss(temperature=0)


def test_direct_op_calls_are_checked_in_cpp():
    """Calling the op itself (bypassing Python) still gets named errors, not a crash."""
    op = torch.ops.csd_ext.csd_forward
    with pytest.raises(ValueError, match="vocabulary size"):
        op(torch.randn(2, 5), torch.randn(2, 6), None, "SS", 0.5, 1.0)
    with pytest.raises(ValueError, match="weighting must be two letters"):
        op(torch.randn(2, 5), torch.randn(2, 5), None, "QQ", 0.5, 1.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        op(torch.randn(2, 5), torch.randn(2, 5), None, "MM", 2.0, 1.0)
    with pytest.raises(ValueError, match="temperature must be"):
        op(torch.randn(2, 5), torch.randn(2, 5), None, "SS", 0.5, 0.0)
    with pytest.raises(TypeError, match="student_logits must be float32"):
        op(torch.ones(2, 5, dtype=torch.long), torch.randn(2, 5), None, "SS", 0.5, 1.0)
    with pytest.raises(TypeError, match="row_mask must be a bool"):
        op(torch.randn(2, 5), torch.randn(2, 5), torch.ones(2), "SS", 0.5, 1.0)
    with pytest.raises(ValueError, match=r"row_mask must have shape \[2\]"):
        op(torch.randn(2, 5), torch.randn(2, 5), torch.ones(3, dtype=torch.bool), "SS", 0.5, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        op(torch.randn(5), torch.randn(5), None, "SS", 0.5, 1.0)
    loss, stats = op(torch.randn(2, 5), torch.randn(2, 5), None, "SS", 0.5, 1.0)
    with pytest.raises(ValueError, match="stats must be the contiguous"):
        torch.ops.csd_ext.csd_backward(torch.ones(2), torch.randn(2, 5), torch.randn(2, 5), stats[:1], "SS", 0.5, 1.0)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \[2\]"):
        torch.ops.csd_ext.csd_backward(torch.ones(3), torch.randn(2, 5), torch.randn(2, 5), stats, "SS", 0.5, 1.0)
