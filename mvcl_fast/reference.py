"""Pure-PyTorch reference implementations of the four ops.

These functions are the specification (docs/design.md, "The ops"): the
Triton kernels are tested against them, usually evaluated in float64. They are
written for clarity and exactness, not speed. Half-precision inputs are
computed in float32 and the result is cast back to the input dtype, which is
what the kernels do as well.

No input validation happens here: the public functions in ``mvcl_fast.ops``
validate and then dispatch either to these functions or to the kernels.
"""
from __future__ import annotations

import math

import torch

NORM_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half inputs, otherwise the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) along the last dim (as F.normalize)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def batch_prototypes(z: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Per-class mean of z [N, D] by label y [N].

    Returns (prototypes [C, D] in z's dtype, counts [C] int64). An absent class
    has count 0 and prototype 0.
    """
    acc = compute_dtype(z.dtype)
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, z.shape[1], dtype=acc, device=z.device)
    sums = sums.index_add(0, y, z.to(acc))
    prototypes = sums / counts.clamp_min(1).unsqueeze(1).to(acc)
    return prototypes.to(z.dtype), counts


def prototype_logits_loss(z, y, prototypes, class_mask, tau: float):
    """Mean over views and rows of lse_i - L_{i, y_i}, L = norm(z) norm(P)^T / tau.

    z [V, N, D], y [N], prototypes [C, D], class_mask [C] bool or None (None:
    every class is a candidate). Returns (loss scalar, lse [V, N]) in the
    accumulation dtype.
    """
    acc = compute_dtype(z.dtype)
    logits = l2_normalize(z.to(acc)) @ l2_normalize(prototypes.to(acc)).T / tau
    if class_mask is not None:
        logits = logits.masked_fill(~class_mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, y.expand(z.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return (lse - target).mean(), lse


def prototype_infonce(z, y, num_classes: int, tau: float = 0.1, prototypes=None,
                      detach_prototypes: bool = False):
    """Prototype InfoNCE (docs/design.md, op 2).

    z [N, D] or views [V, N, D] sharing labels y [N]. With prototypes=None the
    prototypes are the batch prototypes of all V*N rows and absent classes are
    masked out of the softmax; explicit prototypes [C, D] make every class a
    candidate. The loss is the mean over views and rows, in z's dtype.
    """
    views = z if z.dim() == 3 else z.unsqueeze(0)
    if prototypes is None:
        flat = views.reshape(-1, views.shape[-1])
        prototypes, counts = batch_prototypes(flat, y.repeat(views.shape[0]), num_classes)
        class_mask = counts > 0
    else:
        class_mask = None
    if detach_prototypes:
        prototypes = prototypes.detach()
    loss, _ = prototype_logits_loss(views, y, prototypes, class_mask, tau)
    return loss.to(z.dtype)


def multiview_infonce_terms(anchor, views, tau: float, symmetric: bool, row_start: int = 0,
                            num_rows=None):
    """Per-view InfoNCE terms [V] and the per-row statistics behind them.

    S_v = norm(anchor) norm(views_v)^T / tau; the positive of row i is column i.
    Only the rows i in [row_start, row_start + M) (M = num_rows, default all N)
    enter the terms, each against all N columns: a DDP rank's share when
    anchor and views hold the gathered global batch. Returns (terms [V],
    lse_rows [V, M], lse_cols, row_terms [V, M] = lse_rows - S_ii, col_terms):
    the column ones are over the same rows of S_v^T, [V, 0] unless symmetric.
    """
    acc = compute_dtype(anchor.dtype)
    n = anchor.shape[0]
    num_rows = n - row_start if num_rows is None else num_rows
    rows = slice(row_start, row_start + num_rows)
    a = l2_normalize(anchor.to(acc))
    k = l2_normalize(views.to(acc))
    logits = torch.einsum("nd,vmd->vnm", a[rows], k) / tau                  # [V, M, N]
    positive = torch.diagonal(logits, offset=row_start, dim1=1, dim2=2)     # S_v[i, i]
    lse_rows = torch.logsumexp(logits, dim=2)
    row_terms = lse_rows - positive
    terms = row_terms.mean(dim=1)
    if symmetric:
        if num_rows == n:   # the columns of the same logits
            lse_cols = torch.logsumexp(logits, dim=1)
        else:
            lse_cols = torch.logsumexp(torch.einsum("vmd,nd->vmn", k[:, rows], a) / tau, dim=2)
        col_terms = lse_cols - positive
        terms = 0.5 * (terms + col_terms.mean(dim=1))
    else:
        lse_cols, col_terms = (lse_rows.new_empty(views.shape[0], 0) for _ in range(2))
    return terms, lse_rows, lse_cols, row_terms, col_terms


def multiview_infonce(anchor, views, tau: float = 0.1, symmetric: bool = False):
    """Multi-view InfoNCE (docs/design.md, op 3): mean over views of CE(S_v, arange(N)).

    anchor [N, D], views [V, N, D]. symmetric=True averages each view's term
    with the view-to-anchor direction CE(S_v^T, arange(N)).
    """
    terms = multiview_infonce_terms(anchor, views, tau, symmetric)[0]
    return terms.mean().to(anchor.dtype)


def daf_attention_parts(q, k, v, key_padding_mask, num_heads: int):
    """Multi-head attention of DAF without the gate: (attn [B, Lq, D], lse [B, H, Lq]).

    Scaled dot product per head (head_dim = D / num_heads), padded keys
    (mask True) excluded. A query whose keys are all padded gets attention 0
    and lse -inf.
    """
    acc = compute_dtype(q.dtype)
    batch, len_q, dim = q.shape
    len_k = k.shape[1]
    head_dim = dim // num_heads

    def heads(x, length):
        return x.to(acc).reshape(batch, length, num_heads, head_dim).transpose(1, 2)

    scores = heads(q, len_q) @ heads(k, len_k).transpose(-1, -2) / math.sqrt(head_dim)
    if key_padding_mask is None:
        key_padding_mask = torch.zeros(batch, len_k, dtype=torch.bool, device=q.device)
    padded = key_padding_mask[:, None, None, :]
    # A fully padded row would give softmax(-inf, ..., -inf) = NaN (and NaN
    # gradients): such rows are softmaxed unmasked, then zeroed.
    no_keys = padded.all(dim=-1, keepdim=True)
    scores = scores.masked_fill(padded & ~no_keys, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).masked_fill(no_keys, 0.0)
    attn = (probs @ heads(v, len_k)).transpose(1, 2).reshape(batch, len_q, dim)
    return attn, lse.masked_fill(no_keys.squeeze(-1), float("-inf"))


def daf_attention(q, k, v, gate, residual, num_heads: int, key_padding_mask=None):
    """DAF attention (docs/design.md, op 4): residual + sigmoid(gate) * MHA(q, k, v).

    q, gate, residual [B, Lq, D]; k, v [B, Lk, D]; key_padding_mask [B, Lk]
    bool, True = padded key. Returns [B, Lq, D] in q's dtype.
    """
    acc = compute_dtype(q.dtype)
    attn, _ = daf_attention_parts(q, k, v, key_padding_mask, num_heads)
    out = residual.to(acc) + torch.sigmoid(gate.to(acc)) * attn
    return out.to(q.dtype)
