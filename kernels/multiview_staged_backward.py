"""The multi-view InfoNCE backward that stages dS (the whole batch, D wider than a program's
output chunk; mvcl_fast.kernels.multiview_infonce describes the design): dS of a chunk of
anchor rows with its partial sums, then both gradient GEMMs from it."""
from __future__ import annotations

import triton
import triton.language as tl

from mvcl_fast.kernels.multiview_tiles import _expm1, _row_dots, _row_starts, _store_row_grad, _within
from mvcl_fast.kernels.shared import LOG2E


@triton.jit
def _staged_ds_kernel(anchor_ptr, views_ptr, rnorm_ptr, lse_rows_ptr, lse_cols_ptr,
                      row_terms_ptr, col_terms_ptr, ds_ptr, row_proj_ptr, col_proj_ptr,
                      N, D, num_views, chunk_start, chunk_rows, ds_stride_view, ds_stride_row,
                      row_proj_stride, anchor_stride_row, views_stride_view, views_stride_row,
                      inv_tau, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, OPERAND: tl.constexpr,
                      PRECISION: tl.constexpr):
    """dS of one [BLOCK_M anchor rows, BLOCK_N view rows] tile of view pid 2, staged.

    Grid (row tiles of the chunk [chunk_start, chunk_start + chunk_rows), view row tiles, V).
    dS_ij = P_row_ij [+ P_col_ij] - I_ij with the diagonal expm1(-term) as in _grad_kernel,
    stored in the inputs' dtype (the dot operand _grad_kernel rounds it to), and the tile's
    partial sums of dS_ij S_ij (x_hat . g before scaling, see _store_row_grad): over its
    columns to row_proj[v, pid 1, local row], over its valid rows to col_proj[v, pid 0, j].
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    v = tl.program_id(2)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = local < chunk_rows
    rows = chunk_start + tl.minimum(local, chunk_rows - 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_cols = tl.minimum(cols, N - 1)
    view = views_ptr + v.to(tl.int64) * views_stride_view
    a_rows = _row_starts(anchor_ptr, rows, anchor_stride_row)
    k_rows = _row_starts(view, safe_cols, views_stride_row)
    offs_d = tl.arange(0, BLOCK_D)
    first_d = _within(offs_d, D)
    a_first = tl.load(a_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
    k_first = tl.load(k_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
    dots = _row_dots(a_first, k_first, a_rows, k_rows, D, BLOCK_D, True, OPERAND, PRECISION)
    a_scale = tl.load(rnorm_ptr + num_views * N + rows) * inv_tau
    logits = dots * a_scale[:, None] * tl.load(rnorm_ptr + v * N + safe_cols)[None, :]
    probs = tl.exp2((logits - tl.load(lse_rows_ptr + v * N + rows)[:, None]) * LOG2E)
    diagonal = _expm1(-tl.load(row_terms_ptr + v * N + rows))
    if SYMMETRIC:
        probs += tl.exp2((logits - tl.load(lse_cols_ptr + v * N + safe_cols)[None, :]) * LOG2E)
        diagonal += _expm1(-tl.load(col_terms_ptr + v * N + rows))
    ds = tl.where(rows[:, None] == cols[None, :], diagonal[:, None], probs)
    ds = tl.where(valid[:, None] & (cols[None, :] < N), ds, 0.0)
    weighted = ds * logits
    tl.store(row_proj_ptr + (v * tl.num_programs(1) + pid_n) * row_proj_stride + local,
             tl.sum(weighted, axis=1), mask=valid)
    tl.store(col_proj_ptr + (v * tl.num_programs(0) + pid_m) * N + cols,
             tl.sum(weighted, axis=0), mask=cols < N)
    out = (ds_ptr + v.to(tl.int64) * ds_stride_view + local.to(tl.int64)[:, None] * ds_stride_row
           + cols[None, :])
    tl.store(out, ds.to(ds_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


@triton.jit(do_not_specialize=["chunk", "num_chunks"])
def _staged_grad_kernel(anchor_ptr, views_ptr, rnorm_ptr, ds_ptr, row_proj_ptr, col_proj_ptr,
                        view_acc_ptr, view_proj_ptr, grad_loss_ptr, d_anchor_ptr, d_views_ptr,
                        N, D, num_views, chunk_start, chunk_rows, chunk, num_chunks,
                        anchor_tiles, view_tiles, proj_col_tiles, proj_row_tiles,
                        ds_stride_view, ds_stride_row, row_proj_stride, anchor_stride_row,
                        views_stride_view, views_stride_row, inv_tau, grad_scale,
                        EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DO: tl.constexpr, OPERAND: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Both gradient GEMMs of one row chunk from the staged dS, columns pid 1 of BLOCK_DO.

    Grid axis 0: anchor_tiles tiles of the chunk's anchor rows (g_i = sum_v sum_j dS_v,ij
    k_hat_vj over all N view rows: complete, so they finish the chain and store), then
    view_tiles row tiles of each view (g_vj = sum_i dS_v,ij a_hat_i over the chunk's anchor
    rows). A view row's sum is complete after the last chunk: with several chunks the fp32
    accumulator goes to view_acc between launches and the x_hat . g partials of the chunks so
    far to view_proj [V, N], read and written by the D-tile-0 program of each row tile only
    until the last chunk, whose programs all read it (no program reads what another of its
    launch writes).
    """
    pid = tl.program_id(0)
    pid_do = tl.program_id(1)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    in_do = _within(offs_do, D)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    proj = tl.zeros([BLOCK_M], dtype=tl.float32)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * grad_scale
    anchor_rnorm = rnorm_ptr + num_views * N
    if pid < anchor_tiles:
        local = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = local < chunk_rows
        local = tl.minimum(local, chunk_rows - 1)
        rows = chunk_start + local
        ds_rows = ds_ptr + local.to(tl.int64)[:, None] * ds_stride_row
        view = views_ptr
        for v in range(num_views):   # the pointers step a view at a time (no i32 product)
            for k0 in range(0, N, BLOCK_K):
                keys = k0 + offs_k
                ds = tl.load(ds_rows + keys[None, :], mask=keys[None, :] < N, other=0.0)
                safe_keys = tl.minimum(keys, N - 1)
                k_out = tl.load(_row_starts(view, safe_keys, views_stride_row) + offs_do[None, :],
                                mask=in_do, other=0.0)
                k_hat = (k_out.to(tl.float32)
                         * tl.load(rnorm_ptr + v * N + safe_keys)[:, None]).to(OPERAND)
                acc = tl.dot(ds.to(OPERAND), k_hat, acc, input_precision=PRECISION)
            for t in range(proj_col_tiles):
                proj += tl.load(row_proj_ptr + (v * proj_col_tiles + t) * row_proj_stride + local)
            view += views_stride_view
            ds_rows += ds_stride_view
        own_rnorm = tl.load(anchor_rnorm + rows)
        radial = tl.where(own_rnorm < 1.0 / EPS, proj * scale, 0.0)
        _store_row_grad(acc, offs_do, _row_starts(anchor_ptr, rows, anchor_stride_row), own_rnorm,
                        radial, scale * inv_tau, d_anchor_ptr, rows, valid, D)
    else:
        v = (pid - anchor_tiles) // view_tiles
        rows = ((pid - anchor_tiles) % view_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < N
        rows = tl.minimum(rows, N - 1)
        ds_cols = ds_ptr + v.to(tl.int64) * ds_stride_view + rows[:, None]
        for k0 in range(0, chunk_rows, BLOCK_K):
            keys = k0 + offs_k                                   # local anchor rows
            ds = tl.load(ds_cols + keys.to(tl.int64)[None, :] * ds_stride_row,
                         mask=keys[None, :] < chunk_rows, other=0.0)
            anchor_rows = chunk_start + tl.minimum(keys, chunk_rows - 1)
            a_out = tl.load(_row_starts(anchor_ptr, anchor_rows, anchor_stride_row)
                            + offs_do[None, :], mask=in_do, other=0.0)
            a_hat = (a_out.to(tl.float32)
                     * tl.load(anchor_rnorm + anchor_rows)[:, None]).to(OPERAND)
            acc = tl.dot(ds.to(OPERAND), a_hat, acc, input_precision=PRECISION)
        for t in range(proj_row_tiles):
            proj += tl.load(col_proj_ptr + (v * proj_row_tiles + t) * N + rows)
        acc_at = (view_acc_ptr + (v.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D
                  + offs_do[None, :])
        if chunk > 0:
            acc += tl.load(acc_at, mask=in_do)
        proj_at = view_proj_ptr + v * N + rows
        if chunk < num_chunks - 1:
            tl.store(acc_at, acc, mask=valid[:, None] & in_do)
            if pid_do == 0:
                if chunk > 0:
                    proj += tl.load(proj_at)
                tl.store(proj_at, proj, mask=valid)
        else:
            if chunk > 0:
                proj += tl.load(proj_at)
            own_rnorm = tl.load(rnorm_ptr + v * N + rows)
            radial = tl.where(own_rnorm < 1.0 / EPS, proj * scale, 0.0)
            view = views_ptr + v.to(tl.int64) * views_stride_view
            _store_row_grad(acc, offs_do, _row_starts(view, rows, views_stride_row), own_rnorm,
                            radial, scale * inv_tau, d_views_ptr + v.to(tl.int64) * N * D, rows,
                            valid, D)
