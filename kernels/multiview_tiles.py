"""The @triton.jit helpers of the multi-view InfoNCE kernels (mvcl_fast.kernels.multiview_infonce
describes the design): aligned row addressing, the rotated key order, chunked row dot
products, accurate log1p / expm1, and the chain through the L2 normalisation."""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _row_starts(base, rows, stride_row):
    """[R, 1] pointers to the starts of rows (int64 offsets).

    The launcher promises 16-byte aligned row starts (see _padded_rows); the
    hint lets every compile, JIT or ahead-of-time, vectorise the row loads.
    """
    return tl.multiple_of(base + rows.to(tl.int64)[:, None] * stride_row, [16, 16])


@triton.jit
def _within(offs, D):
    """[1, B] mask offs < D (D a multiple of 16, padded by the launcher)."""
    return offs[None, :] < D


@triton.jit
def _rotated_rows(cols, row_start, N):
    """Row indices of rotated columns: row_start + cols, wrapped past N, clamped to N - 1.

    Visiting keys from row_start on puts the positive of query row
    row_start + i at rotated column i: a plain tile diagonal, which the
    compiler keeps cheap (an offset compare costs twice the registers).
    """
    return tl.minimum(cols + row_start - tl.where(cols >= N - row_start, N, 0), N - 1)


@triton.jit
def _log1p(x):
    """log(1 + x) to a few ulps for x >= 0 (Goldberg's trick; no libdevice)."""
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _row_dots(q_first, k_first, q_rows, k_rows, D, BLOCK_D: tl.constexpr, D_CHUNKED: tl.constexpr,
              OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] dot products of q rows with k rows over all of D.

    q_first / k_first are the rows' first D-chunks, already loaded; q_rows /
    k_rows point at the row starts ([BLOCK_M, 1] / [BLOCK_N, 1]).
    """
    dots = tl.dot(q_first, tl.trans(k_first), input_precision=PRECISION)
    if D_CHUNKED:
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(BLOCK_D, D, BLOCK_D):
            in_d = _within(d0 + offs_d, D)
            q = tl.load(q_rows + d0 + offs_d[None, :], mask=in_d, other=0.0).to(OPERAND)
            k = tl.load(k_rows + d0 + offs_d[None, :], mask=in_d, other=0.0).to(OPERAND)
            dots = tl.dot(q, tl.trans(k), dots, input_precision=PRECISION)
    return dots


@triton.jit
def _expm1(x):
    """exp(x) - 1 to a few ulps (Kahan's trick, the twin of _log1p; no libdevice)."""
    u = tl.exp(x)
    exact = u == 1.0
    ratio = (u - 1.0) * (x / tl.log(tl.where(exact, 2.0, u)))
    return tl.where(exact, x, tl.where(u == 0.0, -1.0, ratio))


@triton.jit
def _store_row_grad(acc, offs, own_rows, own_rnorm, radial, acc_scale, out_base, rows, valid, D):
    """The chain through the L2 normalisation for the columns offs of the own rows:
    dx = (g - x_hat (x_hat . g)) / max(||x||, eps) with g = acc * acc_scale."""
    in_d = _within(offs, D)
    own = tl.load(own_rows + offs[None, :], mask=in_d, other=0.0).to(tl.float32)
    grad = (acc * acc_scale - own * (own_rnorm * radial)[:, None]) * own_rnorm[:, None]
    out = _row_starts(out_base, rows, D) + offs[None, :]
    tl.store(out, grad.to(out_base.dtype.element_ty), mask=valid[:, None] & in_d)
