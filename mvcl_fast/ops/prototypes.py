"""batch_prototypes and prototype_infonce as torch custom ops.

Two custom ops with registered autograd, each backed by a backward op:

- ``mvcl_fast::batch_prototypes`` (z, y) -> (prototypes, counts): the
  scatter-mean; backward dz_i = dP_{y_i} / count_{y_i}.
- ``mvcl_fast::prototype_infonce_loss`` (z [V, N, D], y, prototypes, class_mask)
  -> (loss, lse): the fused normalise + logits + masked log-sum-exp + loss;
  backward returns the gradient to z and to the prototypes.

``prototype_infonce`` composes them, so with prototypes=None the gradient
reaches z both directly and through the prototypes, by the chain rule.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mvcl_fast import checks, reference
from mvcl_fast.backend import kernel_module, use_triton
from mvcl_fast.ops.common import reference_vjp

KERNELS = "prototypes"


# ---------------------------------------------------------------- scatter-mean
@torch.library.custom_op("mvcl_fast::batch_prototypes", mutates_args=())
def _batch_prototypes(z: Tensor, y: Tensor, num_classes: int,
                      deterministic: bool) -> tuple[Tensor, Tensor]:
    checks.check_label_range("y", y, num_classes)
    if use_triton("batch_prototypes", z):
        return kernel_module(KERNELS).batch_prototypes_forward(z, y, num_classes, deterministic)
    return reference.batch_prototypes(z, y, num_classes)


@_batch_prototypes.register_fake
def _(z, y, num_classes, deterministic):
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
    _, y, _, _ = inputs
    _, counts = output
    ctx.save_for_backward(y, counts)


def _batch_prototypes_grad(ctx, grad_prototypes, grad_counts):
    y, counts = ctx.saved_tensors
    return _batch_prototypes_backward(grad_prototypes.contiguous(), y, counts), None, None, None


_batch_prototypes.register_autograd(_batch_prototypes_grad, setup_context=_batch_prototypes_setup)


# ------------------------------------------------------------- fused InfoNCE
@torch.library.custom_op("mvcl_fast::prototype_infonce_loss", mutates_args=())
def _prototype_infonce_loss(z: Tensor, y: Tensor, prototypes: Tensor,
                            class_mask: Optional[Tensor], tau: float) -> tuple[Tensor, Tensor]:
    checks.check_label_range("y", y, prototypes.shape[0])
    if use_triton("prototype_infonce", z):
        return kernel_module(KERNELS).prototype_infonce_forward(z, y, prototypes, class_mask, tau)
    loss, lse = reference.prototype_logits_loss(z, y, prototypes, class_mask, tau)
    return loss, lse


@_prototype_infonce_loss.register_fake
def _(z, y, prototypes, class_mask, tau):
    acc = reference.compute_dtype(z.dtype)
    return z.new_empty((), dtype=acc), z.new_empty(z.shape[0], z.shape[1], dtype=acc)


@torch.library.custom_op("mvcl_fast::prototype_infonce_loss_backward", mutates_args=())
def _prototype_infonce_loss_backward(grad_loss: Tensor, z: Tensor, y: Tensor, prototypes: Tensor,
                                     class_mask: Optional[Tensor], tau: float,
                                     lse: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton("prototype_infonce", z):
        return kernel_module(KERNELS).prototype_infonce_backward(
            grad_loss, z, y, prototypes, class_mask, tau, lse)

    def loss_of(z_, p_):
        return reference.prototype_logits_loss(z_, y, p_, class_mask, tau)[0]

    grad_z, grad_p = reference_vjp(loss_of, (z, prototypes), grad_loss)
    return grad_z.contiguous(), grad_p.contiguous()


@_prototype_infonce_loss_backward.register_fake
def _(grad_loss, z, y, prototypes, class_mask, tau, lse):
    # Gradients come back contiguous whatever the inputs' strides.
    return z.new_empty(z.shape), prototypes.new_empty(prototypes.shape)


def _prototype_infonce_setup(ctx, inputs, output):
    z, y, prototypes, class_mask, tau = inputs
    _, lse = output
    ctx.save_for_backward(z, y, prototypes, class_mask, lse)
    ctx.tau = tau


def _prototype_infonce_grad(ctx, grad_loss, grad_lse):
    z, y, prototypes, class_mask, lse = ctx.saved_tensors
    grad_z, grad_p = _prototype_infonce_loss_backward(
        grad_loss, z, y, prototypes, class_mask, ctx.tau, lse)
    return grad_z, None, grad_p, None, None


_prototype_infonce_loss.register_autograd(_prototype_infonce_grad,
                                          setup_context=_prototype_infonce_setup)


# ------------------------------------------------------------------ public API
def _deterministic(flag: bool) -> bool:
    return bool(flag) or torch.are_deterministic_algorithms_enabled()


def _prototypes(z: Tensor, y: Tensor, num_classes: int, deterministic: bool, group):
    """Batch prototypes, of the global batch when group is a process group.

    Under DDP the scatter-mean is reduce-friendly: each rank turns its
    prototypes back into per-class sums, and two all-reduces (C x D sums, C
    counts) give every rank the global means. The differentiable all-reduce
    sums dP over ranks in backward, so each rank's rows get the gradient of
    every rank's loss through the shared prototypes.
    """
    prototypes, counts = _batch_prototypes(z, y, num_classes, _deterministic(deterministic))
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


def batch_prototypes(z: Tensor, y: Tensor, num_classes: int, *, deterministic: bool = False,
                     check_finite: Optional[bool] = None, group=None):
    """Class prototypes of a batch: the mean of z [N, D] over each label of y [N].

    Returns (prototypes [C, D] in z's dtype, counts [C] int64). An absent class
    has count 0 and prototype 0 (never NaN). Differentiable in z. On CUDA the
    fused Triton scatter-mean runs; ``deterministic=True`` (or
    ``torch.use_deterministic_algorithms(True)``) picks its atomics-free variant.
    With ``group`` (a torch.distributed process group, e.g.
    ``torch.distributed.group.WORLD``) sums and counts are all-reduced: every
    rank gets the prototypes and counts of the global batch.
    """
    checks.check_tensor("z", z, 2)
    checks.check_nonempty("z", z)
    num_classes = checks.check_positive_int("num_classes", num_classes)
    checks.check_labels("y", y, z.shape[0], num_classes, z.device)
    if checks.wants_finite_check(check_finite, z):
        checks.check_finite_values(["z"], [z], group)
    return _prototypes(z, y.long(), num_classes, deterministic, group)


def prototype_infonce(z: Tensor, y: Tensor, num_classes: int, tau: float = 0.1,
                      prototypes: Optional[Tensor] = None, detach_prototypes: bool = False, *,
                      deterministic: bool = False, check_finite: Optional[bool] = None,
                      group=None) -> Tensor:
    """Prototype InfoNCE: cross-entropy of each row against the class prototypes.

    z: [N, D], or [V, N, D] views sharing labels y [N] (the loss is then the
    mean over views). prototypes=None uses the batch prototypes of all rows
    (gradient flows through them unless detach_prototypes) and masks absent
    classes out of the softmax; explicit prototypes [C, D] (an EMA bank, say)
    make every class a candidate. Logits are norm(z) norm(P)^T / tau.
    Returns a scalar in z's dtype (fp16/bf16 accumulate in fp32).
    With ``group`` (DDP) the batch prototypes and the absent-class mask are
    those of the global batch; the loss is the mean over this rank's rows.
    """
    checks.check_tensor("z", z, (2, 3))
    checks.check_nonempty("z", z)
    num_classes = checks.check_positive_int("num_classes", num_classes)
    tau = checks.check_tau(tau)
    views = z if z.dim() == 3 else z.unsqueeze(0)
    checks.check_labels("y", y, views.shape[1], num_classes, z.device)
    if prototypes is not None:
        checks.check_tensor("prototypes", prototypes, 2)
        checks.check_shape("prototypes", prototypes, (num_classes, views.shape[2]))
        checks.check_same(["z", "prototypes"], [z, prototypes])
    if checks.wants_finite_check(check_finite, z, prototypes):
        checks.check_finite_values(["z", "prototypes"], [z, prototypes], group)
    y = y.long()
    if prototypes is None:
        flat = views.reshape(-1, views.shape[2])
        prototypes, counts = _prototypes(flat, y.repeat(views.shape[0]), num_classes,
                                         deterministic, group)
        class_mask = counts > 0
    else:
        class_mask = None
    if detach_prototypes:
        prototypes = prototypes.detach()
    loss, _ = _prototype_infonce_loss(views, y, prototypes, class_mask, tau)
    return loss.to(z.dtype)
