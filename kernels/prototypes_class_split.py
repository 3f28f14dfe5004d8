"""The prototype InfoNCE's class split (many classes; mvcl_fast.kernels.prototypes describes
the design): (row tile, class chunk) programs stage the logits with their online-softmax
partials, then (class tile, D chunk, row split) programs combine them into the lse and
accumulate dS_hat and the loss."""
from __future__ import annotations

import triton
import triton.language as tl

from mvcl_fast.kernels.prototypes_tiles import (_ds_hat_chunk, _inv_norm, _labels, _logit_grad,
                                                _online_softmax, _row_offsets, _softmax_shift,
                                                _tile_logits)
from mvcl_fast.kernels.shared import LN2, LOG2E


@triton.jit
def _staged_offsets(R, C):
    """Offsets in the class split's staged statistics: logits [R, C], then |z| [R], then inv_s [C]
    (int32 is enough: the split stages at most STAGED_LOGITS_LIMIT logits)."""
    return R * C, R * C + R


@triton.jit
def _infonce_lse_kernel(z_ptr, y_ptr, s_ptr, counts_ptr, stats_ptr, lse_part_ptr,
                        R, N, D, C, stride_zv, stride_zn, stride_sc, inv_tau, tiles_per_chunk,
                        SUMS: tl.constexpr, HAS_COUNTS: tl.constexpr, MODE: tl.constexpr,
                        HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Class split, step 1: the logits of one (row tile, class chunk), staged for the later steps.

    Writes the base-2 logits (-inf where a class does not compete) and this chunk's online
    softmax partials, lse_part[0, chunk] = max and lse_part[1, chunk] = sum of 2^(logit - max);
    chunk 0 writes the rows' norms, row tile 0 the classes' 1 / |S|.
    """
    pid = tl.program_id(0)
    class_tiles = tl.cdiv(C, BLOCK_C)
    num_chunks = tl.cdiv(class_tiles, tiles_per_chunk)
    tile = pid // num_chunks
    chunk = pid % num_chunks
    z_norm_at, inv_s_at = _staged_offsets(R, C)
    rows, row_ok, n, z_off = _row_offsets(tile, R, N, stride_zv, stride_zn, BLOCK_M)
    scale2 = inv_tau * LOG2E
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    z_norm = tl.zeros([BLOCK_M], dtype=tl.float32)
    for class_tile in range(chunk * tiles_per_chunk,
                            tl.minimum((chunk + 1) * tiles_per_chunk, class_tiles)):
        cls = class_tile * BLOCK_C + tl.arange(0, BLOCK_C)
        logits2, inv_s, candidate, z_norm = _tile_logits(
            z_ptr, z_off, row_ok, s_ptr, counts_ptr, cls, stride_sc, D, C, scale2, SUMS,
            HAS_COUNTS, MODE, HALF, BLOCK_M, BLOCK_C, BLOCK_K, BLOCK_DO)
        tl.store(stats_ptr + rows.to(tl.int64)[:, None] * C + cls[None, :], logits2,
                 mask=row_ok[:, None] & (cls < C)[None, :])
        if tile == 0:
            tl.store(stats_ptr + inv_s_at + cls, inv_s, mask=cls < C)
        m, l = _online_softmax(m, l, logits2)
    tl.store(lse_part_ptr + chunk * R + rows, m, mask=row_ok)
    tl.store(lse_part_ptr + (num_chunks + chunk) * R + rows, l, mask=row_ok)
    if chunk == 0:
        tl.store(stats_ptr + z_norm_at + rows, z_norm, mask=row_ok)


@triton.jit
def _combined_lse2(lse_part_ptr, rows, row_ok, R, num_chunks, BLOCK_M: tl.constexpr):
    """The rows' base-2 lse from the class chunks' partials, merged online in one pass over
    them (-inf when no class competes)."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for chunk in range(0, num_chunks):
        m_chunk = tl.load(lse_part_ptr + chunk * R + rows, mask=row_ok, other=0.0)
        l_chunk = tl.load(lse_part_ptr + (num_chunks + chunk) * R + rows, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, m_chunk)
        shift = _softmax_shift(m_new)
        l = l * tl.exp2(m - shift) + l_chunk * tl.exp2(m_chunk - shift)
        m = m_new
    return _softmax_shift(m) + tl.log2(l)


@triton.jit
def _infonce_class_grad_kernel(z_ptr, y_ptr, stats_ptr, lse_part_ptr, lse_ptr, loss_part_ptr,
                               part_ptr, R, N, D, C, stride_zv, stride_zn, inv_tau, inv_rows,
                               num_chunks, num_splits, NEED_DS: tl.constexpr, MODE: tl.constexpr,
                               HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_DO: tl.constexpr):
    """Class split, step 2: a program owns (class tile, D chunk, row split) and walks its rows.

    G = softmax - onehot comes from the staged logits and the combined lse, so no logit is
    recomputed; it accumulates dS_hat^T [cols, cls] = z_hat^T G / (R tau) into
    part[split] (NEED_DS). The programs of class tile 0 and D chunk 0 (all of them without
    NEED_DS) also write the rows' lse and their split's loss partial.
    """
    pid = tl.program_id(0)
    d_chunks = tl.cdiv(D, BLOCK_DO)
    class_tiles = tl.cdiv(C, BLOCK_C)
    if NEED_DS:
        cols = (pid % d_chunks) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        cls = ((pid // d_chunks) % class_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        split = pid // (d_chunks * class_tiles)
        writes_loss = pid % (d_chunks * class_tiles) == 0
    else:
        split = pid
        writes_loss = True
    z_norm_at, _ = _staged_offsets(R, C)
    row_tiles = tl.cdiv(R, BLOCK_M)
    per_split = tl.cdiv(row_tiles, num_splits)
    acc = tl.zeros([BLOCK_DO, BLOCK_C], dtype=tl.float32)
    loss_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for tile in range(split * per_split, tl.minimum((split + 1) * per_split, row_tiles)):
        rows, row_ok, n, z_off = _row_offsets(tile, R, N, stride_zv, stride_zn, BLOCK_M)
        labels, valid = _labels(y_ptr, n, row_ok, C)
        lse2 = _combined_lse2(lse_part_ptr, rows, row_ok, R, num_chunks, BLOCK_M)
        logit_rows = stats_ptr + rows.to(tl.int64) * C
        if writes_loss:
            tl.store(lse_ptr + rows, lse2 * LN2, mask=row_ok)
            target = tl.load(logit_rows + labels, mask=valid, other=0.0)
            loss = tl.where(valid, (lse2 - target) * LN2, float("nan"))
            loss_sum += tl.where(row_ok, loss, 0.0)
        if NEED_DS:
            logits2 = tl.load(logit_rows[:, None] + cls[None, :],
                              mask=row_ok[:, None] & (cls < C)[None, :], other=float("-inf"))
            g = _logit_grad(logits2, lse2, labels, row_ok, cls)
            inv_z = _inv_norm(tl.load(stats_ptr + z_norm_at + rows, mask=row_ok, other=1.0))
            acc = _ds_hat_chunk(z_ptr, z_off, row_ok, inv_z, g, cols, D, acc, MODE, HALF)
    if NEED_DS:
        tl.store(part_ptr + (split.to(tl.int64) * C + cls)[None, :] * D + cols[:, None],
                 acc * (inv_rows * inv_tau), mask=(cols < D)[:, None] & (cls < C)[None, :])
    if writes_loss:
        tl.store(loss_part_ptr + split, tl.sum(loss_sum, axis=0) * inv_rows)
