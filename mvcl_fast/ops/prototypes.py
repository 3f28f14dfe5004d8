"""batch_prototypes and prototype_infonce as torch custom ops.

- ``mvcl_fast::batch_prototypes`` (z, y) -> (prototypes, counts): the scatter-mean;
  backward dz_i = dP_{y_i} / count_{y_i}.
- ``mvcl_fast::prototype_infonce`` (z [V, N, D], y, prototypes or None, counts or
  None) -> (loss, saved statistics): the whole loss in one op, the batch prototypes
  included, so autograd adds no zero-fills, casts or adds around it (the statistics
  are outputs nobody differentiates: ``set_materialize_grads(False)``). Its backward
  op returns dz (through the batch prototypes too) and, for explicit prototypes, dP.

On the kernel path the forward computes the loss's gradient reaching the
prototypes for grad 1 (``need_ds``, decided at the public entry from what needs a
gradient), so the backward is one pass over the rows (kernels/prototypes.py).
On the reference path the forward is the reference and the backward recomputes
it under autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mvcl_fast import checks, reference
from mvcl_fast.backend import kernel_module, use_triton
from mvcl_fast.ops.common import no_gradients, reference_vjp

KERNELS = "prototypes"


def _empty(like: Tensor, dtype=torch.float32) -> Tensor:
    return like.new_empty(0, dtype=dtype)


# ---------------------------------------------------------------- scatter-mean
@torch.library.custom_op("mvcl_fast::batch_prototypes", mutates_args=())
def _batch_prototypes(z: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    if use_triton("batch_prototypes", z):
        return kernel_module(KERNELS).batch_prototypes_forward(z, y, num_classes)
    checks.check_values([], [], ("y", y, num_classes))  # the reference would index out of range
    return reference.batch_prototypes(z, y, num_classes)


@_batch_prototypes.register_fake
def _(z, y, num_classes):
    return (z.new_empty(num_classes, z.shape[1]),
            z.new_empty(num_classes, dtype=torch.int64))


@torch.library.custom_op("mvcl_fast::batch_prototypes_backward", mutates_args=())
def _batch_prototypes_backward(grad_prototypes: Tensor, y: Tensor, counts: Tensor) -> Tensor:
    if use_triton("batch_prototypes", grad_prototypes):
        return kernel_module(KERNELS).batch_prototypes_backward(grad_prototypes, y, counts)
    acc = reference.compute_dtype(grad_prototypes.dtype)
    scale = counts.clamp_min(1).to(acc).reciprocal()
    return (grad_prototypes.to(acc)[y] * scale[y].unsqueeze(1)).to(grad_prototypes.dtype)


@_batch_prototypes_backward.register_fake
def _(grad_prototypes, y, counts):
    return grad_prototypes.new_empty(y.shape[0], grad_prototypes.shape[1])


def _batch_prototypes_setup(ctx, inputs, output):
    _, y, _ = inputs
    _, counts = output
    ctx.mark_non_differentiable(counts)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, counts)


def _batch_prototypes_grad(ctx, grad_prototypes, grad_counts):
    if grad_prototypes is None:
        return no_gradients(ctx)
    y, counts = ctx.saved_tensors
    return _batch_prototypes_backward(grad_prototypes.contiguous(), y, counts), None, None


_batch_prototypes.register_autograd(_batch_prototypes_grad, setup_context=_batch_prototypes_setup)


# ------------------------------------------------------------- fused InfoNCE
@torch.library.custom_op("mvcl_fast::prototype_infonce", mutates_args=())
def _prototype_infonce(z: Tensor, y: Tensor, prototypes: Optional[Tensor],
                       counts: Optional[Tensor], num_classes: int, tau: float, through: bool,
                       need_ds: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss in z.dtype, lse [V, N], class sums, counts, dS_unit, staged statistics); the last
    four empty when unused.

    prototypes None: the batch prototypes of z (their class sums; through: the gradient
    flows through them). counts (with prototypes): absent classes are masked out. The staged
    statistics are the kernels' class split's (the logits, for the backward to read).
    """
    if use_triton("prototype_infonce", z):
        loss, lse, s, out_counts, ds, stats = kernel_module(KERNELS).prototype_infonce_forward(
            z, y, prototypes, counts, num_classes, tau, need_ds)
        if prototypes is not None:  # outputs may not alias inputs: the backward reads the inputs
            s, out_counts = _empty(z), _empty(z, torch.int64)
        return loss, lse, s, out_counts, ds, stats
    checks.check_values([], [], ("y", y, num_classes))  # the reference would index out of range
    batch = prototypes is None
    if batch:
        flat = z.reshape(-1, z.shape[-1])
        prototypes, batch_counts = reference.batch_prototypes(flat, y.repeat(z.shape[0]),
                                                              num_classes)
        class_mask = batch_counts > 0
    else:
        class_mask = None if counts is None else counts > 0
    loss, lse = reference.prototype_logits_loss(z, y, prototypes, class_mask, tau)
    # The statistics the kernel path saves, in its shapes (zeros: the reference's backward
    # recomputes instead of reading them).
    sums, out_counts, ds, stats = _statistics(z, batch, num_classes, need_ds, z.new_zeros)
    return loss.to(z.dtype), lse, sums, out_counts, ds, stats


