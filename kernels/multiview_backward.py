"""The multi-view InfoNCE backward that recomputes the logits per D-chunk of its output
(mvcl_fast.kernels.multiview_infonce describes the design): one launch per share of own
rows."""
from __future__ import annotations

import triton
import triton.language as tl

from mvcl_fast.kernels.multiview_tiles import (_expm1, _rotated_rows, _row_dots, _row_starts,
                                               _store_row_grad, _within)
from mvcl_fast.kernels.shared import LOG2E


@triton.jit
def _grad_kernel(anchor_ptr, views_ptr, rnorm_ptr, lse_rows_ptr, lse_cols_ptr, row_terms_ptr,
                 col_terms_ptr, grad_loss_ptr, d_anchor_ptr, d_views_ptr,
                 N, row_start, num_rows, D, num_views, own_tiles, anchor_stride_row,
                 views_stride_view, views_stride_row, inv_tau, grad_scale,
                 SYMMETRIC: tl.constexpr, OWN_IN_R: tl.constexpr, EPS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DO: tl.constexpr, BLOCK_DO_TAIL: tl.constexpr, D_CHUNKED: tl.constexpr,
                 OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """Gradient w.r.t. BLOCK_M "own" rows, D-chunk pid_do, in the inputs' dtype: one launch for
    the anchor and every view.

    A program's output chunk is BLOCK_DO columns, plus BLOCK_DO_TAIL more in a second
    accumulator when > 0 (D = 768 as 512 + 256: one chunk, so the logits are computed once,
    where one power-of-two chunk would be 1024 wide, a quarter of it padding; D = 1024 as
    512 + 512).

    Grid axis 0: own_tiles anchor row tiles first (own = anchor, other =
    every view in turn: these programs do V times the work, so they start
    first), then own_tiles row tiles of each view v (own = view v, other =
    the anchor). The row softmax (lse_rows) belongs to anchor rows, the
    column one (symmetric) to view rows. Only the rows R = [row_start,
    row_start + M) have a softmax in the loss (all N, or a DDP rank's own
    rows), so dS_ij = [i in R](P_own_ij - I_ij) + [j in R](P_other_ij - I_ij),
    and each launch covers one kind of own row:
    OWN_IN_R: own rows in R, visiting the other rows from row_start on with
    wrap-around (all N where the own row has a softmax, else only R); in these
    rotated coordinates the identity is the tile diagonal, which the compiler
    keeps cheap. Not OWN_IN_R: the N - M own rows outside R, against the other
    rows in R only, where the identity is never hit (anchor rows of the
    non-symmetric loss visit nothing there: their gradient is zero).
    A rank's share thus costs O(M N), not O(N^2).

    The diagonal dS_ii is not formed from the recomputed S_ii and the stored
    lse (P_ii - 1 cancels when the loss is small) but as the sum over the
    directions of expm1(-term_i), from the forward's precise terms lse_i - S_ii.
    """
    pid = tl.program_id(0)
    pid_do = tl.program_id(1)
    is_anchor = pid < own_tiles
    view_tile = pid - own_tiles
    tile = tl.where(is_anchor, pid, view_tile % own_tiles)
    pid_v = tl.where(is_anchor, 0, view_tile // own_tiles)
    own_view = views_ptr + pid_v.to(tl.int64) * views_stride_view
    own_base = tl.where(is_anchor, anchor_ptr, own_view)
    own_stride_row = tl.where(is_anchor, anchor_stride_row, views_stride_row)
    other_base = tl.where(is_anchor, views_ptr, anchor_ptr)
    other_stride_view = tl.where(is_anchor, views_stride_view, 0)
    other_stride_row = tl.where(is_anchor, views_stride_row, anchor_stride_row)
    anchor_rnorm = rnorm_ptr + num_views * N
    own_rnorm_base = tl.where(is_anchor, anchor_rnorm, rnorm_ptr + pid_v * N)
    other_rnorm_base = tl.where(is_anchor, rnorm_ptr, anchor_rnorm)
    other_rnorm_stride_view = tl.where(is_anchor, N, 0)
    loop_views = tl.where(is_anchor, num_views, 1)
    # The softmaxes the own rows meet: their own (anchor rows: the rows', view rows: the
    # columns') for own rows in R, over all N other rows; the other rows' (view rows: the
    # rows', anchor rows: the columns') against the other rows in R only.
    if SYMMETRIC:
        own_lse_ptr = tl.where(is_anchor, lse_rows_ptr, lse_cols_ptr)
        other_lse_ptr = tl.where(is_anchor, lse_cols_ptr, lse_rows_ptr)
        if OWN_IN_R:
            loop_len = N
        else:
            loop_len = num_rows
    else:   # the rows' softmax only: the anchor's own, the view rows' other
        own_lse_ptr = lse_rows_ptr
        other_lse_ptr = lse_rows_ptr
        if OWN_IN_R:
            loop_len = tl.where(is_anchor, N, num_rows)
        else:
            loop_len = tl.where(is_anchor, 0, num_rows)
    local = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past the end repeat the last one (loads stay in bounds; the store is masked).
    if OWN_IN_R:
        valid = local < num_rows
        local = tl.minimum(local, num_rows - 1)
        rows = row_start + local
    else:
        valid = local < N - num_rows
        local = tl.minimum(local, N - num_rows - 1)
        rows = tl.where(local < row_start, local, local + num_rows)
    own_rows = _row_starts(own_base, rows, own_stride_row)
    own_rnorm = tl.load(own_rnorm_base + rows)
    q_scale = own_rnorm * inv_tau
    offs_d = tl.arange(0, BLOCK_D)
    first_d = _within(offs_d, D)
    q_first = tl.load(own_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
    offs_do = pid_do * (BLOCK_DO + BLOCK_DO_TAIL) + tl.arange(0, BLOCK_DO)
    out_d = _within(offs_do, D)
    # The accumulators are in units of g / (V M) (applied in the epilogue):
    # acc = sum_j dS_ij k_hat_j, proj = sum_j dS_ij S_ij.
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    if BLOCK_DO_TAIL > 0:
        offs_tail = pid_do * (BLOCK_DO + BLOCK_DO_TAIL) + BLOCK_DO + tl.arange(0, BLOCK_DO_TAIL)
        acc_tail = tl.zeros([BLOCK_M, BLOCK_DO_TAIL], dtype=tl.float32)
    proj = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(loop_views):
        v = pid_v + i
        other_view = other_base + v.to(tl.int64) * other_stride_view
        other_rnorm_view = other_rnorm_base + v * other_rnorm_stride_view
        if OWN_IN_R:   # dS_ii = sum over the directions of P_ii - 1 = expm1(-term)
            diagonal = _expm1(-tl.load(row_terms_ptr + v * num_rows + local))
            if SYMMETRIC:
                diagonal += _expm1(-tl.load(col_terms_ptr + v * num_rows + local))
        if OWN_IN_R:
            own_lse = tl.load(own_lse_ptr + v * num_rows + local)
        for start in range(0, loop_len, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)            # rotated: other row row_start + cols
            other_rows_idx = _rotated_rows(cols, row_start, N)
            other_rows = _row_starts(other_view, other_rows_idx, other_stride_row)
            k_first = tl.load(other_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
            dots = _row_dots(q_first, k_first, own_rows, other_rows, D, BLOCK_D, D_CHUNKED,
                             OPERAND, PRECISION)
            other_rnorm = tl.load(other_rnorm_view + other_rows_idx)
            logits = dots * q_scale[:, None] * other_rnorm[None, :]
            # +inf past R: those columns have no softmax (P = 0).
            other_lse = tl.load(other_lse_ptr + v * num_rows + cols, mask=cols < num_rows,
                                other=float("inf"))
            if SYMMETRIC:
                probs = tl.exp2((logits - other_lse[None, :]) * LOG2E)
                if OWN_IN_R:
                    probs += tl.exp2((logits - own_lse[:, None]) * LOG2E)
            elif OWN_IN_R:   # one softmax, the rows': the anchor's own or the view rows' other
                probs = tl.exp2((logits - tl.where(is_anchor, own_lse[:, None],
                                                   other_lse[None, :])) * LOG2E)
            else:
                probs = tl.exp2((logits - other_lse[None, :]) * LOG2E)
            dlogits = tl.where(cols[None, :] < loop_len, probs, 0.0)
            if OWN_IN_R:
                dlogits = tl.where(local[:, None] == cols[None, :], diagonal[:, None], dlogits)
            proj += tl.sum(dlogits * logits, axis=1)
            if D_CHUNKED or BLOCK_DO != BLOCK_D:
                k_out = tl.load(other_rows + offs_do[None, :], mask=out_d, other=0.0)
            else:  # the single D-chunk of the logits is the output chunk: reuse it
                k_out = k_first
            # Normalise the other rows (|k_hat| <= 1) rather than scale dS by
            # 1/||k||, which overflows a half type for a near-zero row.
            k_hat = (k_out.to(tl.float32) * other_rnorm[:, None]).to(OPERAND)
            acc = tl.dot(dlogits.to(OPERAND), k_hat, acc, input_precision=PRECISION)
            if BLOCK_DO_TAIL > 0:
                k_tail = tl.load(other_rows + offs_tail[None, :], mask=_within(offs_tail, D),
                                 other=0.0)
                k_hat = (k_tail.to(tl.float32) * other_rnorm[:, None]).to(OPERAND)
                acc_tail = tl.dot(dlogits.to(OPERAND), k_hat, acc_tail, input_precision=PRECISION)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * grad_scale
    # x_hat . grad_hat = sum_j dS_ij S_ij; no projection where the norm was clamped.
    radial = tl.where(own_rnorm < 1.0 / EPS, proj * scale, 0.0)
    out_base = tl.where(is_anchor, d_anchor_ptr, d_views_ptr + pid_v.to(tl.int64) * N * D)
    _store_row_grad(acc, offs_do, own_rows, own_rnorm, radial, scale * inv_tau, out_base, rows,
                    valid, D)
    if BLOCK_DO_TAIL > 0:
        _store_row_grad(acc_tail, offs_tail, own_rows, own_rnorm, radial, scale * inv_tau,
                        out_base, rows, valid, D)
