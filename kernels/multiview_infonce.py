"""Fused multi-view InfoNCE: forward and backward without the N x N logits.

For each view v, S_v = norm(anchor) norm(views_v)^T / tau and the loss is the
mean over views of mean_i (lse_i(S_v) - S_v[i, i]); symmetric=True averages
that with the same term over the columns of S_v (SPEC op 3). Only O(N)
statistics ever reach memory: inverse row norms, per-row loss terms and the
row (and column) log-sum-exps; the op saves the inputs, the log-sum-exps,
the per-row terms and the inverse norms.

Normalisation is fused, not materialised: ``_inverse_norms_kernel`` computes
1 / max(||x||, 1e-12) for every anchor and view row (one launch, in the
forward only: the op returns them and the backward reuses them); the tile
kernels take dot products of the *raw* rows and scale each logit by the two
inverse norms. No normalised copy of the inputs is written or read back, and
half-precision inputs are not rounded again after normalisation (their
products are exact in the fp32 accumulator).

Forward: 3 launches, symmetric or not.
  1. ``_inverse_norms_kernel``, grid (row tiles, V + 1).
  2. ``_lse_kernel``, grid (row tiles, V, directions): each program owns
     BLOCK_M query rows of one view and one direction (rows: anchor against
     the view's rows; columns, when symmetric: the view's rows against the
     anchor) and streams the keys in BLOCK_N tiles with an online
     log-sum-exp (running max, exp2 of differences taken in natural units);
     D is reduced in BLOCK_D chunks (the program's first chunk of its own
     rows stays in registers). The positive S_ii comes from the same tile
     values (the diagonal), and the per-row term lse - S_ii is formed with
     log1p from the off-diagonal mass, so it keeps full relative precision
     when the loss is small (where lse - positive in fp32 cancels). Writes
     the log-sum-exps and the terms.
  3. ``_loss_kernel``, one program: the weighted sum of the terms
     (deterministic, no atomics), stored in the anchor's dtype.

Backward: 1 launch (2 for a DDP rank's share; the staged backward below: 2 per
row chunk), no aten op: ``_grad_kernel`` over one grid of the anchor's row
tiles and every view's, the split of FlashAttention's dQ vs dK/dV kernels and
Inf-CL's in one launch: anchor programs loop over the rows of every view, view
programs over the anchor rows. Each program recomputes its logit tiles, forms dS = (P_row - I)
[+ (P_col - I)] and accumulates dS @ rows_hat for its own rows only: no
atomics, deterministic, every output element written by exactly one program.
Multiply-adds: the recompute and the gradient GEMM of each side, 4 units of
V N^2 D in all (the forward's log-sum-exps are 1, 2 when symmetric), where a
program's accumulators span D (D <= MAX_BLOCK_DO + MAX_BLOCK_DO_TAIL = 768: a
512-wide chunk and a 256-wide tail, so D = 768 pads nothing; fp16/bf16 on sm_90
up to WIDE_D = 1024 with a 512-wide tail in 16-row tiles). Past that width the
whole batch's backward stages dS instead (below); a DDP rank's share splits D
into chunks (those 1024 columns, else 512) that each recompute the logits: 2
units for each further chunk.
The chain through the L2 normalisation, dx = (g - x_hat (x_hat . g)) /
max(||x||, 1e-12), needs x_hat . g over the whole row, which equals sum_j dS_ij S_ij (because
x_hat . k_hat_j = tau S_ij): every program accumulates it from its tiles, so
each D-chunk finishes the chain in its epilogue.

Staged backward (the whole batch, D wider than one program's output chunk:
fp16/bf16 past 1024 on sm_90, past 512 on sm_80, fp32 past 768): 2 launches,
3 units of V N^2 D at every D (2 units per further D-chunk would make D = 2048
6 units and D = 4096 10). ``_staged_ds_kernel`` computes each logit tile once
over all of D and stores dS in the inputs' dtype (the operand the gradient
GEMMs round it to anyway), with each tile's row and column sums of dS_ij S_ij
(the x_hat . g of the chain); ``_staged_grad_kernel`` then runs d_anchor =
dS k_hat and d_views = dS^T a_hat as plain GEMMs tiled over D. dS is
V x rows x N for a chunk of anchor rows within STAGED_DS_BYTES (1 GiB: one
chunk up to N = 11,585 at V = 4 in a half dtype, so memory stays O(N D) plus
that bound); past it each chunk is 2 launches and the view rows' gradients
are accumulated in an fp32 [V, N, D] buffer between them. The extra traffic:
V N^2 elements of dS written once and read twice (~1/D of the multiply-adds
saved), and with several chunks the accumulator's round trip, 8 V N D bytes
per chunk of R rows against its 6 V R N D flops (4 / (3 R) bytes a flop:
1/768 at N = 65,536, V = 8, half, R = 1,024; an H200's ridge is ~1/200).

A DDP rank's share. Under ``multiview_infonce(..., group=)`` the inputs are
the gathered global batch and the loss is the mean of the terms of the rank's
own rows R = [row_start, row_start + M) only. The lse kernel then runs over
the M query rows (the keys are visited from row_start on, wrapping around, so
the positive is still the tile diagonal); the gradient kernel runs once for
the own rows in R (against all N other rows when they own a softmax, else
only against R) and once for the N - M own rows outside R (against the
other rows in R only: their gradient comes through the softmaxes of R). Work
is O(M N) per rank rather than the O(N^2) of the whole global loss; M = N
is the single-process case and launches exactly the kernels above.

Precision. Every tl.dot accumulates in fp32; fp16/bf16 operands run on the
tensor cores. For fp32 inputs the dot precision is explicit:
input_precision="ieee" (exact fp32 products, CUDA-core FMAs) unless
``torch.backends.cuda.matmul.allow_tf32`` is True when the kernel is
launched, in which case "tf32" (tensor cores, 10-bit mantissa) is used; the
choice is passed as a constexpr, so each is its own compiled kernel. In the
backward the dot operands are P - I (values in [-2, 1]) and the normalised
rows, rounded to the input dtype as FlashAttention rounds P; the scale
g / (V N) is applied to the fp32 accumulator afterwards, so it cannot
underflow a half type. Triton's interpreter (TRITON_INTERPRET=1, how CI runs
these kernels on CPU) has no bf16 dot: there bf16 operands are upcast to fp32
before tl.dot (OPERAND constexpr); loads, stores and all else are as on GPU.
When the loss is tiny (positives far above the negatives) the diagonal of
dS, P_ii - 1, would cancel against the fp32 rounding of the stored lse (as it
does in the reference): the backward forms it as expm1(-term_i) from the
forward's terms instead (in the kernel), so the gradients keep their relative
precision there too (see tests/test_multiview_kernels.py).

Shapes: any N >= 1 (runtime; rows past N are clamped for loads and masked
for stores), any D (runtime; padded to a multiple of 16 when needed, see
``_padded_rows``), any V. Block configs come from a small fixed table keyed
by the input dtype and a D bucket (``_lse_config``, ``_grad_config``), so N
and D never force a recompile beyond Triton's own divisibility
specialisation; ``aot_specs()`` lists every kernel with every config it can
launch with.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mvcl_fast.backend import triton_interpreter_enabled
from mvcl_fast.kernels.aot import KernelSpec

NORM_EPS = 1e-12  # as F.normalize and mvcl_fast.reference
LOG2E = tl.constexpr(1.4426950408889634)


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


@triton.jit
def _store_row_grad(acc, offs, own_rows, own_rnorm, radial, acc_scale, out_base, rows, valid, D):
    """The chain through the L2 normalisation for the columns offs of the own rows:
    dx = (g - x_hat (x_hat . g)) / max(||x||, eps) with g = acc * acc_scale."""
    in_d = _within(offs, D)
    own = tl.load(own_rows + offs[None, :], mask=in_d, other=0.0).to(tl.float32)
    grad = (acc * acc_scale - own * (own_rnorm * radial)[:, None]) * own_rnorm[:, None]
    out = _row_starts(out_base, rows, D) + offs[None, :]
    tl.store(out, grad.to(out_base.dtype.element_ty), mask=valid[:, None] & in_d)


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


# ----------------------------------------------------------------------------
# Configs: a fixed table keyed by input dtype and D bucket (N never recompiles).
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    block_d: int          # D-chunk of the logit dot products
    block_do: int         # D-chunk of the gradient a backward program owns
    num_warps: int
    num_stages: int
    always_chunked: bool = False  # the D-chunk loop even when one chunk holds D
    block_do_tail: int = 0        # a second output chunk the same program owns (0: none)

    @property
    def out_chunk(self) -> int:
        """Columns of the gradient one backward program writes."""
        return self.block_do + self.block_do_tail

    def d_chunked(self, dim: int) -> bool:
        return self.always_chunked or dim > self.block_d


NORMS_BLOCK_R, NORMS_BLOCK_D = 8, 128
LOSS_BLOCK = 1024
# The widest D-chunk a backward program accumulates, and the tail chunk beside it: up to
# their sum the backward is 4 units of V N^2 D multiply-adds; past it each further chunk
# recomputes the logits (1 unit per side). fp16/bf16 on sm_90 hold up to WIDE_D columns
# (a 512-wide tail, in 16-row tiles).
MAX_BLOCK_DO, MAX_BLOCK_DO_TAIL = 512, 256
WIDE_D = 1024
# One representative D per bucket: the configs below are constant inside each.
D_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 4096)

# Every config below compiles without spills for sm_90a under triton 3.6.0 and 3.9 at the
# specialisations the launchers use (python -m mvcl_fast.kernels.report). Row tiles of 64
# (lse) and 32 or fewer (gradient) give every kernel >= 132 programs at N = 4096, V = 4.


def _lse_config(dtype: torch.dtype, dim: int) -> _Config:
    if dtype == torch.float32:  # FMA ("ieee") or TF32 dots: smaller tiles, more warps
        if dim <= 64:
            return _Config(64, 64, 64, 0, 8, 2)
        return _Config(64, 64, 32, 0, 8, 2)
    if dim <= 64:
        return _Config(64, 64, 64, 0, 4, 3)
    if dim <= 128:
        return _Config(64, 64, 128, 0, 4, 3)
    return _Config(64, 64, 64, 0, 4, 3)


def _grad_config(dtype: torch.dtype, dim: int, sm90: bool = True) -> _Config:
    """Configs whose output chunks (block_do + block_do_tail) hold all of D up to
    MAX_BLOCK_DO + MAX_BLOCK_DO_TAIL for fp32, WIDE_D for fp16/bf16 on sm_90 (512 on sm_80)."""
    if dtype == torch.float32:
        # ptxas spills the single-chunk FMA form on sm_90a; the loop form does not.
        if dim <= 64:
            return _Config(32, 32, 32, 64, 4, 2, always_chunked=True)
        if dim <= 128:   # 2 stages spill under triton 3.9
            return _Config(32, 32, 32, 128, 8, 1, always_chunked=True)
        if dim <= 256:
            return _Config(32, 32, 32, 256, 8, 2, always_chunked=True)
        if dim <= 512 or dim > MAX_BLOCK_DO + MAX_BLOCK_DO_TAIL:
            return _Config(16, 32, 32, MAX_BLOCK_DO, 8, 2, always_chunked=True)
        return _Config(16, 16, 32, MAX_BLOCK_DO, 8, 2, always_chunked=True,   # 32 keys spill
                       block_do_tail=MAX_BLOCK_DO_TAIL)
    if dim <= 64:
        return _Config(32, 64, 64, 64, 4, 2)
    if dim <= 128:   # 64-row tiles spill under triton 3.6
        return _Config(32, 64, 128, 128, 4, 2)
    if dim <= 256:
        return _Config(64, 64, 128, 256, 8, 2)
    # sm_80's mma.sync code spills the tail (44 B at 32 x 32): 512-wide chunks there.
    if dim <= 512 or not sm90:
        return _Config(32, 64, 128, MAX_BLOCK_DO, 8, 2)
    if dim <= MAX_BLOCK_DO + MAX_BLOCK_DO_TAIL:
        # 768 columns of accumulator: 32 x 32 tiles in one stage (64 keys or 2 stages spill).
        return _Config(32, 32, 128, MAX_BLOCK_DO, 8, 1, block_do_tail=MAX_BLOCK_DO_TAIL)
    # 1024 columns: 16-row tiles hold them in registers (216-232 of 255, both Tritons). Past
    # WIDE_D (a DDP rank's share: the whole batch stages dS), 1024-wide chunks halve the
    # recomputes of 512-wide ones. The fp32 FMA form spills at this width, so fp32 keeps
    # 512-wide chunks past 768.
    return _Config(16, 32, 128, MAX_BLOCK_DO, 8, 1, block_do_tail=WIDE_D - MAX_BLOCK_DO)


# The staged backward (D past a program's output chunk, see _staged_backward): plain GEMM tiles,
# dS of an anchor-row chunk at most STAGED_DS_BYTES, chunks a multiple of STAGED_CHUNK_ALIGN rows.
STAGED_DS_BYTES = 1 << 30
STAGED_CHUNK_ALIGN = 128


def _staged_ds_config(dtype: torch.dtype) -> _Config:
    """_staged_ds_kernel's tiles (block_m anchor rows x block_n view rows, block_d deep)."""
    if dtype == torch.float32:
        return _Config(64, 64, 32, 0, 4, 2)
    return _Config(128, 128, 64, 0, 8, 3)


