"""multiview_infonce as a torch custom op.

``mvcl_fast::multiview_infonce`` (anchor [N, D], views [V, N, D], and the
row range [row_start, row_start + num_rows) whose terms make the loss: all N
rows, or a DDP rank's own rows of the gathered batch) returns the loss and
the O(N) statistics its backward needs (per view and row of the range: the
log-sum-exp and the term lse - S_ii, of the rows and, when symmetric, of the
columns; the inverse norms of every row, so the backward does not compute
them again); the loss comes in the anchor's dtype, written so by the kernel.
``mvcl_fast::multiview_infonce_backward`` recomputes the logits tile by tile
on the kernel path. Gradients of the statistics are never read, so autograd
does not materialise them (no zero-filled tensors).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from mvcl_fast import checks, reference
from mvcl_fast.backend import kernel_module, use_triton
from mvcl_fast.ops.common import no_gradients, reference_vjp

KERNELS = "multiview_infonce"


@torch.library.custom_op("mvcl_fast::multiview_infonce", mutates_args=())
def _multiview_infonce(anchor: Tensor, views: Tensor, tau: float, symmetric: bool,
                       row_start: int = 0, num_rows: int = -1
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse_rows, lse_cols, row_terms, col_terms, rnorm); see the module docstring."""
    num_rows = _rows(anchor, row_start, num_rows)
    if use_triton("multiview_infonce", anchor):
        return kernel_module(KERNELS).multiview_infonce_forward(anchor, views, tau, symmetric,
                                                                row_start, num_rows)
    terms, *stats = reference.multiview_infonce_terms(anchor, views, tau, symmetric, row_start,
                                                      num_rows)
    rows = torch.cat([views, anchor[None]]).float()
    rnorm = torch.linalg.vector_norm(rows, dim=-1).clamp_min(reference.NORM_EPS).reciprocal()
    return (terms.mean().to(anchor.dtype), *stats, rnorm)


def _rows(anchor: Tensor, row_start: int, num_rows: int) -> int:
    """The row range's length (-1: to the end), checked against N."""
    n = anchor.shape[0]
    num_rows = n - row_start if num_rows < 0 else num_rows
    if not (0 <= row_start and 1 <= num_rows and row_start + num_rows <= n):
        raise ValueError(f"rows [{row_start}, {row_start + num_rows}) are not inside the "
                         f"anchor's {n} rows")
    return num_rows


@_multiview_infonce.register_fake
def _(anchor, views, tau, symmetric, row_start=0, num_rows=-1):
    acc = reference.compute_dtype(anchor.dtype)
    num_views, num_rows = views.shape[0], _rows(anchor, row_start, num_rows)
    rows = anchor.new_empty(num_views, num_rows, dtype=acc)
    cols = anchor.new_empty(num_views, num_rows if symmetric else 0, dtype=acc)
    rnorm = anchor.new_empty(num_views + 1, anchor.shape[0], dtype=torch.float32)
    return (anchor.new_empty(()), rows, cols, torch.empty_like(rows), torch.empty_like(cols),
            rnorm)


@torch.library.custom_op("mvcl_fast::multiview_infonce_backward", mutates_args=())
def _multiview_infonce_backward(grad_loss: Tensor, anchor: Tensor, views: Tensor, tau: float,
                                symmetric: bool, lse_rows: Tensor, lse_cols: Tensor,
                                row_terms: Tensor, col_terms: Tensor, rnorm: Tensor,
                                row_start: int) -> tuple[Tensor, Tensor]:
    if use_triton("multiview_infonce", anchor):
        return kernel_module(KERNELS).multiview_infonce_backward(
            grad_loss, anchor, views, tau, symmetric, lse_rows, lse_cols, row_terms, col_terms,
            rnorm, row_start)

    def loss_of(a, k):
        return reference.multiview_infonce_terms(a, k, tau, symmetric, row_start,
                                                 lse_rows.shape[1])[0].mean().to(a.dtype)

    grad_anchor, grad_views = reference_vjp(loss_of, (anchor, views), grad_loss)
    return grad_anchor.contiguous(), grad_views.contiguous()


@_multiview_infonce_backward.register_fake
def _(grad_loss, anchor, views, tau, symmetric, lse_rows, lse_cols, row_terms, col_terms, rnorm,
      row_start):
    # Gradients come back contiguous whatever the inputs' strides.
    return anchor.new_empty(anchor.shape), views.new_empty(views.shape)


def _setup(ctx, inputs, output):
    anchor, views, tau, symmetric, row_start, _ = inputs
    ctx.save_for_backward(anchor, views, *output[1:])
    ctx.tau, ctx.symmetric, ctx.row_start = tau, symmetric, row_start
    ctx.set_materialize_grads(False)   # the statistics' gradients are never read


def _grad(ctx, grad_loss, *grad_stats):
    if grad_loss is None:
        return no_gradients(ctx)
    anchor, views, *stats = ctx.saved_tensors
    grad_anchor, grad_views = _multiview_infonce_backward(
        grad_loss, anchor, views, ctx.tau, ctx.symmetric, *stats, ctx.row_start)
    return grad_anchor, grad_views, None, None, None, None


_multiview_infonce.register_autograd(_grad, setup_context=_setup)


def _gather_rows(x: Tensor, group, dim: int) -> Tensor:
    """All-gather x along dim from every rank of group; gradients flow back to the owner."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous(), group=group), dim=dim)


def _loss_placeholder(fail, anchor=None, *args, **kwargs):
    return fail((), anchor)


@checks.argument_errors_when_run(_loss_placeholder)
def multiview_infonce(anchor: Tensor, views: Union[Tensor, Sequence[Tensor]], tau: float = 0.1,
                      symmetric: bool = False, *, validate: Optional[bool] = None,
                      group=None) -> Tensor:
    """Multi-view InfoNCE with in-batch negatives.

    anchor [N, D]; views [V, N, D] or a list of V tensors [N, D]. For each view
    v the loss is CE(norm(anchor) norm(views_v)^T / tau, arange(N)); the result
    is the mean over views. symmetric=True averages each view's term with the
    view-to-anchor direction. On the kernel path the N x N logits are never
    materialised (memory O(N D)). Returns a scalar in anchor's dtype.

    With ``group`` (a torch.distributed process group; every rank must hold
    the same N, e.g. a DistributedSampler, which pads the data set to a
    multiple of the world size) the negatives come from every rank: anchor
    and views are all-gathered (differentiably: gradients flow back to the
    rank that owns the rows) and each rank computes the terms of its own N
    rows against all R*N keys, O(N * R N) work instead of the (R N)^2 of the
    whole global loss. Each rank returns the mean over its own rows; as with
    the CE loss under DDP, the mean over ranks is the global-batch loss, and
    DDP's gradient averaging gives the global-batch gradient (each rank's
    input gradient divided by the world size is the global one).
    ``validate``: NaN/Inf checks as in ``prototype_infonce`` (None: CPU tensors only).
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
    tau = checks.check_tau(tau, anchor.dtype)
    if checks.wants_value_checks(validate, anchor, views):
        checks.check_values(["anchor", "views"], [anchor, views], group=group)
    row_start, num_rows = 0, anchor.shape[0]
    if group is not None:
        import torch.distributed as dist

        row_start = dist.get_rank(group) * num_rows
        anchor, views = _gather_rows(anchor, group, 0), _gather_rows(views, group, 1)
    loss = _multiview_infonce(anchor, views, tau, bool(symmetric), row_start, num_rows)[0]
    return loss.to(anchor.dtype)
