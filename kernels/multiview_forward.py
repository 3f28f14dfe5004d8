"""The multi-view InfoNCE forward (mvcl_fast.kernels.multiview_infonce describes the design):
inverse row norms, the row (and column) log-sum-exps with the per-row loss terms, and the
loss."""
from __future__ import annotations

import triton
import triton.language as tl

from mvcl_fast.kernels.multiview_tiles import _log1p, _rotated_rows, _row_dots, _row_starts, _within
from mvcl_fast.kernels.shared import LOG2E


@triton.jit
def _inverse_norms_kernel(anchor_ptr, views_ptr, rnorm_ptr, N, D, num_views, anchor_stride_row,
                          views_stride_view, views_stride_row,
                          EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """rnorm[v, i] = 1 / max(||views[v, i]||, eps); the anchor's go to rnorm[V, i]."""
    pid_r = tl.program_id(0)
    v = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    safe_rows = tl.minimum(rows, N - 1)
    if v == num_views:
        x_rows = _row_starts(anchor_ptr, safe_rows, anchor_stride_row)
    else:
        x_rows = _row_starts(views_ptr + v.to(tl.int64) * views_stride_view, safe_rows,
                             views_stride_row)
    offs_d = tl.arange(0, BLOCK_D)
    sum_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(x_rows + d0 + offs_d[None, :], mask=_within(d0 + offs_d, D), other=0.0)
        x = x.to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    rnorm = 1.0 / tl.maximum(tl.sqrt(sum_sq), EPS)
    tl.store(rnorm_ptr + v * N + rows, rnorm, mask=rows < N)


@triton.jit
def _lse_kernel(anchor_ptr, views_ptr, rnorm_ptr, lse_rows_ptr, lse_cols_ptr, row_terms_ptr,
                col_terms_ptr, N, row_start, num_rows, D, num_views, anchor_stride_row,
                views_stride_view, views_stride_row, inv_tau,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                D_CHUNKED: tl.constexpr, OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """For BLOCK_M query rows i of view v: lse[v, i] = logsumexp_j S_ij and term[v, i] = lse - S_ii.

    Grid axis 2 is the direction: 0, the rows (queries = anchor, keys = view
    v; writes lse_rows, row_terms), 1, the columns (queries = view v, keys =
    anchor; lse_cols, col_terms), so both directions of the symmetric loss
    are one launch. S_ij = q_hat_i . k_hat_j / tau over all N keys j, for the
    query rows i in [row_start, row_start + num_rows) (all N but for a DDP
    rank's own rows); outputs are indexed by i - row_start. rnorm [V + 1, N]
    holds the views' inverse norms, then the anchor's. The positive S_ii is
    taken from the same tile values as the log-sum-exp and the sum leaves it
    out, so that
    term = (m - S_ii) + log1p(exp(S_ii - m) - 1 + sum_{j != i} exp(S_ij - m))
    keeps full relative precision when the loss is small (lse ~ S_ii).
    """
    pid_m = tl.program_id(0)
    v = tl.program_id(1)
    columns = tl.program_id(2) == 1
    view_base = views_ptr + v.to(tl.int64) * views_stride_view
    q_base = tl.where(columns, view_base, anchor_ptr)
    k_base = tl.where(columns, anchor_ptr, view_base)
    q_stride_row = tl.where(columns, views_stride_row, anchor_stride_row)
    k_stride_row = tl.where(columns, anchor_stride_row, views_stride_row)
    view_rnorm = rnorm_ptr + v * N
    anchor_rnorm = rnorm_ptr + num_views * N
    q_rnorm_base = tl.where(columns, view_rnorm, anchor_rnorm)
    k_rnorm_base = tl.where(columns, anchor_rnorm, view_rnorm)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)        # local: i - row_start
    q_rows_idx = row_start + tl.minimum(rows, num_rows - 1)
    q_rows = _row_starts(q_base, q_rows_idx, q_stride_row)
    offs_d = tl.arange(0, BLOCK_D)
    first_d = _within(offs_d, D)
    q_first = tl.load(q_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
    q_scale = tl.load(q_rnorm_base + q_rows_idx) * inv_tau
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    off_diagonal = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_{j != i} exp(S_ij - running_max)
    positive = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)            # rotated: the positive is column i
        k_rows_idx = _rotated_rows(cols, row_start, N)
        k_rows = _row_starts(k_base, k_rows_idx, k_stride_row)
        k_first = tl.load(k_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
        dots = _row_dots(q_first, k_first, q_rows, k_rows, D, BLOCK_D, D_CHUNKED, OPERAND, PRECISION)
        k_rnorm = tl.load(k_rnorm_base + k_rows_idx)
        logits = dots * q_scale[:, None] * k_rnorm[None, :]
        on_diagonal = rows[:, None] == cols[None, :]
        positive += tl.sum(tl.where(on_diagonal, logits, 0.0), axis=1)
        logits = tl.where(cols[None, :] < N, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # exp via exp2 of a difference taken in natural units (no rounding of the large values).
        probs = tl.exp2((logits - new_max[:, None]) * LOG2E)
        off_diagonal = (off_diagonal * tl.exp2((running_max - new_max) * LOG2E)
                        + tl.sum(tl.where(on_diagonal, 0.0, probs), axis=1))
        running_max = new_max
    term = (running_max - positive) + _log1p(
        tl.exp2((positive - running_max) * LOG2E) - 1.0 + off_diagonal)
    out = v * num_rows + rows
    tl.store(tl.where(columns, lse_cols_ptr, lse_rows_ptr) + out, positive + term,
             mask=rows < num_rows)
    tl.store(tl.where(columns, col_terms_ptr, row_terms_ptr) + out, term, mask=rows < num_rows)


@triton.jit
def _loss_kernel(row_terms_ptr, col_terms_ptr, loss_ptr, count, weight,
                 SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr):
    """loss = weight * (sum of the row terms [+ the column terms]) in the loss's dtype; one
    program, no atomics."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.load(row_terms_ptr + offs, mask=offs < count, other=0.0)
        if SYMMETRIC:
            total += tl.load(col_terms_ptr + offs, mask=offs < count, other=0.0)
    tl.store(loss_ptr, (tl.sum(total, axis=0) * weight).to(loss_ptr.dtype.element_ty))
