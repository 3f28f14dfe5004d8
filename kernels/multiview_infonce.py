"""Fused multi-view InfoNCE: forward and backward without the N x N logits.

For each view v, S_v = norm(anchor) norm(views_v)^T / tau and the loss is the
mean over views of mean_i (lse_i(S_v) - S_v[i, i]); symmetric=True averages
that with the same term over the columns of S_v (SPEC op 3). Only O(N)
statistics ever reach memory: inverse row norms, per-row loss terms and the
row (and column) log-sum-exps; the op saves the inputs, the log-sum-exps and
the per-row terms.

Normalisation is fused, not materialised: ``_inverse_norms_kernel`` computes
1 / max(||x||, 1e-12) for every anchor and view row (one launch); the tile
kernels take dot products of the *raw* rows and scale each logit by the two
inverse norms. No normalised copy of the inputs is written or read back, and
half-precision inputs are not rounded again after normalisation (their
products are exact in the fp32 accumulator).

Forward: 3 launches (4 when symmetric).
  1. ``_inverse_norms_kernel``, grid (row tiles, V + 1).
  2. ``_lse_kernel``, grid (row tiles, V), all views in one launch: each
     program owns BLOCK_M anchor rows of one view and streams that view's
     rows in BLOCK_N tiles with an online log-sum-exp (running max, exp2 of
     differences taken in natural units); D is reduced in BLOCK_D chunks (the
     program's first chunk of its own rows stays in registers). The positive
     S_ii comes from the same tile values (the diagonal), and the per-row
     term lse - S_ii is formed with log1p from the off-diagonal mass, so it
     keeps full relative precision when the loss is small (where
     lse - positive in fp32 cancels). Writes lse_rows and the row terms.
  3. symmetric only: the same ``_lse_kernel`` with queries and keys swapped
     (pointers and strides; a zero view stride shares the anchor between
     views): lse_cols and the column terms.
  4. ``_loss_kernel``, one program: the weighted sum of the terms
     (deterministic, no atomics).

Backward: 3 kernel launches, 5 for a DDP rank's share (plus the elementwise
expm1 of the [V, N] terms for the diagonal, below). ``_inverse_norms_kernel``
again, then ``_grad_kernel`` twice, the split of FlashAttention's dQ vs
dK/dV kernels and Inf-CL's: once owning anchor row tiles and looping over the rows of every view, once owning
the row tiles of one view and looping over the anchor rows. Each program
recomputes its logit tiles, forms dS = (P_row - I) [+ (P_col - I)] and
accumulates dS @ rows_hat for its own rows only: no atomics, deterministic,
every output element written by exactly one program. The chain through the
L2 normalisation, dx = (g - x_hat (x_hat . g)) / max(||x||, 1e-12), needs
x_hat . g over the whole row, which equals sum_j dS_ij S_ij (because
x_hat . k_hat_j = tau S_ij): every program accumulates it from its tiles, so
the output may be split into D-chunks (grid axis 1, BLOCK_DO wide) that each
finish the chain in their epilogue. For D <= 256 (half) or 64/128 (fp32)
there is one D-chunk; above that each chunk recomputes the logits, trading
flops for registers rather than read-modify-writes of an fp32 scratch (the
Inf-CL way).

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
forward's term instead (one [V, M] tensor), so the gradients keep their relative precision there
too (see tests/test_multiview_kernels.py).

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
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mvcl_fast.kernels.aot import KernelSpec

NORM_EPS = 1e-12  # as F.normalize and mvcl_fast.reference
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _row_starts(base, rows, stride_row):
    """[R, 1] pointers to the starts of rows (int64 offsets).

    The launcher promises 16-byte aligned row starts (see _padded_rows); the
    hint lets every compile, JIT or ahead-of-time, vectorise the row loads.
    """
    return tl.multiple_of(base + rows.to(tl.int64)[:, None] * stride_row, [16, 1])


@triton.jit
def _within(offs, D):
    """[1, B] mask offs < D, with D a multiple of 16 (padded by the launcher)."""
    return offs[None, :] < tl.multiple_of(tl.full([1, offs.shape[0]], D, tl.int32), [1, 16])


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
def _lse_kernel(q_ptr, k_ptr, q_rnorm_ptr, k_rnorm_ptr, lse_ptr, term_ptr,
                N, row_start, num_rows, D, q_stride_view, q_stride_row, k_stride_view, k_stride_row,
                q_rnorm_stride_view, k_rnorm_stride_view, inv_tau,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                D_CHUNKED: tl.constexpr, OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """For BLOCK_M query rows i of view v: lse[v, i] = logsumexp_j S_ij and term[v, i] = lse - S_ii.

    S_ij = q_hat_i . k_hat_j / tau over all N keys j, for the query rows i in
    [row_start, row_start + num_rows) (all N but for a DDP rank's own rows);
    lse and term are indexed by i - row_start. Row pass: q = anchor (view
    stride 0), k = views; column pass: the reverse. The positive S_ii is taken from the same
    tile values as the log-sum-exp and the sum leaves it out, so that
    term = (m - S_ii) + log1p(exp(S_ii - m) - 1 + sum_{j != i} exp(S_ij - m))
    keeps full relative precision when the loss is small (lse ~ S_ii).
    """
    pid_m = tl.program_id(0)
    v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)        # local: i - row_start
    q_rows_idx = row_start + tl.minimum(rows, num_rows - 1)
    q_rows = _row_starts(q_ptr + v.to(tl.int64) * q_stride_view, q_rows_idx, q_stride_row)
    k_base = k_ptr + v.to(tl.int64) * k_stride_view
    offs_d = tl.arange(0, BLOCK_D)
    first_d = _within(offs_d, D)
    q_first = tl.load(q_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
    q_scale = tl.load(q_rnorm_ptr + v * q_rnorm_stride_view + q_rows_idx) * inv_tau
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    off_diagonal = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_{j != i} exp(S_ij - running_max)
    positive = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)            # rotated: the positive is column i
        k_rows_idx = _rotated_rows(cols, row_start, N)
        k_rows = _row_starts(k_base, k_rows_idx, k_stride_row)
        k_first = tl.load(k_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
        dots = _row_dots(q_first, k_first, q_rows, k_rows, D, BLOCK_D, D_CHUNKED, OPERAND, PRECISION)
        k_rnorm = tl.load(k_rnorm_ptr + v * k_rnorm_stride_view + k_rows_idx)
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
    tl.store(lse_ptr + v * num_rows + rows, positive + term, mask=rows < num_rows)
    tl.store(term_ptr + v * num_rows + rows, term, mask=rows < num_rows)


@triton.jit
def _grad_kernel(own_ptr, other_ptr, own_rnorm_ptr, other_rnorm_ptr, own_lse_ptr, other_lse_ptr,
                 diagonal_ptr, grad_loss_ptr, out_ptr,
                 N, row_start, num_rows, D, loop_views, own_stride_view, own_stride_row,
                 other_stride_view, other_stride_row, own_rnorm_stride_view,
                 other_rnorm_stride_view, out_stride_view, inv_tau, grad_scale,
                 OWN_LSE: tl.constexpr, OTHER_LSE: tl.constexpr, OWN_IN_R: tl.constexpr,
                 EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, D_CHUNKED: tl.constexpr,
                 OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """Gradient of the loss w.r.t. BLOCK_M "own" rows, D-chunk pid_do, in the own rows' dtype.

    Anchor launch: own = anchor, other = every view (loop_views = V, grid
    axis 2 = 1). Views launch: own = view pid_v, other = anchor (loop_views = 1,
    grid axis 2 = V). OWN_LSE / OTHER_LSE say which softmax directions exist:
    the row lse belongs to anchor rows, the column lse (symmetric) to view rows.

    Only the rows R = [row_start, row_start + M) have a softmax in the loss
    (all N, or a DDP rank's own rows), so dS_ij = [i in R](P_own_ij - I_ij)
    + [j in R](P_other_ij - I_ij), and each launch covers one kind of own row:
    OWN_IN_R: own rows in R, visiting the other rows from row_start on with
    wrap-around (all N with OWN_LSE, else only R); in these rotated
    coordinates the identity is the tile diagonal, which the compiler keeps
    cheap. Not OWN_IN_R (only with OTHER_LSE): the N - M own rows outside R,
    against the other rows in R only, where the identity is never hit.
    A rank's share thus costs O(M N), not O(N^2).

    The diagonal dS_ii is not formed from the recomputed S_ii and the stored
    lse (P_ii - 1 cancels when the loss is small) but read from diagonal_ptr
    [V, M]: sum over the directions of expm1(-term_i), from the forward's
    precise terms lse_i - S_ii.
    """
    pid_m = tl.program_id(0)
    pid_do = tl.program_id(1)
    pid_v = tl.program_id(2)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past the end repeat the last one (loads stay in bounds; the store is masked).
    if OWN_IN_R:
        valid = local < num_rows
        local = tl.minimum(local, num_rows - 1)
        rows = row_start + local
        if OWN_LSE:
            loop_len = N
        else:
            loop_len = num_rows
    else:
        valid = local < N - num_rows
        local = tl.minimum(local, N - num_rows - 1)
        rows = tl.where(local < row_start, local, local + num_rows)
        loop_len = num_rows
    own_rows = _row_starts(own_ptr + pid_v.to(tl.int64) * own_stride_view, rows,
                           own_stride_row)
    own_rnorm = tl.load(own_rnorm_ptr + pid_v * own_rnorm_stride_view + rows)
    q_scale = own_rnorm * inv_tau
    offs_d = tl.arange(0, BLOCK_D)
    first_d = _within(offs_d, D)
    q_first = tl.load(own_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_d = _within(offs_do, D)
    # Both accumulators are in units of g / (V M) (applied in the epilogue):
    # acc = sum_j dS_ij k_hat_j, proj = sum_j dS_ij S_ij.
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    proj = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(loop_views):
        v = pid_v + i
        other_base = other_ptr + v.to(tl.int64) * other_stride_view
        if OWN_IN_R:
            diagonal = tl.load(diagonal_ptr + v * num_rows + local)
        if OWN_LSE:
            own_lse = tl.load(own_lse_ptr + v * num_rows + local)
        for start in range(0, loop_len, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)            # rotated: other row row_start + cols
            other_rows_idx = _rotated_rows(cols, row_start, N)
            other_rows = _row_starts(other_base, other_rows_idx, other_stride_row)
            k_first = tl.load(other_rows + offs_d[None, :], mask=first_d, other=0.0).to(OPERAND)
            dots = _row_dots(q_first, k_first, own_rows, other_rows, D, BLOCK_D, D_CHUNKED,
                             OPERAND, PRECISION)
            other_rnorm = tl.load(other_rnorm_ptr + v * other_rnorm_stride_view + other_rows_idx)
            logits = dots * q_scale[:, None] * other_rnorm[None, :]
            probs = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if OWN_LSE:
                probs += tl.exp2((logits - own_lse[:, None]) * LOG2E)
            if OTHER_LSE:   # +inf past R: those columns have no softmax (P = 0)
                other_lse = tl.load(other_lse_ptr + v * num_rows + cols, mask=cols < num_rows,
                                    other=float("inf"))
                probs += tl.exp2((logits - other_lse[None, :]) * LOG2E)
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
    scale = tl.load(grad_loss_ptr) * grad_scale
    grad_hat = acc * (scale * inv_tau)
    # x_hat . grad_hat = sum_j dS_ij S_ij; no projection where the norm was clamped.
    radial = tl.where(own_rnorm < 1.0 / EPS, proj * scale, 0.0)
    own = tl.load(own_rows + offs_do[None, :], mask=out_d, other=0.0).to(tl.float32)
    grad = (grad_hat - own * (own_rnorm * radial)[:, None]) * own_rnorm[:, None]
    out = _row_starts(out_ptr + pid_v.to(tl.int64) * out_stride_view, rows, D) + offs_do[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=valid[:, None] & out_d)


@triton.jit
def _loss_kernel(row_terms_ptr, col_terms_ptr, loss_ptr, count, weight,
                 SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr):
    """loss = weight * (sum of the row terms [+ the column terms]); one program, no atomics."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.load(row_terms_ptr + offs, mask=offs < count, other=0.0)
        if SYMMETRIC:
            total += tl.load(col_terms_ptr + offs, mask=offs < count, other=0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * weight)


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

    def d_chunked(self, dim: int) -> bool:
        return self.always_chunked or dim > self.block_d


NORMS_BLOCK_R, NORMS_BLOCK_D = 8, 128
LOSS_BLOCK = 1024
# One representative D per bucket: the configs below are constant inside each.
D_BUCKETS = (32, 64, 128, 4096)


def _lse_config(dtype: torch.dtype, dim: int) -> _Config:
    if dtype == torch.float32:  # FMA ("ieee") or TF32 dots: smaller tiles, more warps
        if dim <= 64:
            return _Config(64, 64, 64, 0, 8, 2)
        return _Config(64, 64, 32, 0, 8, 2)
    if dim <= 64:
        return _Config(128, 64, 64, 0, 4, 3)
    if dim <= 128:
        return _Config(128, 64, 128, 0, 8, 3)
    return _Config(128, 64, 64, 0, 8, 3)


def _grad_config(dtype: torch.dtype, dim: int) -> _Config:
    if dtype == torch.float32:
        # ptxas spills the single-chunk FMA form on sm_90a; the loop form does not.
        return _Config(32, 32, 32, 64 if dim <= 64 else 128, 4, 2, always_chunked=True)
    if dim <= 64:   # 8 warps: at 4, ptxas spills the symmetric form on sm_80 (same occupancy)
        return _Config(64, 64, 64, 64, 8, 2)
    if dim <= 128:
        return _Config(64, 64, 128, 128, 8, 2)
    return _Config(64, 64, 128, 256, 8, 2)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SIG_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _operand_dtype(dtype: torch.dtype):
    """tl.dot operand type: the input dtype, except bf16 under the interpreter (no bf16 dot)."""
    if dtype == torch.bfloat16 and _interpreting():
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
    """(anchor rnorm [N], views rnorm [V, N]): views of one [V + 1, N] buffer, one launch."""
    num_views, n, dim = views.shape
    rnorm = torch.empty(num_views + 1, n, dtype=torch.float32, device=anchor.device)
    _inverse_norms_kernel[(triton.cdiv(n, NORMS_BLOCK_R), num_views + 1)](
        anchor, views, rnorm, n, dim, num_views, anchor.stride(0), views.stride(0),
        views.stride(1), EPS=NORM_EPS, BLOCK_R=NORMS_BLOCK_R, BLOCK_D=NORMS_BLOCK_D,
        num_warps=4)
    return rnorm[num_views], rnorm[:num_views]


def _launch_lse(queries, keys, q_rnorm, k_rnorm, q_stride_view, k_stride_view,
                q_rnorm_stride_view, k_rnorm_stride_view, num_views, tau, row_start, num_rows):
    """(lse [V, M], term [V, M]) of the softmax over all keys for query rows row_start + [0, M)."""
    n, dim = queries.shape[-2], queries.shape[-1]
    lse = torch.empty(num_views, num_rows, dtype=torch.float32, device=queries.device)
    term = torch.empty(num_views, num_rows, dtype=torch.float32, device=queries.device)
    cfg = _lse_config(queries.dtype, dim)
    _lse_kernel[(triton.cdiv(num_rows, cfg.block_m), num_views)](
        queries, keys, q_rnorm, k_rnorm, lse, term,
        n, row_start, num_rows, dim, q_stride_view, queries.stride(-2), k_stride_view,
        keys.stride(-2),
        q_rnorm_stride_view, k_rnorm_stride_view, 1.0 / tau,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        D_CHUNKED=cfg.d_chunked(dim), OPERAND=_operand_dtype(queries.dtype),
        PRECISION=_dot_precision(queries.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return lse, term


def multiview_infonce_forward(anchor: torch.Tensor, views: torch.Tensor, tau: float,
                              symmetric: bool, row_start: int = 0, num_rows: int | None = None):
    """(loss 0-dim, lse_rows [V, M], lse_cols [V, M] or [V, 0], row_terms, col_terms), fp32.

    The loss is the mean of the terms of rows [row_start, row_start + M) (all
    N by default), against all N keys: a DDP rank's share of the global loss.
    """
    anchor, views = _padded_rows(anchor), _padded_rows(views)
    num_views, n, _ = views.shape
    num_rows = n - row_start if num_rows is None else num_rows
    device = anchor.device
    with _on_device(anchor):
        anchor_rnorm, view_rnorm = _inverse_norms(anchor, views)
        lse_rows, row_terms = _launch_lse(anchor, views, anchor_rnorm, view_rnorm,
                                          0, views.stride(0), 0, n, num_views, tau,
                                          row_start, num_rows)
        if symmetric:  # the same kernel with queries and keys swapped
            lse_cols, col_terms = _launch_lse(views, anchor, view_rnorm, anchor_rnorm,
                                              views.stride(0), 0, n, 0, num_views, tau,
                                              row_start, num_rows)
        else:
            lse_cols, col_terms = (torch.empty(num_views, 0, dtype=torch.float32, device=device)
                                   for _ in range(2))
        loss = torch.empty((), dtype=torch.float32, device=device)
        count = num_views * num_rows
        _loss_kernel[(1,)](row_terms, col_terms, loss, count, (0.5 if symmetric else 1.0) / count,
                           SYMMETRIC=symmetric, BLOCK=LOSS_BLOCK, num_warps=4)
    return loss, lse_rows, lse_cols, row_terms, col_terms


def _launch_grad(own, other, own_rnorm, other_rnorm, own_lse, other_lse, diagonal, grad_loss, out,
                 *, grid_views, loop_views, own_stride_view, other_stride_view,
                 own_rnorm_stride_view, other_rnorm_stride_view, out_stride_view,
                 use_own_lse, use_other_lse, tau, grad_scale, row_start, num_rows, own_in_r):
    """Gradients of the own rows in R (own_in_r) or of those outside it, into out."""
    n, dim = own.shape[-2], own.shape[-1]
    own_count = num_rows if own_in_r else n - num_rows
    if own_count == 0:
        return
    use_own_lse = use_own_lse and own_in_r   # rows outside R have no softmax of their own
    cfg = _grad_config(own.dtype, dim)
    grid = (triton.cdiv(own_count, cfg.block_m), triton.cdiv(dim, cfg.block_do), grid_views)
    _grad_kernel[grid](
        own, other, own_rnorm, other_rnorm, own_lse, other_lse, diagonal, grad_loss, out,
        n, row_start, num_rows, dim, loop_views, own_stride_view, own.stride(-2),
        other_stride_view, other.stride(-2), own_rnorm_stride_view, other_rnorm_stride_view,
        out_stride_view, 1.0 / tau, grad_scale,
        OWN_LSE=use_own_lse, OTHER_LSE=use_other_lse, OWN_IN_R=own_in_r, EPS=NORM_EPS,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_DO=cfg.block_do,
        D_CHUNKED=cfg.d_chunked(dim), OPERAND=_operand_dtype(own.dtype),
        PRECISION=_dot_precision(own.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def multiview_infonce_backward(grad_loss: torch.Tensor, anchor: torch.Tensor, views: torch.Tensor,
                               tau: float, symmetric: bool, lse_rows: torch.Tensor,
                               lse_cols: torch.Tensor, row_terms: torch.Tensor,
                               col_terms: torch.Tensor, row_start: int = 0):
    """(d_anchor [N, D] in anchor's dtype, d_views [V, N, D] in views' dtype).

    The log-sum-exps and terms belong to rows [row_start, row_start + M) (M =
    lse_rows.shape[1]), as multiview_infonce_forward returned them; every row
    of the inputs gets its gradient (rows outside the range through the
    softmaxes of the rows inside it).
    """
    dim = anchor.shape[-1]
    anchor, views = _padded_rows(anchor), _padded_rows(views)
    num_views, n, padded_dim = views.shape
    num_rows = lse_rows.shape[1]
    grad_loss = grad_loss.to(device=anchor.device, dtype=torch.float32).contiguous()
    lse_rows = lse_rows.contiguous()
    lse_cols = lse_cols.contiguous() if symmetric else lse_rows   # not read unless symmetric
    # dS_ii = sum over directions of P_ii - 1 = expm1(-term): exact where the loss is tiny.
    diagonal = torch.expm1(-row_terms)
    if symmetric:
        diagonal = diagonal + torch.expm1(-col_terms)
    diagonal = diagonal.contiguous()
    grad_scale = (0.5 if symmetric else 1.0) / (num_views * num_rows)
    with _on_device(anchor):
        anchor_rnorm, view_rnorm = _inverse_norms(anchor, views)
        d_anchor = torch.empty((n, padded_dim), dtype=anchor.dtype, device=anchor.device)
        d_views = torch.empty((num_views, n, padded_dim), dtype=views.dtype, device=views.device)
        if not symmetric and num_rows < n:   # anchor rows outside R are in no softmax
            d_anchor[:row_start].zero_()
            d_anchor[row_start + num_rows:].zero_()
        common = dict(tau=tau, grad_scale=grad_scale, row_start=row_start, num_rows=num_rows)
        for own_in_r in (True, False):
            # Own = anchor rows; loop over the rows of every view. Outside R
            # only the column softmaxes (symmetric) reach them.
            if own_in_r or symmetric:
                _launch_grad(anchor, views, anchor_rnorm, view_rnorm, lse_rows, lse_cols,
                             diagonal, grad_loss, d_anchor, grid_views=1, loop_views=num_views,
                             own_stride_view=0, other_stride_view=views.stride(0),
                             own_rnorm_stride_view=0, other_rnorm_stride_view=n,
                             out_stride_view=0, use_own_lse=True, use_other_lse=symmetric,
                             own_in_r=own_in_r, **common)
            # Own = rows of view pid_v; loop over the anchor rows.
            _launch_grad(views, anchor, view_rnorm, anchor_rnorm, lse_cols, lse_rows, diagonal,
                         grad_loss, d_views, grid_views=num_views, loop_views=1,
                         own_stride_view=views.stride(0), other_stride_view=0,
                         own_rnorm_stride_view=n, other_rnorm_stride_view=0,
                         out_stride_view=n * padded_dim, use_own_lse=symmetric,
                         use_other_lse=True, own_in_r=own_in_r, **common)
    if padded_dim != dim:  # the padding columns hold zero gradients
        d_anchor, d_views = d_anchor[:, :dim].contiguous(), d_views[..., :dim].contiguous()
    return d_anchor, d_views


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


def aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = _SIG_DTYPE[dtype]
        constexprs = {"EPS": NORM_EPS, "BLOCK_R": NORMS_BLOCK_R, "BLOCK_D": NORMS_BLOCK_D}
        specs.append(KernelSpec(
            name=f"multiview_inverse_norms[{t}]", fn=_inverse_norms_kernel,
            signature=_signature(_inverse_norms_kernel, constexprs, t, {"anchor_ptr", "views_ptr"}),
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
                    signature=_signature(_lse_kernel, constexprs, t, {"q_ptr", "k_ptr"}),
                    constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            cfg = _grad_config(dtype, dim)
            chunked = cfg.d_chunked(dim)
            if (cfg, chunked) in seen_grad:
                continue
            seen_grad.add((cfg, chunked))
            # Own rows in R: (anchor, non-symmetric), (views, non-symmetric), symmetric (both).
            # Own rows outside R (a DDP rank's share): the other direction's softmax only.
            for own_lse, other_lse, in_r in ((True, False, True), (False, True, True),
                                             (True, True, True), (False, True, False)):
                constexprs = {"OWN_LSE": own_lse, "OTHER_LSE": other_lse, "OWN_IN_R": in_r,
                              "EPS": NORM_EPS,
                              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                              "BLOCK_D": cfg.block_d, "BLOCK_DO": cfg.block_do,
                              "D_CHUNKED": chunked, "OPERAND": _TL_DTYPE[dtype],
                              "PRECISION": precision}
                specs.append(KernelSpec(
                    name=(f"multiview_grad[{t},{precision},OWN_LSE={own_lse},"
                          f"OTHER_LSE={other_lse},OWN_IN_R={in_r},BLOCK_M={cfg.block_m},"
                          f"BLOCK_N={cfg.block_n},"
                          f"BLOCK_D={cfg.block_d},BLOCK_DO={cfg.block_do},D_CHUNKED={chunked}]"),
                    fn=_grad_kernel,
                    signature=_signature(_grad_kernel, constexprs, t,
                                         {"own_ptr", "other_ptr", "out_ptr"}),
                    constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    for symmetric in (False, True):
        constexprs = {"SYMMETRIC": symmetric, "BLOCK": LOSS_BLOCK}
        specs.append(KernelSpec(
            name=f"multiview_loss[SYMMETRIC={symmetric}]", fn=_loss_kernel,
            signature=_signature(_loss_kernel, constexprs, "fp32", set()),
            constexprs=constexprs, num_warps=4, num_stages=3))
    return specs


def aot_launches():
    """Forward + backward at the benchmark shapes (N = 32, 4096, 65536; V = 4; D = 768) in every
    dtype mode, one- and two-directional, and the row share of DDP rank 1 of 2 at N = 4096."""
    from mvcl_fast.kernels.aot import DTYPE_MODES, matmul_tf32, mode_name

    def step(n, dtype, tf32, symmetric, ranks=1):
        def launch():
            anchor = torch.empty(n, 768, dtype=dtype)
            views = torch.empty(4, n, 768, dtype=dtype)
            row_start = n - n // ranks
            with matmul_tf32(tf32):
                _, *stats = multiview_infonce_forward(anchor, views, 0.1, symmetric, row_start,
                                                      n // ranks)
                multiview_infonce_backward(torch.ones(()), anchor, views, 0.1, symmetric, *stats,
                                           row_start=row_start)
        return launch

    launches = []
    for dtype, tf32 in DTYPE_MODES:
        for symmetric in (False, True):
            tag = f"{mode_name(dtype, tf32)}{',symmetric' if symmetric else ''}"
            launches += [(f"multiview[N={n},{tag}]", step(n, dtype, tf32, symmetric))
                         for n in (32, 4096, 65536)]
            launches.append((f"multiview[N=4096,rank 1 of 2,{tag}]",
                             step(4096, dtype, tf32, symmetric, ranks=2)))
    return launches
