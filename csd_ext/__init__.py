"""csd_ext: Concrete Score Distillation loss as fast C++/CUDA PyTorch ops.

    from csd_ext import CSDLoss, csd_loss
    loss = csd_loss(student_logits, teacher_logits, labels, weighting="SS")
"""

from ._version import __version__
from ._ops import compiled_backends
from .loss import CSDLoss, csd_loss
from .fused_linear import FusedLinearCSDLoss, fused_linear_csd
from .sparse import sparse_csd_loss
from .sparse_fused import fused_linear_sparse_csd

__all__ = ["__version__", "compiled_backends", "CSDLoss", "csd_loss", "FusedLinearCSDLoss", "fused_linear_csd",
           "sparse_csd_loss", "fused_linear_sparse_csd"]
