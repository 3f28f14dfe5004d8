"""multiview_infonce as a torch custom op.

``mvcl_fast::multiview_infonce`` (anchor [N, D], views [V, N, D]) returns the
loss and the O(N) statistics its backward needs (row and, when symmetric,
column log-sum-exps per view); ``mvcl_fast::multiview_infonce_backward``
recomputes the logits tile by tile on the kernel path.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from mvcl_fast import checks, reference
from mvcl_fast.backend import kernel_module, use_triton
from mvcl_fast.ops.common import reference_vjp

KERNELS = "multiview_infonce"


@torch.library.custom_op("mvcl_fast::multiview_infonce", mutates_args=())
def _multiview_infonce(anchor: Tensor, views: Tensor, tau: float,
                       symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton("multiview_infonce", anchor):
        return kernel_module(KERNELS).multiview_infonce_forward(anchor, views, tau, symmetric)
    terms, lse_rows, lse_cols = reference.multiview_infonce_terms(anchor, views, tau, symmetric)
    return terms.mean(), lse_rows, lse_cols


@_multiview_infonce.register_fake
def _(anchor, views, tau, symmetric):
    acc = reference.compute_dtype(anchor.dtype)
    num_views, n = views.shape[0], views.shape[1]
    return (anchor.new_empty((), dtype=acc),
            anchor.new_empty(num_views, n, dtype=acc),
            anchor.new_empty(num_views, n if symmetric else 0, dtype=acc))


@torch.library.custom_op("mvcl_fast::multiview_infonce_backward", mutates_args=())
def _multiview_infonce_backward(grad_loss: Tensor, anchor: Tensor, views: Tensor, tau: float,
                                symmetric: bool, lse_rows: Tensor,
                                lse_cols: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton("multiview_infonce", anchor):
        return kernel_module(KERNELS).multiview_infonce_backward(
            grad_loss, anchor, views, tau, symmetric, lse_rows, lse_cols)

    def loss_of(a, k):
        return reference.multiview_infonce_terms(a, k, tau, symmetric)[0].mean()

    grad_anchor, grad_views = reference_vjp(loss_of, (anchor, views), grad_loss)
    return grad_anchor.contiguous(), grad_views.contiguous()


@_multiview_infonce_backward.register_fake
def _(grad_loss, anchor, views, tau, symmetric, lse_rows, lse_cols):
    # Gradients come back contiguous whatever the inputs' strides.
    return anchor.new_empty(anchor.shape), views.new_empty(views.shape)


def _setup(ctx, inputs, output):
    anchor, views, tau, symmetric = inputs
    _, lse_rows, lse_cols = output
    ctx.save_for_backward(anchor, views, lse_rows, lse_cols)
    ctx.tau, ctx.symmetric = tau, symmetric


def _grad(ctx, grad_loss, grad_lse_rows, grad_lse_cols):
    anchor, views, lse_rows, lse_cols = ctx.saved_tensors
    grad_anchor, grad_views = _multiview_infonce_backward(
        grad_loss, anchor, views, ctx.tau, ctx.symmetric, lse_rows, lse_cols)
    return grad_anchor, grad_views, None, None


_multiview_infonce.register_autograd(_grad, setup_context=_setup)


def _gather_rows(x: Tensor, group, dim: int) -> Tensor:
    """All-gather x along dim from every rank of group; gradients flow back to the owner."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous(), group=group), dim=dim)


def multiview_infonce(anchor: Tensor, views: Union[Tensor, Sequence[Tensor]], tau: float = 0.1,
                      symmetric: bool = False, *, check_finite: Optional[bool] = None,
                      group=None) -> Tensor:
    """Multi-view InfoNCE with in-batch negatives.

    anchor [N, D]; views [V, N, D] or a list of V tensors [N, D]. For each view
    v the loss is CE(norm(anchor) norm(views_v)^T / tau, arange(N)); the result
    is the mean over views. symmetric=True averages each view's term with the
    view-to-anchor direction. On the kernel path the N x N logits are never
    materialised (memory O(N D)). Returns a scalar in anchor's dtype.

    With ``group`` (a torch.distributed process group; every rank must hold
    the same N, e.g. a sampler with drop_last) the negatives come from every
    rank: anchor and views are all-gathered (differentiably: each rank's
    gradient flows back to the rank that owns the rows) and the fused loss
    runs over the global batch of R*N rows, so every rank returns the loss of
    the global batch. As with DDP's averaging, each rank's gradient divided by
    the world size is the global-batch gradient.
    """
    checks.check_tensor("anchor", anchor, 2)
    checks.check_nonempty("anchor", anchor)
    if isinstance(views, (list, tuple)):
        if len(views) == 0:
            raise ValueError("views is an empty list: give at least one view [N, D]")
        for i, view in enumerate(views):
            checks.check_tensor(f"views[{i}]", view, 2)
            checks.check_shape(f"views[{i}]", view, anchor.shape)
            checks.check_same(["anchor", f"views[{i}]"], [anchor, view])
        views = torch.stack(list(views))
    checks.check_tensor("views", views, 3)
    checks.check_nonempty("views", views)
    checks.check_shape("views", views, (views.shape[0], *anchor.shape))
    checks.check_same(["anchor", "views"], [anchor, views])
    tau = checks.check_tau(tau)
    if checks.wants_finite_check(check_finite, anchor, views):
        checks.check_finite_values(["anchor", "views"], [anchor, views])
    if group is not None:
        anchor, views = _gather_rows(anchor, group, 0), _gather_rows(views, group, 1)
    loss, _, _ = _multiview_infonce(anchor, views, tau, bool(symmetric))
    return loss.to(anchor.dtype)