def _statistics(z, batch, num_classes, need_ds, new):
    """(class sums [C, D] fp32, counts [C], dS_unit [C, D] fp32, staged statistics fp32), empty
    where the path has none. Only the kernels' class split stages (the reference recomputes)."""
    dim = z.shape[-1]
    sums = new((num_classes, dim) if batch else 0, dtype=torch.float32)
    out_counts = new(num_classes if batch else 0, dtype=torch.int64)
    ds = new((num_classes, dim) if need_ds else 0, dtype=torch.float32)
    staged = (kernel_module(KERNELS).staged_size(z.shape[0] * z.shape[1], num_classes)
              if use_triton("prototype_infonce", z) else 0)
    return sums, out_counts, ds, new(staged, dtype=torch.float32)


@_prototype_infonce.register_fake
def _(z, y, prototypes, counts, num_classes, tau, through, need_ds):
    acc = reference.compute_dtype(z.dtype)
    statistics = _statistics(z, prototypes is None, num_classes, need_ds, z.new_empty)
    return z.new_empty(()), z.new_empty(z.shape[:2], dtype=acc), *statistics


@torch.library.custom_op("mvcl_fast::prototype_infonce_backward", mutates_args=())
def _prototype_infonce_backward(grad_loss: Tensor, z: Tensor, y: Tensor,
                                prototypes: Optional[Tensor], counts: Optional[Tensor],
                                sums: Tensor, out_counts: Tensor, lse: Tensor, ds: Tensor,
                                stats: Tensor, num_classes: int, tau: float, through: bool,
                                need_dp: bool) -> tuple[Tensor, Tensor]:
    """(dz, dP) of the fused op; dP is empty unless need_dp (explicit prototypes)."""
    if use_triton("prototype_infonce", z):
        batch = prototypes is None
        s = sums if batch else prototypes
        class_counts = out_counts if batch else (_empty(z, torch.int64) if counts is None
                                                 else counts)
        return kernel_module(KERNELS).prototype_infonce_backward(
            grad_loss, z, y, s, class_counts, lse, ds, stats, tau, batch, through and batch,
            need_dp)

    def loss_of(z_, p_):
        if p_ is None:
            return reference.prototype_infonce(z_, y, num_classes, tau,
                                               detach_prototypes=not through)
        class_mask = None if counts is None else counts > 0
        return reference.prototype_logits_loss(z_, y, p_, class_mask, tau)[0]

    if prototypes is None:
        (grad_z,) = reference_vjp(lambda z_: loss_of(z_, None), (z,), grad_loss)
        return grad_z.contiguous(), _empty(z, z.dtype)
    grad_z, grad_p = reference_vjp(loss_of, (z, prototypes), grad_loss)
    return grad_z.contiguous(), grad_p.contiguous() if need_dp else _empty(z, z.dtype)


