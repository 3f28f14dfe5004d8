"""Drop-in nn.Module losses over the fused ops."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mvcl_fast.ops.multiview import multiview_infonce
from mvcl_fast.ops.prototypes import prototype_infonce


class PrototypeInfoNCELoss(nn.Module):
    """Prototype InfoNCE: each embedding against the prototypes of its batch's classes.

    ``loss = PrototypeInfoNCELoss(num_classes)(z, y)`` with z [N, D] (or views
    [V, N, D]) and integer labels y [N]; pass ``prototypes=`` [C, D] to use a
    fixed/EMA bank instead of the batch prototypes. ``validate`` and ``group`` as in
    ``mvcl_fast.prototype_infonce`` (value checks; DDP's global batch).
    """

    def __init__(self, num_classes: int, tau: float = 0.1, detach_prototypes: bool = False,
                 validate: Optional[bool] = None, group=None):
        super().__init__()
        self.num_classes = num_classes
        self.tau = tau
        self.detach_prototypes = detach_prototypes
        self.validate = validate
        self.group = group

    def forward(self, z: Tensor, y: Tensor, prototypes: Optional[Tensor] = None) -> Tensor:
        return prototype_infonce(z, y, self.num_classes, self.tau, prototypes,
                                 self.detach_prototypes, validate=self.validate, group=self.group)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, tau={self.tau}, "
                f"detach_prototypes={self.detach_prototypes}")


class MultiViewInfoNCELoss(nn.Module):
    """Multi-view InfoNCE: anchor [N, D] against views [V, N, D] (or a list), in-batch negatives.

    Under DDP pass ``group`` to draw the negatives from every rank's batch.
    """

    def __init__(self, tau: float = 0.1, symmetric: bool = False, validate: Optional[bool] = None,
                 group=None):
        super().__init__()
        self.tau = tau
        self.symmetric = symmetric
        self.validate = validate
        self.group = group

    def forward(self, anchor: Tensor, views) -> Tensor:
        return multiview_infonce(anchor, views, self.tau, self.symmetric, validate=self.validate,
                                 group=self.group)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, symmetric={self.symmetric}"
