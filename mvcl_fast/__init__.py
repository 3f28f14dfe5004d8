"""mvcl_fast: MVCL-DAF++ multimodal intent recognition on fused Triton kernels.

Public API: the four ops (custom ops with autograd, dispatching CUDA tensors
to the Triton kernels and CPU tensors to the PyTorch reference) and the two
drop-in losses.
"""
from mvcl_fast.losses import MultiViewInfoNCELoss, PrototypeInfoNCELoss
from mvcl_fast.ops.daf import daf_attention
from mvcl_fast.ops.multiview import multiview_infonce
from mvcl_fast.ops.prototypes import batch_prototypes, prototype_infonce

__version__ = "0.1.0"

__all__ = [
    "batch_prototypes",
    "prototype_infonce",
    "multiview_infonce",
    "daf_attention",
    "PrototypeInfoNCELoss",
    "MultiViewInfoNCELoss",
]