@_prototype_infonce_backward.register_fake
def _(grad_loss, z, y, prototypes, counts, sums, out_counts, lse, ds, stats, num_classes, tau,
      through, need_dp):
    # Gradients come back contiguous whatever the inputs' strides.
    dp = prototypes.new_empty(prototypes.shape) if need_dp else _empty(z, z.dtype)
    return z.new_empty(z.shape), dp


def _prototype_infonce_setup(ctx, inputs, output):
    z, y, prototypes, counts, num_classes, tau, through, need_ds = inputs
    _, lse, sums, out_counts, ds, stats = output
    ctx.mark_non_differentiable(lse, sums, out_counts, ds, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, y, prototypes, counts, sums, out_counts, lse, ds, stats)
    ctx.num_classes, ctx.tau, ctx.through, ctx.need_ds = num_classes, tau, through, need_ds


def _prototype_infonce_grad(ctx, grad_loss, *unused):
    if grad_loss is None:
        return no_gradients(ctx)
    z, y, prototypes, counts, sums, out_counts, lse, ds, stats = ctx.saved_tensors
    need_dp = prototypes is not None and ctx.needs_input_grad[2]
    if need_dp and not ctx.need_ds:
        raise RuntimeError("prototype_infonce: the prototypes need a gradient but the forward was "
                           "called with need_ds=False")
    if prototypes is None and ctx.through and not ctx.need_ds:
        raise RuntimeError("prototype_infonce: the gradient flows through the batch prototypes "
                           "(through=True) but the forward was called with need_ds=False")
    grad_z, grad_p = _prototype_infonce_backward(
        grad_loss, z, y, prototypes, counts, sums, out_counts, lse, ds, stats, ctx.num_classes,
        ctx.tau, ctx.through, need_dp)
    return grad_z, None, grad_p if need_dp else None, None, None, None, None, None


_prototype_infonce.register_autograd(_prototype_infonce_grad,
                                     setup_context=_prototype_infonce_setup)


# ------------------------------------------------------------------ public API
def _prototypes(z: Tensor, y: Tensor, num_classes: int, group):
    """Batch prototypes, of the global batch when group is a process group.

    Under DDP the scatter-mean is reduce-friendly: each rank turns its
    prototypes back into per-class sums, and two all-reduces (C x D sums, C
    counts) give every rank the global means. The differentiable all-reduce
    sums dP over ranks in backward, so each rank's rows get the gradient of
    every rank's loss through the shared prototypes.
    """
    prototypes, counts = _batch_prototypes(z, y, num_classes)
    if group is None:
        return prototypes, counts
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    acc = reference.compute_dtype(z.dtype)
    sums = prototypes.to(acc) * counts.unsqueeze(1).to(acc)
    sums = dist_fn.all_reduce(sums, group=group)
    counts = counts.clone()
    dist.all_reduce(counts, group=group)
    return (sums / counts.clamp_min(1).unsqueeze(1).to(acc)).to(z.dtype), counts


def _prototypes_placeholder(fail, z=None, y=None, num_classes=1, *args, **kwargs):
    classes = num_classes if isinstance(num_classes, int) and num_classes > 0 else 1
    width = z.shape[-1] if isinstance(z, Tensor) and z.dim() else 1
    return fail((classes, width), z), fail((classes,), z, torch.int64)


def _loss_placeholder(fail, z=None, *args, **kwargs):
    return fail((), z)