def _staged_grad_config(dtype: torch.dtype) -> _Config:
    """_staged_grad_kernel's tiles: block_m own rows x block_do columns, block_n deep."""
    if dtype == torch.float32:   # the FMA form spills 2.4 KB at 32 deep, 4 warps
        return _Config(64, 16, 0, 64, 8, 2)
    return _Config(128, 64, 0, 128, 8, 3)


def _sm90(x: torch.Tensor) -> bool:
    """Whether the kernels compile for sm_90 or later: a CUDA tensor's device answers (the AOT
    report's capture answers its target); the interpreter takes sm_90's configs."""
    if triton_interpreter_enabled():
        return True
    return torch.cuda.get_device_capability(x.device if x.is_cuda else None)[0] >= 9


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SIG_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _operand_dtype(dtype: torch.dtype):
    """tl.dot operand type: the input dtype, except bf16 under the interpreter (no bf16 dot)."""
    if dtype == torch.bfloat16 and triton_interpreter_enabled():
        return tl.float32
    return _TL_DTYPE[dtype]


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots are exact ("ieee") unless torch allows TF32 matmuls right now."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _padded_rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels' alignment hints hold for it, else a zero-padded copy.

    The kernels take any row / view strides but promise the compiler that
    D % 16 == 0 and that every row starts 16-byte aligned (_row_starts,
    _within). Inputs that break this (an awkward D such as 1000, a sliced or
    transposed tensor) are copied once into rows padded with zeros to a
    multiple of 16, which changes no norm and no dot product.
    """
    dim = x.shape[-1]
    aligned = (x.stride(-1) == 1 and dim % 16 == 0 and x.data_ptr() % 16 == 0
               and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1]))
    if aligned:
        return x
    padded = x.new_zeros(*x.shape[:-1], triton.cdiv(dim, 16) * 16)
    padded[..., :dim] = x
    return padded


def _on_device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _inverse_norms(anchor, views):
    """rnorm [V + 1, N]: the views' inverse norms, then the anchor's; one launch."""
    num_views, n, dim = views.shape
    rnorm = torch.empty(num_views + 1, n, dtype=torch.float32, device=anchor.device)
    _inverse_norms_kernel[(triton.cdiv(n, NORMS_BLOCK_R), num_views + 1)](
        anchor, views, rnorm, n, dim, num_views, anchor.stride(0), views.stride(0),
        views.stride(1), EPS=NORM_EPS, BLOCK_R=NORMS_BLOCK_R, BLOCK_D=NORMS_BLOCK_D,
        num_warps=4)
    return rnorm


def _lse_grid(cfg: _Config, num_rows: int, num_views: int, symmetric: bool) -> tuple:
    return (triton.cdiv(num_rows, cfg.block_m), num_views, 2 if symmetric else 1)


def _grad_grid(cfg: _Config, dim: int, own_count: int, num_views: int) -> tuple:
    """(anchor row tiles, then each view's row tiles; D-chunks)."""
    return ((num_views + 1) * triton.cdiv(own_count, cfg.block_m), triton.cdiv(dim, cfg.out_chunk))


def multiview_infonce_forward(anchor: torch.Tensor, views: torch.Tensor, tau: float,
                              symmetric: bool, row_start: int = 0, num_rows: int | None = None):
    """(loss 0-dim in anchor's dtype, lse_rows [V, M], lse_cols [V, M] or [V, 0], row_terms,
    col_terms, rnorm [V + 1, N]); all but the loss fp32.

    The loss is the mean of the terms of rows [row_start, row_start + M) (all
    N by default), against all N keys: a DDP rank's share of the global loss.
    rnorm (the inverse norms of the views' rows, then the anchor's) is for the
    backward, which reuses it.
    """
    loss_dtype = anchor.dtype
    anchor, views = _padded_rows(anchor), _padded_rows(views)
    num_views, n, dim = views.shape
    num_rows = n - row_start if num_rows is None else num_rows
    device = anchor.device
    stats = dict(dtype=torch.float32, device=device)
    lse_rows, row_terms = (torch.empty(num_views, num_rows, **stats) for _ in range(2))
    lse_cols, col_terms = (torch.empty(num_views, num_rows if symmetric else 0, **stats)
                           for _ in range(2))
    loss = torch.empty((), dtype=loss_dtype, device=device)
    with _on_device(anchor):
        rnorm = _inverse_norms(anchor, views)
        cfg = _lse_config(anchor.dtype, dim)
        # Non-symmetric: the column outputs are never written; the row ones stand in.
        _lse_kernel[_lse_grid(cfg, num_rows, num_views, symmetric)](
            anchor, views, rnorm, lse_rows, lse_cols if symmetric else lse_rows, row_terms,
            col_terms if symmetric else row_terms, n, row_start, num_rows, dim, num_views,
            anchor.stride(0), views.stride(0), views.stride(1), 1.0 / tau,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            D_CHUNKED=cfg.d_chunked(dim), OPERAND=_operand_dtype(anchor.dtype),
            PRECISION=_dot_precision(anchor.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        count = num_views * num_rows
        _loss_kernel[(1,)](row_terms, col_terms, loss, count, (0.5 if symmetric else 1.0) / count,
                           SYMMETRIC=symmetric, BLOCK=LOSS_BLOCK, num_warps=4)
    return loss, lse_rows, lse_cols, row_terms, col_terms, rnorm


def multiview_infonce_backward(grad_loss: torch.Tensor, anchor: torch.Tensor, views: torch.Tensor,
                               tau: float, symmetric: bool, lse_rows: torch.Tensor,
                               lse_cols: torch.Tensor, row_terms: torch.Tensor,
                               col_terms: torch.Tensor, rnorm: torch.Tensor, row_start: int = 0):
    """(d_anchor [N, D] in anchor's dtype, d_views [V, N, D] in views' dtype).

    The statistics are the forward's (multiview_infonce_forward), for rows
    [row_start, row_start + M) (M = lse_rows.shape[1]); grad_loss is the
    0-dim gradient of the loss, in any float dtype. Every row of the inputs
    gets its gradient (rows outside the range through the softmaxes of the
    rows inside it): one launch, two for a DDP rank's share.
    """
    dim = anchor.shape[-1]
    anchor, views = _padded_rows(anchor), _padded_rows(views)
    num_views, n, padded_dim = views.shape
    num_rows = lse_rows.shape[1]
    if not symmetric:   # the column statistics are not read; the row ones stand in
        lse_cols, col_terms = lse_rows, row_terms
    d_anchor = torch.empty((n, padded_dim), dtype=anchor.dtype, device=anchor.device)
    d_views = torch.empty((num_views, n, padded_dim), dtype=views.dtype, device=views.device)
    cfg = _grad_config(anchor.dtype, padded_dim, _sm90(anchor))
    # The whole batch with D wider than a program's output chunk stages dS instead of
    # recomputing the logits once per D-chunk.
    staged = num_rows == n and padded_dim > cfg.out_chunk
    # Own rows in R, then (a DDP rank's share) the rows outside it.
    shares = [] if staged else [(own_in_r, count) for own_in_r, count in
                                ((True, num_rows), (False, n - num_rows)) if count > 0]
    with _on_device(anchor):
        if staged:
            _staged_backward(grad_loss, anchor, views, tau, symmetric, lse_rows, lse_cols,
                             row_terms, col_terms, rnorm, d_anchor, d_views)
        for own_in_r, own_count in shares:
            _grad_kernel[_grad_grid(cfg, padded_dim, own_count, num_views)](
                anchor, views, rnorm, lse_rows, lse_cols, row_terms, col_terms, grad_loss,
                d_anchor, d_views, n, row_start, num_rows, padded_dim, num_views,
                triton.cdiv(own_count, cfg.block_m), anchor.stride(0), views.stride(0),
                views.stride(1), 1.0 / tau, (0.5 if symmetric else 1.0) / (num_views * num_rows),
                SYMMETRIC=symmetric, OWN_IN_R=own_in_r, EPS=NORM_EPS,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                BLOCK_DO=cfg.block_do, BLOCK_DO_TAIL=cfg.block_do_tail,
                D_CHUNKED=cfg.d_chunked(padded_dim),
                OPERAND=_operand_dtype(anchor.dtype), PRECISION=_dot_precision(anchor.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if padded_dim != dim:  # the padding columns hold zero gradients
        d_anchor, d_views = d_anchor[:, :dim].contiguous(), d_views[..., :dim].contiguous()
    return d_anchor, d_views


def staged_chunk_rows(n: int, num_views: int, element_size: int) -> int:
    """Anchor rows per chunk of the staged backward: its dS [V, rows, N] within STAGED_DS_BYTES
    (a multiple of STAGED_CHUNK_ALIGN rows, at least one such block, at most N)."""
    rows = STAGED_DS_BYTES // (num_views * _ds_stride(n) * element_size)
    return min(n, max(STAGED_CHUNK_ALIGN, rows // STAGED_CHUNK_ALIGN * STAGED_CHUNK_ALIGN))


def _ds_stride(n: int) -> int:
    """Row stride of the staged dS: N rounded up so every row starts 16-byte aligned."""
    return triton.cdiv(n, 16) * 16


def _staged_grids(ds_cfg: _Config, grad_cfg: _Config, n: int, rows: int, dim: int,
                  num_views: int) -> tuple[tuple, tuple]:
    """Grids of one chunk of `rows` anchor rows: _staged_ds_kernel's (row tiles, view row tiles,
    V) and _staged_grad_kernel's (the chunk's anchor row tiles + every view's row tiles, D
    tiles)."""
    own_tiles = triton.cdiv(rows, grad_cfg.block_m) + num_views * triton.cdiv(n, grad_cfg.block_m)
    return ((triton.cdiv(rows, ds_cfg.block_m), triton.cdiv(n, ds_cfg.block_n), num_views),
            (own_tiles, triton.cdiv(dim, grad_cfg.block_do)))


def _staged_backward(grad_loss, anchor, views, tau, symmetric, lse_rows, lse_cols, row_terms,
                     col_terms, rnorm, d_anchor, d_views):
    """The whole-batch backward where D is wider than one program's output chunk: 3 units of
    V N^2 D instead of 2 per further D-chunk of _grad_kernel.

    Per chunk of anchor rows, _staged_ds_kernel computes each logit tile once over all of D
    and stages dS in the inputs' dtype (with the row and column partial sums of dS * S);
    _staged_grad_kernel then runs both gradient GEMMs from it, d_anchor = dS @ k_hat and
    d_views = dS^T @ a_hat, tiled over D like any GEMM. One chunk (2 launches) up to
    STAGED_DS_BYTES of dS (V N^2 <= 2^29 in a half dtype: N = 11,585 at V = 4), else 2 per
    chunk, the view gradients accumulated in fp32 between them.
    """
    num_views, n, dim = views.shape
    ds_cfg, grad_cfg = _staged_ds_config(anchor.dtype), _staged_grad_config(anchor.dtype)
    chunk_rows = staged_chunk_rows(n, num_views, anchor.element_size())
    num_chunks = triton.cdiv(n, chunk_rows)
    device = anchor.device
    f32 = dict(dtype=torch.float32, device=device)
    ds = torch.empty(num_views, chunk_rows, _ds_stride(n), dtype=anchor.dtype, device=device)
    col_tiles = triton.cdiv(n, ds_cfg.block_n)
    row_proj = torch.empty(num_views, col_tiles, chunk_rows, **f32)
    col_proj = torch.empty(num_views, triton.cdiv(chunk_rows, ds_cfg.block_m), n, **f32)
    # Several chunks: the view rows' fp32 sums and x_hat . g partials between launches.
    view_acc = torch.empty(num_views, n, dim, **f32) if num_chunks > 1 else row_proj
    view_proj = torch.empty(num_views, n, **f32) if num_chunks > 1 else row_proj
    operand, precision = _operand_dtype(anchor.dtype), _dot_precision(anchor.dtype)
    view_tiles = triton.cdiv(n, grad_cfg.block_m)
    for chunk in range(num_chunks):
        start = chunk * chunk_rows
        rows = min(chunk_rows, n - start)
        ds_grid, grad_grid = _staged_grids(ds_cfg, grad_cfg, n, rows, dim, num_views)
        row_tiles, anchor_tiles = ds_grid[0], triton.cdiv(rows, grad_cfg.block_m)
        _staged_ds_kernel[ds_grid](
            anchor, views, rnorm, lse_rows, lse_cols, row_terms, col_terms, ds, row_proj,
            col_proj, n, dim, num_views, start, rows, ds.stride(0), ds.stride(1),
            row_proj.stride(1), anchor.stride(0), views.stride(0), views.stride(1), 1.0 / tau,
            SYMMETRIC=symmetric, BLOCK_M=ds_cfg.block_m, BLOCK_N=ds_cfg.block_n,
            BLOCK_D=ds_cfg.block_d, OPERAND=operand, PRECISION=precision,
            num_warps=ds_cfg.num_warps, num_stages=ds_cfg.num_stages)
        _staged_grad_kernel[grad_grid](
            anchor, views, rnorm, ds, row_proj, col_proj, view_acc, view_proj, grad_loss,
            d_anchor, d_views, n, dim, num_views, start, rows, chunk, num_chunks, anchor_tiles,
            view_tiles, col_tiles, row_tiles, ds.stride(0), ds.stride(1), row_proj.stride(1),
            anchor.stride(0), views.stride(0), views.stride(1), 1.0 / tau,
            (0.5 if symmetric else 1.0) / (num_views * n), EPS=NORM_EPS,
            BLOCK_M=grad_cfg.block_m, BLOCK_K=grad_cfg.block_n, BLOCK_DO=grad_cfg.block_do,
            OPERAND=operand, PRECISION=precision,
            num_warps=grad_cfg.num_warps, num_stages=grad_cfg.num_stages)


# ----------------------------------------------------------------------------
# Ahead-of-time compile declarations.
# ----------------------------------------------------------------------------

def _dtype_modes():
    """(input dtype, dot precision) pairs a GPU launch can use."""
    return [(torch.float32, "ieee"), (torch.float32, "tf32"),
            (torch.float16, "ieee"), (torch.bfloat16, "ieee")]


_FLOAT_ARGS = {"inv_tau", "grad_scale", "weight"}


def _signature(fn, constexprs, input_type, input_ptrs):
    """Triton types of fn's runtime arguments: input_ptrs point at the input dtype, other
    pointers at fp32, _FLOAT_ARGS are fp32 and every other argument an i32."""
    def arg_type(name):
        if name in input_ptrs:
            return f"*{input_type}"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in _FLOAT_ARGS else "i32"
    return {name: arg_type(name) for name in fn.arg_names if name not in constexprs}


def _grad_variants():
    """(SYMMETRIC, OWN_IN_R) of every gradient launch: own rows in R, then outside R (a DDP
    rank's share)."""
    return list(itertools.product((False, True), (True, False)))


def aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = _SIG_DTYPE[dtype]
        constexprs = {"EPS": NORM_EPS, "BLOCK_R": NORMS_BLOCK_R, "BLOCK_D": NORMS_BLOCK_D}
        specs.append(KernelSpec(
            name=f"multiview_inverse_norms[{t}]", fn=_inverse_norms_kernel,
            signature=_signature(_inverse_norms_kernel, constexprs, t, {"anchor_ptr", "views_ptr"}),
            constexprs=constexprs, num_warps=4, num_stages=3))
        for symmetric in (False, True):
            constexprs = {"SYMMETRIC": symmetric, "BLOCK": LOSS_BLOCK}
            specs.append(KernelSpec(
                name=f"multiview_loss[{t},SYMMETRIC={symmetric}]", fn=_loss_kernel,
                signature=_signature(_loss_kernel, constexprs, t, {"loss_ptr"}),
                constexprs=constexprs, num_warps=4, num_stages=3))
    for dtype, precision in _dtype_modes():
        t = _SIG_DTYPE[dtype]
        seen_lse, seen_grad = set(), set()
        for dim in D_BUCKETS:
            cfg = _lse_config(dtype, dim)
            chunked = cfg.d_chunked(dim)
            if (cfg, chunked) not in seen_lse:
                seen_lse.add((cfg, chunked))
                constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                              "BLOCK_D": cfg.block_d, "D_CHUNKED": chunked,
                              "OPERAND": _TL_DTYPE[dtype], "PRECISION": precision}
                specs.append(KernelSpec(
                    name=(f"multiview_lse[{t},{precision},BLOCK_M={cfg.block_m},"
                          f"BLOCK_N={cfg.block_n},BLOCK_D={cfg.block_d},D_CHUNKED={chunked}]"),
                    fn=_lse_kernel,
                    signature=_signature(_lse_kernel, constexprs, t, {"anchor_ptr", "views_ptr"}),
                    constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            for cfg in dict.fromkeys(_grad_config(dtype, dim, sm90) for sm90 in (True, False)):
                specs += _grad_specs(cfg, cfg.d_chunked(dim), dtype, precision, seen_grad)
        specs += _staged_specs(dtype, precision)
    return specs


def _staged_specs(dtype, precision: str) -> list:
    """The staged backward's two kernels in one dtype mode (_staged_ds_kernel per SYMMETRIC)."""
    t = _SIG_DTYPE[dtype]
    ds_cfg, grad_cfg = _staged_ds_config(dtype), _staged_grad_config(dtype)
    specs = []
    for symmetric in (False, True):
        constexprs = {"SYMMETRIC": symmetric, "BLOCK_M": ds_cfg.block_m,
                      "BLOCK_N": ds_cfg.block_n, "BLOCK_D": ds_cfg.block_d,
                      "OPERAND": _TL_DTYPE[dtype], "PRECISION": precision}
        specs.append(KernelSpec(
            name=f"multiview_staged_ds[{t},{precision},SYMMETRIC={symmetric}]",
            fn=_staged_ds_kernel,
            signature=_signature(_staged_ds_kernel, constexprs, t,
                                 {"anchor_ptr", "views_ptr", "ds_ptr"}),
            constexprs=constexprs, num_warps=ds_cfg.num_warps, num_stages=ds_cfg.num_stages))
    constexprs = {"EPS": NORM_EPS, "BLOCK_M": grad_cfg.block_m, "BLOCK_K": grad_cfg.block_n,
                  "BLOCK_DO": grad_cfg.block_do, "OPERAND": _TL_DTYPE[dtype],
                  "PRECISION": precision}
    specs.append(KernelSpec(
        name=f"multiview_staged_grad[{t},{precision}]", fn=_staged_grad_kernel,
        signature=_signature(_staged_grad_kernel, constexprs, t,
                             _GRAD_INPUT_PTRS | {"ds_ptr"}),
        constexprs=constexprs, num_warps=grad_cfg.num_warps, num_stages=grad_cfg.num_stages))
    return specs


def _grad_specs(cfg: _Config, chunked: bool, dtype, precision: str, seen: set) -> list:
    """The gradient kernel's specs of one config, every (SYMMETRIC, OWN_IN_R); none if seen."""
    if (cfg, chunked) in seen:
        return []
    seen.add((cfg, chunked))
    t = _SIG_DTYPE[dtype]
    specs = []
    for symmetric, own_in_r in _grad_variants():
        constexprs = {"SYMMETRIC": symmetric, "OWN_IN_R": own_in_r, "EPS": NORM_EPS,
                      "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                      "BLOCK_D": cfg.block_d, "BLOCK_DO": cfg.block_do,
                      "BLOCK_DO_TAIL": cfg.block_do_tail,
                      "D_CHUNKED": chunked, "OPERAND": _TL_DTYPE[dtype],
                      "PRECISION": precision}
        specs.append(KernelSpec(
            name=(f"multiview_grad[{t},{precision},SYMMETRIC={symmetric},"
                  f"OWN_IN_R={own_in_r},BLOCK_M={cfg.block_m},BLOCK_N={cfg.block_n},"
                  f"BLOCK_D={cfg.block_d},BLOCK_DO={cfg.block_do},"
                  f"BLOCK_DO_TAIL={cfg.block_do_tail},D_CHUNKED={chunked}]"),
            fn=_grad_kernel,
            signature=_signature(_grad_kernel, constexprs, t, _GRAD_INPUT_PTRS),
            constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return specs


_GRAD_INPUT_PTRS = {"anchor_ptr", "views_ptr", "grad_loss_ptr", "d_anchor_ptr", "d_views_ptr"}


def aot_launches():
    """Forward + backward at the benchmark shapes (N = 32, 4096, 65536; V = 4; D = 768), the
    structure test's (N = 256, D = 128), the widest one-chunk D (N = 4096, D = 1024) and the
    staged backward in one chunk and in many (D = 2048, N = 4096 and 65536) in every dtype
    mode, one- and two-directional, and the row share of DDP rank 1 of 2 at N = 4096."""
    from mvcl_fast.kernels.aot import DTYPE_MODES, matmul_tf32, mode_name

    def step(n, dim, dtype, tf32, symmetric, ranks=1):
        def launch():
            anchor = torch.empty(n, dim, dtype=dtype)
            views = torch.empty(4, n, dim, dtype=dtype)
            row_start = n - n // ranks
            with matmul_tf32(tf32):
                loss, *stats = multiview_infonce_forward(anchor, views, 0.1, symmetric, row_start,
                                                         n // ranks)
                # The gradient of the loss comes in the loss's dtype (the input's).
                multiview_infonce_backward(torch.ones_like(loss), anchor, views, 0.1, symmetric,
                                           *stats, row_start=row_start)
        return launch

    launches = []
    for dtype, tf32 in DTYPE_MODES:
        for symmetric in (False, True):
            tag = f"{mode_name(dtype, tf32)}{',symmetric' if symmetric else ''}"
            launches += [(f"multiview[N={n},D={dim},{tag}]", step(n, dim, dtype, tf32, symmetric))
                         for n, dim in ((32, 768), (4096, 768), (65536, 768), (256, 128),
                                        (4096, 1024), (4096, 2048), (65536, 2048))]
            launches.append((f"multiview[N=4096,D=768,rank 1 of 2,{tag}]",
                             step(4096, 768, dtype, tf32, symmetric, ranks=2)))
    return launches
