"""The prototype InfoNCE's row programs (mvcl_fast.kernels.prototypes describes the design):
the forward over row tiles (lse, loss and dS_hat partials; the class sums too when one
program takes every row), the finalize kernel adding the programs' partials in order, and
the backward's one pass over the rows."""
from __future__ import annotations

import triton
import triton.language as tl

from mvcl_fast.kernels.prototypes_class_split import _staged_offsets
from mvcl_fast.kernels.prototypes_sums import _class_sums_block
from mvcl_fast.kernels.prototypes_tiles import (_accumulate_ds, _dz_hat_tile, _finalize_ds,
                                                _inv_norm, _labels, _logit_grad, _online_softmax,
                                                _row_offsets, _softmax_shift, _tile_logits)
from mvcl_fast.kernels.shared import LN2, LOG2E, NORM_EPS


@triton.jit
def _infonce_fwd_kernel(z_ptr, y_ptr, s_ptr, counts_ptr, lse_ptr, loss_ptr, part_ptr,
                        R, N, D, C, stride_zv, stride_zn, stride_sc, inv_tau, inv_rows,
                        tiles_per_program,
                        SUMS: tl.constexpr, HAS_COUNTS: tl.constexpr, NEED_DS: tl.constexpr,
                        SINGLE: tl.constexpr, ONE_TILE: tl.constexpr, FUSED_SUMS: tl.constexpr,
                        MODE: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """The row tiles of one program: lse (base 2, online over class tiles), the loss, and
    (NEED_DS) the class-side gradient GEMM for grad_loss = 1, dS_hat^T += z_hat^T G / (R tau).

    Writes lse [R] and part [program, C, D] fp32. SINGLE (one program did every row): the loss
    in the output dtype, and dS finalised in place in part; otherwise this program's loss partial.
    ONE_TILE (C <= BLOCK_C): the logits of the forward feed G directly, no recompute.
    FUSED_SUMS (SINGLE, batch prototypes): this one program first writes the class sums S and
    counts itself, saving the sums kernel's launch and its pass over z.
    """
    pid = tl.program_id(0)
    if FUSED_SUMS:
        for c0 in range(0, C, BLOCK_C):
            cls = c0 + tl.arange(0, BLOCK_C)
            for d0 in range(0, D, BLOCK_DO):
                cols = d0 + tl.arange(0, BLOCK_DO)
                sums, counts = _class_sums_block(z_ptr, y_ptr, cls, cols, 0,
                                                 tl.cdiv(R, BLOCK_M), R, N, D,
                                                 stride_zv, stride_zn, MODE, BLOCK_M, BLOCK_C,
                                                 BLOCK_DO)
                tl.store(s_ptr + cls.to(tl.int64)[None, :] * stride_sc + cols[:, None], sums,
                         mask=(cols < D)[:, None] & (cls < C)[None, :])
                if d0 == 0:
                    tl.store(counts_ptr + cls, counts.to(tl.int64), mask=cls < C)
        tl.debug_barrier()  # every thread's sums land before any thread reads them
    first = pid * tiles_per_program
    scale2 = inv_tau * LOG2E
    ds_scale = inv_rows * inv_tau
    loss_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for tile in range(first, tl.minimum(first + tiles_per_program, tl.cdiv(R, BLOCK_M))):
        rows, row_ok, n, z_off = _row_offsets(tile, R, N, stride_zv, stride_zn, BLOCK_M)
        labels, valid = _labels(y_ptr, n, row_ok, C)
        if ONE_TILE:
            cls = tl.arange(0, BLOCK_C)
            logits2, inv_s, candidate, z_norm = _tile_logits(
                z_ptr, z_off, row_ok, s_ptr, counts_ptr, cls, stride_sc, D, C, scale2, SUMS,
                HAS_COUNTS, MODE, HALF, BLOCK_M, BLOCK_C, BLOCK_K, BLOCK_DO)
            m = _softmax_shift(tl.max(logits2, axis=1))
            lse2 = m + tl.log2(tl.sum(tl.exp2(logits2 - m[:, None]), axis=1))
            target = tl.sum(tl.where(cls[None, :] == labels[:, None], logits2, 0.0), axis=1)
        else:
            m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l = tl.zeros([BLOCK_M], dtype=tl.float32)
            target = tl.zeros([BLOCK_M], dtype=tl.float32)
            z_norm = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cls = c0 + tl.arange(0, BLOCK_C)
                logits2, inv_s, candidate, z_norm = _tile_logits(
                    z_ptr, z_off, row_ok, s_ptr, counts_ptr, cls, stride_sc, D, C, scale2, SUMS,
                    HAS_COUNTS, MODE, HALF, BLOCK_M, BLOCK_C, BLOCK_K, BLOCK_DO)
                target += tl.sum(tl.where(cls[None, :] == labels[:, None], logits2, 0.0), axis=1)
                m, l = _online_softmax(m, l, logits2)
            lse2 = m + tl.log2(l)
        tl.store(lse_ptr + rows, lse2 * LN2, mask=row_ok)
        loss = tl.where(valid, (lse2 - target) * LN2, float("nan"))
        loss_sum += tl.where(row_ok, loss, 0.0)
        if NEED_DS:
            inv_z = _inv_norm(z_norm)
            if ONE_TILE:
                g = _logit_grad(logits2, lse2, labels, row_ok, cls)
                _accumulate_ds(part_ptr, pid, tile == first, z_ptr, z_off, row_ok, inv_z, g, cls,
                               C, D, ds_scale, MODE, HALF, BLOCK_C, BLOCK_DO)
            else:
                for c0 in range(0, C, BLOCK_C):
                    cls = c0 + tl.arange(0, BLOCK_C)
                    logits2, inv_s, candidate, z_norm_c = _tile_logits(
                        z_ptr, z_off, row_ok, s_ptr, counts_ptr, cls, stride_sc, D, C, scale2,
                        SUMS, HAS_COUNTS, MODE, HALF, BLOCK_M, BLOCK_C, BLOCK_K, BLOCK_DO)
                    g = _logit_grad(logits2, lse2, labels, row_ok, cls)
                    _accumulate_ds(part_ptr, pid, tile == first, z_ptr, z_off, row_ok, inv_z, g,
                                   cls, C, D, ds_scale, MODE, HALF, BLOCK_C, BLOCK_DO)
    if SINGLE:
        tl.store(loss_ptr, (tl.sum(loss_sum, axis=0) * inv_rows).to(loss_ptr.dtype.element_ty))
        if NEED_DS:
            tl.debug_barrier()  # every thread's part stores land before the finalize reads them
            for c0 in range(0, C, BLOCK_C):
                cls = c0 + tl.arange(0, BLOCK_C)
                _finalize_ds(part_ptr, 1, s_ptr, counts_ptr, part_ptr, cls, cls < C, stride_sc,
                             C, D, SUMS, HAS_COUNTS, BLOCK_C, BLOCK_DO)
    else:
        tl.store(loss_ptr + pid, tl.sum(loss_sum, axis=0) * inv_rows)


@triton.jit
def _infonce_finalize_kernel(part_ptr, num_parts, s_ptr, counts_ptr, ds_ptr, loss_part_ptr,
                             loss_ptr, C, D, stride_sc,
                             SUMS: tl.constexpr, HAS_COUNTS: tl.constexpr, NEED_DS: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                             LOSS_BLOCK: tl.constexpr):
    """Program 0: the loss, the forward programs' partials summed in order. Programs 1...: dS of
    a class tile from the programs' parts (NEED_DS)."""
    pid = tl.program_id(0)
    if pid == 0:
        total = tl.zeros([LOSS_BLOCK], dtype=tl.float32)
        for p0 in range(0, num_parts, LOSS_BLOCK):
            ps = p0 + tl.arange(0, LOSS_BLOCK)
            total += tl.load(loss_part_ptr + ps, mask=ps < num_parts, other=0.0)
        tl.store(loss_ptr, tl.sum(total, axis=0).to(loss_ptr.dtype.element_ty))
    elif NEED_DS:
        cls = (pid - 1) * BLOCK_C + tl.arange(0, BLOCK_C)
        _finalize_ds(part_ptr, num_parts, s_ptr, counts_ptr, ds_ptr, cls, cls < C, stride_sc, C, D,
                     SUMS, HAS_COUNTS, BLOCK_C, BLOCK_D)


@triton.jit
def _bwd_class_tile(z_ptr, z_off, rows, row_ok, s_ptr, counts_ptr, stats_ptr, cls, stride_sc, R,
                    D, C, scale2, SUMS: tl.constexpr, HAS_COUNTS: tl.constexpr,
                    STAGED: tl.constexpr, MODE: tl.constexpr, HALF: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_DO: tl.constexpr):
    """(base-2 logits, inv_s, |z|) of a (row tile, class tile): recomputed from z and S, or
    (STAGED) loaded from the class split's staged statistics."""
    if STAGED:
        z_norm_at, inv_s_at = _staged_offsets(R, C)
        logits2 = tl.load(stats_ptr + rows.to(tl.int64)[:, None] * C + cls[None, :],
                          mask=row_ok[:, None] & (cls < C)[None, :], other=float("-inf"))
        inv_s = tl.load(stats_ptr + inv_s_at + cls, mask=cls < C, other=0.0)
        z_norm = tl.load(stats_ptr + z_norm_at + rows, mask=row_ok, other=1.0)
    else:
        logits2, inv_s, _, z_norm = _tile_logits(
            z_ptr, z_off, row_ok, s_ptr, counts_ptr, cls, stride_sc, D, C, scale2, SUMS,
            HAS_COUNTS, MODE, HALF, BLOCK_M, BLOCK_C, BLOCK_K, BLOCK_DO)
    return logits2, inv_s, z_norm


@triton.jit
def _infonce_bwd_kernel(grad_ptr, z_ptr, y_ptr, s_ptr, counts_ptr, lse_ptr, ds_ptr, stats_ptr,
                        dz_ptr, dp_ptr, R, N, D, C, stride_zv, stride_zn, stride_sc, inv_tau,
                        inv_rows, d_split,
                        SUMS: tl.constexpr, HAS_COUNTS: tl.constexpr, THROUGH: tl.constexpr,
                        NEED_DP: tl.constexpr, ONE_TILE: tl.constexpr, STAGED: tl.constexpr,
                        MODE: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
                        DP_BLOCK: tl.constexpr):
    """dz of a row tile (the D chunks of its share), and (NEED_DP) dP = grad * dS_unit.

    Programs [0, row tiles * d_split) own (row tile, D share); the rest scale dP. With
    dLoss/dL = grad / R (softmax - onehot) = grad / R G:
    dz = grad / R inv_z (G S_hat / tau - radial z_hat sum_c G L) + grad dS_{y} (THROUGH).
    Several class tiles: the logits of each are recomputed, or (STAGED) read from the class
    split's staged statistics with the rows' norms and the classes' inv_s.
    """
    pid = tl.program_id(0)
    row_programs = tl.cdiv(R, BLOCK_M) * d_split
    grad = tl.load(grad_ptr).to(tl.float32)
    if pid >= row_programs:
        if NEED_DP:
            offs = (pid - row_programs).to(tl.int64) * DP_BLOCK + tl.arange(0, DP_BLOCK)
            ok = offs < C * D
            dp = tl.load(ds_ptr + offs, mask=ok, other=0.0) * grad
            tl.store(dp_ptr + offs, dp.to(dp_ptr.dtype.element_ty), mask=ok)
    else:
        tile = pid // d_split
        share = pid % d_split
        d_chunks = tl.cdiv(D, BLOCK_DO)
        per_share = tl.cdiv(d_chunks, d_split)
        rows, row_ok, n, z_off = _row_offsets(tile, R, N, stride_zv, stride_zn, BLOCK_M)
        labels, valid = _labels(y_ptr, n, row_ok, C)
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        scale2 = inv_tau * LOG2E
        # z_hat . dz_hat / (grad / R) = sum_c G_rc L_rc: the Jacobian's radial term, every class.
        if ONE_TILE:
            cls = tl.arange(0, BLOCK_C)
            logits2, inv_s, candidate, z_norm = _tile_logits(
                z_ptr, z_off, row_ok, s_ptr, counts_ptr, cls, stride_sc, D, C, scale2, SUMS,
                HAS_COUNTS, MODE, HALF, BLOCK_M, BLOCK_C, BLOCK_K, BLOCK_DO)
            g = _logit_grad(logits2, lse2, labels, row_ok, cls)
            g_dot_l = tl.sum(tl.where(candidate[None, :], g * logits2 * LN2, 0.0), axis=1)
        else:
            g_dot_l = tl.zeros([BLOCK_M], dtype=tl.float32)
            z_norm = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cls = c0 + tl.arange(0, BLOCK_C)
                logits2, inv_s, z_norm = _bwd_class_tile(
                    z_ptr, z_off, rows, row_ok, s_ptr, counts_ptr, stats_ptr, cls, stride_sc, R,
                    D, C, scale2, SUMS, HAS_COUNTS, STAGED, MODE, HALF, BLOCK_M, BLOCK_C, BLOCK_K,
                    BLOCK_DO)
                g = _logit_grad(logits2, lse2, labels, row_ok, cls)
                # A class that does not compete has logit -inf (and G = 0): it adds nothing.
                g_dot_l += tl.sum(tl.where(logits2 != float("-inf"), g * logits2 * LN2, 0.0),
                                  axis=1)
        inv_z = _inv_norm(z_norm)
        radial = tl.where(z_norm >= NORM_EPS, g_dot_l, 0.0)
        row_scale = grad * inv_rows * inv_z
        for chunk in range(share * per_share, tl.minimum((share + 1) * per_share, d_chunks)):
            cols = chunk * BLOCK_DO + tl.arange(0, BLOCK_DO)
            col_ok = cols < D
            dz_hat = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
            if ONE_TILE:
                dz_hat = _dz_hat_tile(s_ptr, cls, inv_s, g, cols, stride_sc, C, D, dz_hat, MODE,
                                      HALF)
            else:
                for c0 in range(0, C, BLOCK_C):  # G of each class tile again
                    cls = c0 + tl.arange(0, BLOCK_C)
                    logits2, inv_s, z_norm_c = _bwd_class_tile(
                        z_ptr, z_off, rows, row_ok, s_ptr, counts_ptr, stats_ptr, cls, stride_sc,
                        R, D, C, scale2, SUMS, HAS_COUNTS, STAGED, MODE, HALF, BLOCK_M, BLOCK_C,
                        BLOCK_K, BLOCK_DO)
                    g = _logit_grad(logits2, lse2, labels, row_ok, cls)
                    dz_hat = _dz_hat_tile(s_ptr, cls, inv_s, g, cols, stride_sc, C, D, dz_hat,
                                          MODE, HALF)
            z_hat = tl.load(z_ptr + z_off[:, None] + cols[None, :],
                            mask=row_ok[:, None] & col_ok[None, :],
                            other=0.0).to(tl.float32) * inv_z[:, None]
            dz = row_scale[:, None] * (dz_hat * inv_tau - z_hat * radial[:, None])
            if THROUGH:
                dz += grad * tl.load(ds_ptr + labels.to(tl.int64)[:, None] * D + cols[None, :],
                                     mask=valid[:, None] & col_ok[None, :], other=0.0)
            tl.store(dz_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
