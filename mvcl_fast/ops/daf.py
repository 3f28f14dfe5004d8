"""daf_attention as a torch custom op.

``mvcl_fast::daf_attention`` returns the gated output plus what the
FlashAttention-style backward needs: the ungated attention output (also the
factor of dgate) and the per-head log-sum-exp of each query row.
``mvcl_fast::daf_attention_backward`` returns dq, dk, dv and dgate; the
residual's gradient is the incoming gradient itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mvcl_fast import checks, reference
from mvcl_fast.backend import kernel_module, requested_backend, use_triton
from mvcl_fast.ops.common import no_gradients, reference_vjp

KERNELS = "daf_attention"


def _use_kernels(q: Tensor, num_heads: int) -> bool:
    """The kernels take head dims up to their MAX_HEAD_DIM; auto mode sends wider heads
    to the reference, a forced triton backend lets the kernel raise its clear error."""
    if not use_triton("daf_attention", q):
        return False
    return (requested_backend() == "triton"
            or q.shape[-1] // num_heads <= kernel_module(KERNELS).MAX_HEAD_DIM)


@torch.library.custom_op("mvcl_fast::daf_attention", mutates_args=())
def _daf_attention(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, residual: Tensor,
                   key_padding_mask: Optional[Tensor],
                   num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    if _use_kernels(q, num_heads):
        return kernel_module(KERNELS).daf_attention_forward(
            q, k, v, gate, residual, key_padding_mask, num_heads)
    acc = reference.compute_dtype(q.dtype)
    attn, lse = reference.daf_attention_parts(q, k, v, key_padding_mask, num_heads)
    out = residual.to(acc) + torch.sigmoid(gate.to(acc)) * attn
    return out.to(q.dtype).contiguous(), attn.to(q.dtype).contiguous(), lse


@_daf_attention.register_fake
def _(q, k, v, gate, residual, key_padding_mask, num_heads):
    acc = reference.compute_dtype(q.dtype)
    batch, len_q, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty(batch, num_heads, len_q, dtype=acc))


@torch.library.custom_op("mvcl_fast::daf_attention_backward", mutates_args=())
def _daf_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Tensor,
                            key_padding_mask: Optional[Tensor], attn: Tensor, lse: Tensor,
                            num_heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _use_kernels(q, num_heads):
        return kernel_module(KERNELS).daf_attention_backward(
            grad_out, q, k, v, gate, key_padding_mask, attn, lse, num_heads)
    acc = reference.compute_dtype(q.dtype)

    def gated_attention(q_, k_, v_, gate_):
        attn_, _ = reference.daf_attention_parts(q_, k_, v_, key_padding_mask, num_heads)
        return torch.sigmoid(gate_.to(acc)) * attn_

    grads = reference_vjp(gated_attention, (q, k, v, gate), grad_out.to(acc))
    return tuple(g.to(q.dtype).contiguous() for g in grads)


@_daf_attention_backward.register_fake
def _(grad_out, q, k, v, gate, key_padding_mask, attn, lse, num_heads):
    # Gradients come back contiguous whatever the inputs' strides.
    return tuple(x.new_empty(x.shape) for x in (q, k, v, gate))


def _setup(ctx, inputs, output):
    q, k, v, gate, _, key_padding_mask, num_heads = inputs
    _, attn, lse = output
    ctx.save_for_backward(q, k, v, gate, key_padding_mask, attn, lse)
    ctx.num_heads = num_heads
    # attn and lse are saved for the backward, never differentiated: no zero-filled grads for them.
    ctx.set_materialize_grads(False)


def _grad(ctx, grad_out, grad_attn, grad_lse):
    if grad_out is None:  # only attn or lse reached the loss: they carry no gradient
        return no_gradients(ctx)
    q, k, v, gate, key_padding_mask, attn, lse = ctx.saved_tensors
    dq, dk, dv, dgate = _daf_attention_backward(
        grad_out.contiguous(), q, k, v, gate, key_padding_mask, attn, lse, ctx.num_heads)
    return dq, dk, dv, dgate, grad_out, None, None


_daf_attention.register_autograd(_grad, setup_context=_setup)


def _output_placeholder(fail, q=None, *args, **kwargs):
    return fail(q.shape if isinstance(q, Tensor) else (), q)


@checks.argument_errors_when_run(_output_placeholder)
def daf_attention(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, residual: Tensor,
                  num_heads: int, key_padding_mask: Optional[Tensor] = None, *,
                  validate: Optional[bool] = None) -> Tensor:
    """The attention of Dynamic Attention Fusion: residual + sigmoid(gate) * MHA(q, k, v).

    q, gate, residual [B, Lq, D]; k, v [B, Lk, D] (already projected; D split
    into num_heads heads, scale 1/sqrt(D / num_heads)); key_padding_mask
    [B, Lk] bool, True = padded key. A query whose keys are all padded gets
    attention 0 (output = residual), never NaN. Returns [B, Lq, D] in q's dtype.
    ``validate``: NaN/Inf checks as in ``prototype_infonce`` (None: CPU tensors only).
    """
    names = ["q", "k", "v", "gate", "residual"]
    tensors = [q, k, v, gate, residual]
    for name, x in zip(names, tensors):
        checks.check_tensor(name, x, 3)
    checks.check_same(names, tensors)
    checks.check_nonempty("q", q)
    checks.check_nonempty("k", k)
    batch, len_q, dim = q.shape
    len_k = k.shape[1]
    checks.check_shape("k", k, (batch, len_k, dim))
    checks.check_shape("v", v, (batch, len_k, dim))
    checks.check_shape("gate", gate, q.shape)
    checks.check_shape("residual", residual, q.shape)
    num_heads = checks.check_positive_int("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the model width D={dim}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor [B, Lk] (True = padded key)")
        checks.check_shape("key_padding_mask", key_padding_mask, (batch, len_k))
        checks.check_same(["q", "key_padding_mask"], [q, key_padding_mask], dtype=False)
    if checks.wants_value_checks(validate, *tensors):
        checks.check_values(names, tensors)
    out, _, _ = _daf_attention(q, k, v, gate, residual, key_padding_mask, num_heads)
    return out