@checks.argument_errors_when_run(_prototypes_placeholder)
def batch_prototypes(z: Tensor, y: Tensor, num_classes: int, *, deterministic: bool = True,
                     validate: Optional[bool] = None, group=None):
    """Class prototypes of a batch: the mean of z [N, D] over each label of y [N].

    Returns (prototypes [C, D] in z's dtype, counts [C] int64). An absent class
    has count 0 and prototype 0 (never NaN). Differentiable in z. The fused
    kernel is a one-hot GEMM with no float atomics, so results are bitwise
    reproducible (``deterministic`` is accepted for compatibility; every path is).
    ``validate``: see ``prototype_infonce``; without it a label outside
    [0, num_classes) is counted in no class. With ``group`` (a torch.distributed
    process group) sums and counts are all-reduced: every rank gets the
    prototypes and counts of the global batch.
    """
    checks.check_tensor("z", z, 2)
    checks.check_nonempty("z", z)
    num_classes = checks.check_positive_int("num_classes", num_classes)
    checks.check_labels("y", y, z.shape[0], z.device)
    if checks.wants_value_checks(validate, z):
        checks.check_values(["z"], [z], ("y", y, num_classes), group)
    return _prototypes(z, y.long(), num_classes, group)


@checks.argument_errors_when_run(_loss_placeholder)
def prototype_infonce(z: Tensor, y: Tensor, num_classes: int, tau: float = 0.1,
                      prototypes: Optional[Tensor] = None, detach_prototypes: bool = False, *,
                      deterministic: bool = True, validate: Optional[bool] = None,
                      group=None) -> Tensor:
    """Prototype InfoNCE: cross-entropy of each row against the class prototypes.

    z: [N, D], or [V, N, D] views sharing labels y [N] (the loss is then the
    mean over views). prototypes=None uses the batch prototypes of all rows
    (gradient flows through them unless detach_prototypes) and masks absent
    classes out of the softmax; explicit prototypes [C, D] (an EMA bank, say)
    make every class a candidate. Logits are norm(z) norm(P)^T / tau.
    Returns a scalar in z's dtype (fp16/bf16 accumulate in fp32).

    ``validate``: None (default) checks the values (labels in [0, num_classes),
    finite z and prototypes) for CPU tensors and not for CUDA tensors, where it
    would cost a host sync; True checks them anywhere (one sync); False never.
    Shapes, dtypes, devices and tau are always checked (free). Unchecked, a row
    whose label is out of range gets a NaN loss on the kernels (so a trainer's
    non-finite check catches it; a kernel never reads or writes out of bounds),
    and the reference path raises. Every path is
    deterministic (``deterministic`` is accepted for compatibility).
    With ``group`` (DDP) the batch prototypes and the absent-class mask are
    those of the global batch; the loss is the mean over this rank's rows.
    """
    checks.check_tensor("z", z, (2, 3))
    checks.check_nonempty("z", z)
    num_classes = checks.check_positive_int("num_classes", num_classes)
    tau = checks.check_tau(tau, z.dtype)
    views = z if z.dim() == 3 else z.unsqueeze(0)
    checks.check_labels("y", y, views.shape[1], z.device)
    if prototypes is not None:
        checks.check_tensor("prototypes", prototypes, 2)
        checks.check_shape("prototypes", prototypes, (num_classes, views.shape[2]))
        checks.check_same(["z", "prototypes"], [z, prototypes])
    if checks.wants_value_checks(validate, z):
        checks.check_values(["z", "prototypes"], [z, prototypes], ("y", y, num_classes), group)
    y = y.long()
    grad = torch.is_grad_enabled()
    counts = None
    if prototypes is None and group is not None:  # global prototypes need collectives: two ops
        prototypes, counts = _prototypes(views.reshape(-1, views.shape[2]),
                                         y.repeat(views.shape[0]), num_classes, group)
    if prototypes is not None and detach_prototypes:
        prototypes = prototypes.detach()
    if prototypes is None:
        through = not detach_prototypes
        need_ds = grad and through and z.requires_grad
    else:
        through, need_ds = False, grad and prototypes.requires_grad
    loss, *_ = _prototype_infonce(views, y, prototypes, counts, num_classes, tau, through, need_ds)
    return loss
