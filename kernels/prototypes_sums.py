"""Scatter-mean kernels (docs/design.md, op 1; mvcl_fast.kernels.prototypes describes the design): the
class sums as a one-hot GEMM, the in-order reduction of row splits, and the backward
dz_i = dP_{y_i} / count_{y_i}."""
from __future__ import annotations

import triton
import triton.language as tl

from mvcl_fast.kernels.prototypes_tiles import _labels, _row_offsets


@triton.jit
def _class_sums_block(z_ptr, y_ptr, cls, cols, first_tile, end_tile, R, N, D, stride_zv,
                      stride_zn, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(S^T [cols, cls] fp32, counts [cls] int32) over the row tiles [first, end):
    z^T @ onehot(y) on the tensor cores, the counts from the same one-hot tiles."""
    acc = tl.zeros([BLOCK_D, BLOCK_C], dtype=tl.float32)
    counts = tl.zeros([BLOCK_C], dtype=tl.int32)
    for tile in range(first_tile, end_tile):
        rows, row_ok, n, z_off = _row_offsets(tile, R, N, stride_zv, stride_zn, BLOCK_M)
        labels = tl.load(y_ptr + n, mask=row_ok, other=-1)
        hit = (labels[:, None] == cls[None, :]) & row_ok[:, None]
        z = tl.load(z_ptr + z_off[:, None] + cols[None, :],
                    mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)
        if MODE == 0:  # the one-hot is exact in tf32: split z alone, z = hi + lo (two MMAs)
            z_hi = (z.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            onehot = hit.to(tl.float32)
            acc = tl.dot(tl.trans(z_hi), onehot, acc, input_precision="tf32")
            acc = tl.dot(tl.trans(z - z_hi), onehot, acc, input_precision="tf32")
        elif MODE == 2:
            acc = tl.dot(tl.trans(z.to(tl.float32)), hit.to(tl.float32), acc)
        else:
            acc = tl.dot(tl.trans(z), hit.to(z.dtype), acc)
        counts += tl.sum(hit.to(tl.int32), axis=0)
    return acc, counts


@triton.jit
def _class_sums_kernel(z_ptr, y_ptr, out_ptr, counts_ptr, R, N, D, C, stride_zv, stride_zn,
                       num_splits, MEAN: tl.constexpr, FINAL: tl.constexpr, MODE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """S^T chunk = z^T @ onehot(y) over the row tiles of one split (a contiguous range);
    counts from the one-hot.

    FINAL: writes the result (MEAN: S / count in out's dtype, else fp32 sums) and int64
    counts; otherwise this split's fp32 partial sums and counts, reduced in order later.
    """
    pid = tl.program_id(0)
    d_chunks = tl.cdiv(D, BLOCK_D)
    class_tiles = tl.cdiv(C, BLOCK_C)
    cols = (pid % d_chunks) * BLOCK_D + tl.arange(0, BLOCK_D)
    cls = ((pid // d_chunks) % class_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = pid // (d_chunks * class_tiles)
    row_tiles = tl.cdiv(R, BLOCK_M)
    per_split = tl.cdiv(row_tiles, num_splits)
    acc, counts = _class_sums_block(z_ptr, y_ptr, cls, cols, split * per_split,
                                    tl.minimum((split + 1) * per_split, row_tiles), R, N, D,
                                    stride_zv, stride_zn, MODE, BLOCK_M, BLOCK_C, BLOCK_D)
    cls_ok = cls < C
    ok = (cols < D)[:, None] & cls_ok[None, :]
    if FINAL:
        offs = cls.to(tl.int64)[None, :] * D + cols[:, None]
        if MEAN:
            acc = acc / tl.maximum(counts, 1).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
        if pid % d_chunks == 0:
            tl.store(counts_ptr + cls, counts.to(tl.int64), mask=cls_ok)
    else:
        offs = (split.to(tl.int64) * C + cls)[None, :] * D + cols[:, None]
        tl.store(out_ptr + offs, acc, mask=ok)
        if pid % d_chunks == 0:
            tl.store(counts_ptr + split * C + cls, counts, mask=cls_ok)


@triton.jit
def _class_sums_reduce_kernel(part_ptr, part_counts_ptr, out_ptr, counts_ptr, C, D, num_splits,
                              MEAN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adds the splits' partial sums and counts in split order; MEAN divides."""
    pid = tl.program_id(0)
    d_chunks = tl.cdiv(D, BLOCK_D)
    cols = (pid % d_chunks) * BLOCK_D + tl.arange(0, BLOCK_D)
    cls = (pid // d_chunks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cls_ok = cls < C
    ok = cls_ok[:, None] & (cols < D)[None, :]
    offs = cls.to(tl.int64)[:, None] * D + cols[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    counts = tl.zeros([BLOCK_C], dtype=tl.int32)
    for split in range(0, num_splits):
        acc += tl.load(part_ptr + split * C * D + offs, mask=ok, other=0.0)
        counts += tl.load(part_counts_ptr + split * C + cls, mask=cls_ok, other=0)
    if MEAN:
        acc = acc / tl.maximum(counts, 1).to(tl.float32)[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
    if pid % d_chunks == 0:
        tl.store(counts_ptr + cls, counts.to(tl.int64), mask=cls_ok)


@triton.jit
def _gather_mean_grad_kernel(grad_ptr, y_ptr, counts_ptr, dz_ptr, N, D, C, stride_gc,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz_i = dP_{y_i} / max(count_{y_i}, 1); 0 for a row whose label is out of range."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    labels, valid = _labels(y_ptr, rows, rows < N, C)
    ok = valid[:, None] & (cols < D)[None, :]
    scale = 1.0 / tl.maximum(tl.load(counts_ptr + labels, mask=valid, other=1), 1).to(tl.float32)
    grad = tl.load(grad_ptr + labels.to(tl.int64)[:, None] * stride_gc + cols[None, :], mask=ok,
                   other=0.0).to(tl.float32)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
             (grad * scale[:, None]).to(dz_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & (cols < D)[None, :])
