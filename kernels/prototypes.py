"""Fused Triton kernels for batch prototypes (scatter-mean) and prototype InfoNCE.

Scatter-mean (SPEC op 1), z [N, D], y [N] -> P [C, D], counts [C]:
- default: one pass over z, fp32 atomics into a zeroed [C, D] sum buffer and
  an int32 count buffer, then a small kernel divides and casts (1 memset +
  2 kernels);
- deterministic: rows sorted by label (torch.sort, stable; segment bounds by
  torch.searchsorted, no host sync), then one program per (class, D chunk)
  sums its segment in row order: no float atomics, bitwise reproducible
  (a few torch launches + 1 kernel);
- backward: one gather kernel, dz_i = dP_{y_i} / count_{y_i}.

Prototype InfoNCE (SPEC op 2), z [V, N, D] with all views in one launch,
row r = v * N + n:
- The L2 normalisation is fused: raw z and raw P tiles go into tl.dot and the
  products are scaled afterwards, L_rc = (z_r . p_c) / (max(|z_r|, eps)
  max(|p_c|, eps) tau). Half inputs thus reach the tensor cores unrounded
  (exact products, fp32 accumulation) and nothing normalised is written.
- Forward (1 kernel + torch's sum of the partials): one program per row tile,
  online log-sum-exp in base 2 over class tiles, the squared norms of rows and
  classes taken from the tiles the dot loads. Writes lse [V, N] and one loss
  partial per program, summed in a fixed order (no atomics).
- Backward, no atomics, FlashAttention-style split (the dz kernel owns row
  tiles, the dP kernel owns class tiles and loops over row tiles):
  1. norms: |z_r| and |p_c|, so the logits loop below is a plain GEMM loop;
  then per pass over the rows (one pass unless G would exceed G_PASS_BYTES):
  2. logit-grad: one program per row tile recomputes the logits once (from
     the saved lse) and writes G = dLoss/dlogit = (softmax - onehot) grad / (V N)
     for the pass's rows, [rows, C] fp32, and z_hat . dz_hat = sum_c G L per
     row. Only G, never the logits, and bounded by G_PASS_BYTES;
  3. dz (GEMM G P_hat / tau): a program owns (row tile, D-out chunk), loops over
     class tiles, then applies the normalisation's Jacobian,
     dz = (dz_hat - z_hat (z_hat . dz_hat)) / max(|z|, eps), the radial term
     dropped below eps as clamp_min's gradient does;
  4. dP partials (GEMM G^T z_hat): a program owns (row split, class tile, D-out
     chunk) and loops over the row tiles of its split; row splits keep the GPU
     busy when C is small; later passes add to the same blocks in place;
  5. dP finalize: sums the splits in a fixed order, then the prototype
     normalisation's Jacobian with p_hat . dp_hat from the summed dp_hat.
  Launches: 2 + 3 per pass (5 for one pass).
- Precision: fp32 inputs use input_precision="tf32x3" (~fp32) for every dot.
  The gradient dots take fp32 operands with tf32x3 for every dtype: a plain
  tf32 or half dot would round G to 10 mantissa bits.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mvcl_fast.backend import triton_interpreter_enabled
from mvcl_fast.kernels.aot import KernelSpec

NORM_EPS = tl.constexpr(1e-12)  # as F.normalize
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Scatter-mean tiles.
SCATTER_ROWS = 32
SCATTER_COLS = 128
MEAN_CLASSES = 32

# InfoNCE tiles: rows per tile, D chunk of the logits loop, D chunk of the
# gradient GEMMs, class tile of the dP kernel (the others take _class_block(C)).
# Sized for 0 spills on sm_80 and sm_90a (python -m mvcl_fast.kernels.report).
ROWS = 32
K_CHUNK = 32
D_OUT = 64
DP_CLASSES = 64
INFONCE_WARPS = 8
NORM_ROWS = 16
NORM_COLS = 256
FINALIZE_COLS = 256
# The dP partial kernel splits the rows until it has about this many programs.
DP_TARGET_PROGRAMS = 256
# Largest G = dLoss/dlogit buffer ([rows of a pass, C] fp32) the backward holds:
# one pass covers V * N <= 2**26 / C rows (every row up to C = 341 at N = 65536, V = 3).
G_PASS_BYTES = 256 * 2**20

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _class_block(num_classes: int) -> int:
    """32 for the usual intent counts (MIntRec 20, MIntRec2.0 31), else 64."""
    return 32 if num_classes <= 32 else 64


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes bf16 tl.dot wrongly: feed it fp32 there (exact for bf16)."""
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


# ------------------------------------------------------------------ helpers
@triton.jit
def _inv_norm(norm):
    """1 / max(norm, eps): x times this is F.normalize(x)."""
    return 1.0 / tl.maximum(norm, NORM_EPS)


@triton.jit
def _radial(norm):
    """1.0 where norm >= eps, else 0.0: whether the normalisation's Jacobian has its radial term.

    As clamp_min's gradient: below eps, x / eps is linear in x.
    """
    return tl.where(norm >= NORM_EPS, 1.0, 0.0)


@triton.jit
def _row_offsets(tile, R, N, stride_zv, stride_zn, BLOCK_M: tl.constexpr):
    """Rows r = v * N + n of a tile: (rows, in range, n, offset of z[v, n, 0])."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    view = rows64 // N
    n = rows64 - view * N
    return rows, row_ok, n, view * stride_zv + n * stride_zn


@triton.jit
def _candidates(mask_ptr, has_mask, cls, cls_ok):
    """Classes of the tile that enter the softmax: in range and, with a mask, present."""
    candidate = cls_ok
    if has_mask != 0:
        candidate = candidate & (tl.load(mask_ptr + cls, mask=cls_ok, other=1) != 0)
    return candidate


@triton.jit
def _raw_logits(z_ptr, z_off, row_ok, p_ptr, cls, cls_ok, stride_pc, D,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST_DOT: tl.constexpr, NORMS: tl.constexpr):
    """z_tile @ P_tile^T over all of D, and (NORMS) the squared norms of the rows and classes."""
    dots = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    sq_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq_p = tl.zeros([BLOCK_C], dtype=tl.float32)
    p_off = cls.to(tl.int64) * stride_pc
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        z = tl.load(z_ptr + z_off[:, None] + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # P loaded transposed, [BLOCK_K, BLOCK_C], ready for the dot.
        p = tl.load(p_ptr + p_off[None, :] + ks[:, None],
                    mask=cls_ok[None, :] & k_ok[:, None], other=0.0)
        if NORMS:
            zf = z.to(tl.float32)
            pf = p.to(tl.float32)
            sq_z += tl.sum(zf * zf, axis=1)
            sq_p += tl.sum(pf * pf, axis=0)
        if z.dtype == tl.float32:
            dots = tl.dot(z, p, dots, input_precision="tf32x3")
        elif UPCAST_DOT:
            dots = tl.dot(z.to(tl.float32), p.to(tl.float32), dots)
        else:
            dots = tl.dot(z, p, dots)
    return dots, sq_z, sq_p


@triton.jit
def _logit_grad(logits, lse2, labels, row_ok, cls, candidate, grad_scale):
    """dLoss/dlogit = (softmax - onehot) * grad / (V N); 0 for masked classes and padded rows."""
    prob = tl.where(candidate[None, :], tl.exp2(logits * LOG2E - lse2[:, None]), 0.0)
    onehot = tl.where(cls[None, :] == labels[:, None], 1.0, 0.0)
    return tl.where(row_ok[:, None], (prob - onehot) * grad_scale, 0.0)


@triton.jit
def _norms_of(x_ptr, offs, ok, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """L2 norms of the rows starting at x_ptr + offs."""
    sq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + offs[:, None] + cols[None, :], mask=ok[:, None] & (cols < D)[None, :],
                    other=0.0).to(tl.float32)
        sq += x * x
    return tl.sqrt(tl.sum(sq, axis=1))


@triton.jit
def _dp_hat_chunk(p_ptr, part_ptr, c, cols, C, D, num_splits, stride_pc, inv_tau,
                  BLOCK_D: tl.constexpr):
    """(dp_hat = sum over splits / tau, raw p) of one D chunk of class c."""
    col_ok = cols < D
    dp_hat = tl.zeros([BLOCK_D], dtype=tl.float32)
    for split in range(0, num_splits):
        dp_hat += tl.load(part_ptr + (split * C + c) * D + cols, mask=col_ok, other=0.0)
    p = tl.load(p_ptr + c * stride_pc + cols, mask=col_ok, other=0.0).to(tl.float32)
    return dp_hat * inv_tau, p


# ------------------------------------------------------------ scatter-mean
@triton.jit
def _scatter_add_kernel(z_ptr, y_ptr, sums_ptr, counts_ptr, N, D, stride_zn,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """sums[y_i] += z_i (fp32 atomics); counts[y_i] += 1 from the first D chunk."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < D)[None, :]
    labels = tl.load(y_ptr + rows, mask=row_ok, other=0)
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_zn + cols[None, :], mask=ok, other=0.0)
    tl.atomic_add(sums_ptr + labels[:, None] * D + cols[None, :], z.to(tl.float32), mask=ok,
                  sem="relaxed")
    if pid_d == 0:
        ones = tl.full([BLOCK_N], 1, dtype=tl.int32)
        tl.atomic_add(counts_ptr + labels, ones, mask=row_ok, sem="relaxed")


@triton.jit
def _scatter_mean_kernel(sums_ptr, counts_ptr, proto_ptr, counts_out_ptr, C, D,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """P = sums / max(count, 1) in the output dtype; counts widened to int64."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    cls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cls_ok = cls < C
    ok = cls_ok[:, None] & (cols < D)[None, :]
    counts = tl.load(counts_ptr + cls, mask=cls_ok, other=0)
    offs = cls.to(tl.int64)[:, None] * D + cols[None, :]
    sums = tl.load(sums_ptr + offs, mask=ok, other=0.0)
    means = sums / tl.maximum(counts, 1).to(tl.float32)[:, None]
    tl.store(proto_ptr + offs, means.to(proto_ptr.dtype.element_ty), mask=ok)
    if pid_d == 0:
        tl.store(counts_out_ptr + cls, counts.to(tl.int64), mask=cls_ok)


@triton.jit
def _segment_mean_kernel(z_ptr, order_ptr, starts_ptr, counts_ptr, proto_ptr, D, stride_zn,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One class, one D chunk: the mean of its rows (a sorted segment), summed in row order."""
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(starts_ptr + c)
    count = tl.load(counts_ptr + c)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(0, count, BLOCK_N):
        pos = j + tl.arange(0, BLOCK_N)
        pos_ok = pos < count
        rows = tl.load(order_ptr + start + pos, mask=pos_ok, other=0)
        acc += tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :],
                       mask=pos_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    means = tl.sum(acc, axis=0) / tl.maximum(count, 1).to(tl.float32)
    tl.store(proto_ptr + c.to(tl.int64) * D + cols, means.to(proto_ptr.dtype.element_ty),
             mask=col_ok)


@triton.jit
def _gather_mean_grad_kernel(grad_ptr, y_ptr, counts_ptr, dz_ptr, N, D, stride_gc,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz_i = dP_{y_i} / max(count_{y_i}, 1)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < D)[None, :]
    labels = tl.load(y_ptr + rows, mask=row_ok, other=0)
    scale = 1.0 / tl.maximum(tl.load(counts_ptr + labels, mask=row_ok, other=1), 1).to(tl.float32)
    grad = tl.load(grad_ptr + labels[:, None] * stride_gc + cols[None, :], mask=ok,
                   other=0.0).to(tl.float32)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
             (grad * scale[:, None]).to(dz_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------- prototype InfoNCE
@triton.jit
def _infonce_fwd_kernel(z_ptr, y_ptr, p_ptr, mask_ptr, lse_ptr, partial_ptr,
                        R, N, D, C, has_mask, stride_zv, stride_zn, stride_pc, inv_tau, inv_rows,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST_DOT: tl.constexpr):
    """One row tile against every class tile: lse (online, base 2) and the tile's loss sum."""
    tile = tl.program_id(0)
    rows, row_ok, n, z_off = _row_offsets(tile, R, N, stride_zv, stride_zn, BLOCK_M)
    labels = tl.load(y_ptr + n, mask=row_ok, other=0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    target = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_ok = cls < C
        candidate = _candidates(mask_ptr, has_mask, cls, cls_ok)
        dots, sq_z, sq_p = _raw_logits(z_ptr, z_off, row_ok, p_ptr, cls, cls_ok, stride_pc, D,
                                       BLOCK_M, BLOCK_C, BLOCK_K, UPCAST_DOT, True)
        inv_z = _inv_norm(tl.sqrt(sq_z))
        inv_p = _inv_norm(tl.sqrt(sq_p))
        logits2 = dots * inv_z[:, None] * (inv_p * (inv_tau * LOG2E))[None, :]
        logits2 = tl.where(candidate[None, :], logits2, float("-inf"))
        target += tl.sum(tl.where(cls[None, :] == labels[:, None], logits2, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(logits2, axis=1))
        # A row whose classes so far are all masked keeps m = -inf: shift by 0 instead.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - shift) + tl.sum(tl.exp2(logits2 - shift[:, None]), axis=1)
        m = m_new
    lse2 = m + tl.log2(l)
    tl.store(lse_ptr + rows, lse2 * LN2, mask=row_ok)
    loss = tl.where(row_ok, (lse2 - target) * LN2, 0.0)
    tl.store(partial_ptr + tile, tl.sum(loss, axis=0) * inv_rows)


@triton.jit
def _infonce_norms_kernel(z_ptr, p_ptr, z_norms_ptr, p_norms_ptr, R, N, C, D,
                          stride_zv, stride_zn, stride_pc,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """|z_r| for every row (first programs), then |p_c| for every prototype."""
    pid = tl.program_id(0)
    z_tiles = tl.cdiv(R, BLOCK_R)
    if pid < z_tiles:
        rows, row_ok, n, z_off = _row_offsets(pid, R, N, stride_zv, stride_zn, BLOCK_R)
        tl.store(z_norms_ptr + rows, _norms_of(z_ptr, z_off, row_ok, D, BLOCK_R, BLOCK_D),
                 mask=row_ok)
    else:
        cls = (pid - z_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        cls_ok = cls < C
        norms = _norms_of(p_ptr, cls.to(tl.int64) * stride_pc, cls_ok, D, BLOCK_R, BLOCK_D)
        tl.store(p_norms_ptr + cls, norms, mask=cls_ok)


@triton.jit
def _infonce_logit_grad_kernel(z_ptr, y_ptr, p_ptr, mask_ptr, lse_ptr, grad_ptr, z_norms_ptr,
                               p_norms_ptr, g_ptr, row_radial_ptr, row_start, row_end, N, D, C,
                               has_mask, stride_zv, stride_zn, stride_pc, inv_tau, inv_rows,
                               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One row tile of the pass: G = dLoss/dlogit into g [pass rows, C], sum_c G L per row."""
    tile = row_start // BLOCK_M + tl.program_id(0)
    rows, row_ok, n, z_off = _row_offsets(tile, row_end, N, stride_zv, stride_zn, BLOCK_M)
    labels = tl.load(y_ptr + n, mask=row_ok, other=0)
    lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    inv_z = _inv_norm(tl.load(z_norms_ptr + rows, mask=row_ok, other=1.0))
    grad_scale = tl.load(grad_ptr).to(tl.float32) * inv_rows
    g_rows = g_ptr + (rows - row_start).to(tl.int64)[:, None] * C
    row_radial = tl.zeros([BLOCK_M], dtype=tl.float32)  # z_hat . dz_hat = sum_c G_rc L_rc
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_ok = cls < C
        candidate = _candidates(mask_ptr, has_mask, cls, cls_ok)
        inv_p = _inv_norm(tl.load(p_norms_ptr + cls, mask=cls_ok, other=1.0))
        dots, sq_z, sq_p = _raw_logits(z_ptr, z_off, row_ok, p_ptr, cls, cls_ok, stride_pc, D,
                                 BLOCK_M, BLOCK_C, BLOCK_K, UPCAST_DOT, False)
        logits = dots * inv_z[:, None] * (inv_p * inv_tau)[None, :]
        g = _logit_grad(logits, lse2, labels, row_ok, cls, candidate, grad_scale)
        row_radial += tl.sum(g * logits, axis=1)
        tl.store(g_rows + cls[None, :], g, mask=row_ok[:, None] & cls_ok[None, :])
    tl.store(row_radial_ptr + rows, row_radial, mask=row_ok)


@triton.jit
def _infonce_dz_kernel(z_ptr, p_ptr, z_norms_ptr, p_norms_ptr, g_ptr, row_radial_ptr, dz_ptr,
                       row_start, row_end, N, D, C, stride_zv, stride_zn, stride_pc, inv_tau,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dz of one row tile and D-out chunk of the pass.

    dz_hat = G P_hat / tau over every class tile, then the normalisation's Jacobian:
    dz = (dz_hat - radial z_hat (z_hat . dz_hat)) / max(|z|, eps), z_hat . dz_hat = sum_c G L.
    """
    pid = tl.program_id(0)
    d_chunks = tl.cdiv(D, BLOCK_DO)
    # The D chunks of a row tile are neighbours in launch order: its G tiles stay in L2.
    tile = row_start // BLOCK_M + pid // d_chunks
    cols = (pid % d_chunks) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    col_ok = cols < D
    rows, row_ok, n, z_off = _row_offsets(tile, row_end, N, stride_zv, stride_zn, BLOCK_M)
    g_rows = g_ptr + (rows - row_start).to(tl.int64)[:, None] * C
    dz_hat = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_ok = cls < C
        inv_p = _inv_norm(tl.load(p_norms_ptr + cls, mask=cls_ok, other=1.0))
        g = tl.load(g_rows + cls[None, :], mask=row_ok[:, None] & cls_ok[None, :], other=0.0)
        p = tl.load(p_ptr + cls.to(tl.int64)[:, None] * stride_pc + cols[None, :],
                    mask=cls_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        dz_hat = tl.dot(g * (inv_p * inv_tau)[None, :], p, dz_hat, input_precision="tf32x3")
    z_norm = tl.load(z_norms_ptr + rows, mask=row_ok, other=1.0)
    inv_z = _inv_norm(z_norm)
    row_radial = tl.load(row_radial_ptr + rows, mask=row_ok, other=0.0)
    z = tl.load(z_ptr + z_off[:, None] + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    dz = inv_z[:, None] * (dz_hat - (_radial(z_norm) * inv_z * row_radial)[:, None] * z)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _infonce_dp_partial_kernel(z_ptr, z_norms_ptr, g_ptr, part_ptr, row_start, row_end, N, D, C,
                               stride_zv, stride_zn, num_splits, accumulate,
                               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_DO: tl.constexpr):
    """part[split] (+)= sum_r G_rc z_hat_r over the row tiles of this split of the pass.

    A program owns (split, class tile, D-out chunk); with accumulate it adds to what the
    previous pass left in its block of part, so the sum over passes keeps a fixed order.
    """
    pid = tl.program_id(0)
    d_chunks = tl.cdiv(D, BLOCK_DO)
    class_tiles = tl.cdiv(C, BLOCK_C)
    cols = (pid % d_chunks) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    cls = ((pid // d_chunks) % class_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = pid // (d_chunks * class_tiles)
    cls_ok = cls < C
    col_ok = cols < D
    block = part_ptr + (split.to(tl.int64) * C + cls)[:, None] * D + cols[None, :]
    block_ok = cls_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_DO], dtype=tl.float32)
    if accumulate != 0:
        acc = tl.load(block, mask=block_ok, other=0.0)
    for tile in range(row_start // BLOCK_M + split, tl.cdiv(row_end, BLOCK_M), num_splits):
        rows, row_ok, n, z_off = _row_offsets(tile, row_end, N, stride_zv, stride_zn, BLOCK_M)
        inv_z = _inv_norm(tl.load(z_norms_ptr + rows, mask=row_ok, other=1.0))
        g = tl.load(g_ptr + (rows - row_start).to(tl.int64)[:, None] * C + cls[None, :],
                    mask=row_ok[:, None] & cls_ok[None, :], other=0.0)
        z = tl.load(z_ptr + z_off[:, None] + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(g * inv_z[:, None]), z, acc, input_precision="tf32x3")
    tl.store(block, acc, mask=block_ok)


@triton.jit
def _infonce_dp_finalize_kernel(p_ptr, p_norms_ptr, part_ptr, dp_ptr, C, D, num_splits,
                                stride_pc, inv_tau, BLOCK_D: tl.constexpr):
    """dP_c = (dp_hat - radial p_hat (p_hat . dp_hat)) / max(|p_c|, eps), splits summed in order.

    Two passes over D: p_hat . dp_hat needs all of dp_hat before any of dP is written.
    """
    c = tl.program_id(0).to(tl.int64)
    p_norm = tl.load(p_norms_ptr + c)
    inv_p = _inv_norm(p_norm)
    radial_dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        dp_hat, p = _dp_hat_chunk(p_ptr, part_ptr, c, cols, C, D, num_splits, stride_pc, inv_tau,
                                  BLOCK_D)
        radial_dot += dp_hat * p
    radial = _radial(p_norm) * inv_p * inv_p * tl.sum(radial_dot, axis=0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        dp_hat, p = _dp_hat_chunk(p_ptr, part_ptr, c, cols, C, D, num_splits, stride_pc, inv_tau,
                                  BLOCK_D)
        tl.store(dp_ptr + c * D + cols, (inv_p * (dp_hat - radial * p)).to(dp_ptr.dtype.element_ty),
                 mask=cols < D)


# --------------------------------------------------------------- launchers
def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (the kernels take any other stride), else a copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def batch_prototypes_forward(z: torch.Tensor, y: torch.Tensor, num_classes: int,
                             deterministic: bool):
    """(prototypes [C, D] in z.dtype, counts [C] int64) of z [N, D] by labels y [N]."""
    z, y = _unit_stride(z), y.contiguous()
    n, dim = z.shape
    prototypes = torch.empty((num_classes, dim), dtype=z.dtype, device=z.device)
    col_chunks = triton.cdiv(dim, SCATTER_COLS)
    if deterministic:
        # Segments of the stably sorted labels; searchsorted (unlike bincount) needs no host sync.
        sorted_y, order = torch.sort(y, stable=True)
        bounds = torch.searchsorted(sorted_y, torch.arange(num_classes + 1, device=y.device))
        starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
        _segment_mean_kernel[(num_classes, col_chunks)](
            z, order, starts, counts, prototypes, dim, z.stride(0),
            BLOCK_N=SCATTER_ROWS, BLOCK_D=SCATTER_COLS)
        return prototypes, counts
    # One zeroed buffer (one memset) holds the fp32 sums and, bit-cast, the int32 counts.
    scratch = torch.zeros(num_classes * dim + num_classes, dtype=torch.float32, device=z.device)
    sums = scratch[:num_classes * dim]
    counts32 = scratch[num_classes * dim:].view(torch.int32)
    _scatter_add_kernel[(triton.cdiv(n, SCATTER_ROWS), col_chunks)](
        z, y, sums, counts32, n, dim, z.stride(0), BLOCK_N=SCATTER_ROWS, BLOCK_D=SCATTER_COLS)
    counts = torch.empty(num_classes, dtype=torch.int64, device=z.device)
    _scatter_mean_kernel[(triton.cdiv(num_classes, MEAN_CLASSES), col_chunks)](
        sums, counts32, prototypes, counts, num_classes, dim,
        BLOCK_C=MEAN_CLASSES, BLOCK_D=SCATTER_COLS)
    return prototypes, counts


def batch_prototypes_backward(grad_prototypes: torch.Tensor, y: torch.Tensor,
                              counts: torch.Tensor) -> torch.Tensor:
    """dz [N, D] in the gradient's dtype: dz_i = dP_{y_i} / count_{y_i}."""
    grad_prototypes = _unit_stride(grad_prototypes)
    n, dim = y.shape[0], grad_prototypes.shape[1]
    dz = torch.empty((n, dim), dtype=grad_prototypes.dtype, device=grad_prototypes.device)
    _gather_mean_grad_kernel[(triton.cdiv(n, SCATTER_ROWS), triton.cdiv(dim, SCATTER_COLS))](
        grad_prototypes, y.contiguous(), counts.contiguous(), dz, n, dim,
        grad_prototypes.stride(0), BLOCK_N=SCATTER_ROWS, BLOCK_D=SCATTER_COLS)
    return dz


def _infonce_args(z, y, prototypes, class_mask, tau):
    """(z, P, y, class mask) ready for the kernels, the scalar arguments they share, constexprs."""
    z, prototypes, y = _unit_stride(z), _unit_stride(prototypes), y.contiguous()
    views, n, dim = z.shape
    num_classes = prototypes.shape[0]
    if class_mask is None:  # has_mask = 0: the placeholder is never read
        mask, has_mask = torch.empty(1, dtype=torch.int8, device=z.device), 0
    else:
        mask, has_mask = class_mask.contiguous().view(torch.int8), 1
    scalars = dict(N=n, D=dim, C=num_classes, has_mask=has_mask,
                   stride_zv=z.stride(0), stride_zn=z.stride(1), stride_pc=prototypes.stride(0),
                   inv_tau=1.0 / tau, inv_rows=1.0 / (views * n))
    meta = dict(BLOCK_M=ROWS, BLOCK_C=_class_block(num_classes), BLOCK_K=K_CHUNK,
                UPCAST_DOT=_upcast_dot(z.dtype), num_warps=INFONCE_WARPS)
    return z, prototypes, y, mask, scalars, meta


def prototype_infonce_forward(z: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor,
                              class_mask: Optional[torch.Tensor], tau: float):
    """(loss: 0-dim fp32, lse [V, N] fp32) of the prototype InfoNCE over views z [V, N, D]."""
    z, prototypes, y, mask, scalars, meta = _infonce_args(z, y, prototypes, class_mask, tau)
    views, n, _ = z.shape
    row_tiles = triton.cdiv(views * n, ROWS)
    lse = torch.empty((views, n), dtype=torch.float32, device=z.device)
    partials = torch.empty(row_tiles, dtype=torch.float32, device=z.device)
    _infonce_fwd_kernel[(row_tiles,)](z, y, prototypes, mask, lse, partials, R=views * n,
                                      **scalars, **meta)
    return partials.sum(), lse


def prototype_infonce_backward(grad_loss: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                               prototypes: torch.Tensor, class_mask: Optional[torch.Tensor],
                               tau: float, lse: torch.Tensor):
    """(dz [V, N, D] in z.dtype, dP [C, D] in prototypes.dtype) from the saved lse."""
    z, prototypes, y, mask, scalars, meta = _infonce_args(z, y, prototypes, class_mask, tau)
    views, n, dim = z.shape
    rows, num_classes = views * n, prototypes.shape[0]
    device = z.device
    f32 = dict(dtype=torch.float32, device=device)
    grad_loss = grad_loss.to(torch.float32).contiguous()
    lse = lse.contiguous()
    strides = dict(stride_zv=z.stride(0), stride_zn=z.stride(1))

    z_norms, p_norms = torch.empty(rows, **f32), torch.empty(num_classes, **f32)
    norm_programs = triton.cdiv(rows, NORM_ROWS) + triton.cdiv(num_classes, NORM_ROWS)
    _infonce_norms_kernel[(norm_programs,)](
        z, prototypes, z_norms, p_norms, rows, n, num_classes, dim, **strides,
        stride_pc=prototypes.stride(0), BLOCK_R=NORM_ROWS, BLOCK_D=NORM_COLS)

    pass_rows = min(rows, max(ROWS, G_PASS_BYTES // (4 * num_classes) // ROWS * ROWS))
    pass_tiles = triton.cdiv(pass_rows, ROWS)
    d_chunks = triton.cdiv(dim, D_OUT)
    class_tiles = triton.cdiv(num_classes, DP_CLASSES)
    splits = max(1, min(pass_tiles, triton.cdiv(DP_TARGET_PROGRAMS, class_tiles * d_chunks)))
    g = torch.empty((pass_rows, num_classes), **f32)
    row_radial = torch.empty(rows, **f32)
    part = torch.empty((splits, num_classes, dim), **f32)
    dz = torch.empty((views, n, dim), dtype=z.dtype, device=device)
    gemm = dict(BLOCK_M=ROWS, BLOCK_DO=D_OUT, num_warps=INFONCE_WARPS)
    for row_start in range(0, rows, pass_rows):
        bounds = dict(row_start=row_start, row_end=min(row_start + pass_rows, rows))
        tiles = triton.cdiv(bounds["row_end"] - row_start, ROWS)
        _infonce_logit_grad_kernel[(tiles,)](
            z, y, prototypes, mask, lse, grad_loss, z_norms, p_norms, g, row_radial,
            **scalars, **bounds, **meta)
        _infonce_dz_kernel[(tiles * d_chunks,)](
            z, prototypes, z_norms, p_norms, g, row_radial, dz, **bounds, N=n, D=dim,
            C=num_classes, **strides, stride_pc=prototypes.stride(0), inv_tau=1.0 / tau,
            BLOCK_C=meta["BLOCK_C"], **gemm)
        _infonce_dp_partial_kernel[(splits * class_tiles * d_chunks,)](
            z, z_norms, g, part, **bounds, N=n, D=dim, C=num_classes, **strides,
            num_splits=splits, accumulate=int(row_start > 0), BLOCK_C=DP_CLASSES, **gemm)
    dp = torch.empty((num_classes, dim), dtype=prototypes.dtype, device=device)
    _infonce_dp_finalize_kernel[(num_classes,)](
        prototypes, p_norms, part, dp, num_classes, dim, splits, prototypes.stride(0), 1.0 / tau,
        BLOCK_D=FINALIZE_COLS)
    return dz, dp


# ------------------------------------------------------------ AOT declaration
def aot_specs() -> list[KernelSpec]:
    """Every kernel with every config it launches with on a GPU (per dtype, per class tile)."""
    specs = []
    scatter = dict(BLOCK_N=SCATTER_ROWS, BLOCK_D=SCATTER_COLS)
    for t in TORCH_TO_TRITON.values():
        specs += [
            KernelSpec(f"scatter_add[{t}]", _scatter_add_kernel,
                       {"z_ptr": f"*{t}", "y_ptr": "*i64", "sums_ptr": "*fp32",
                        "counts_ptr": "*i32", "N": "i32", "D": "i32", "stride_zn": "i32"},
                       scatter),
            KernelSpec(f"scatter_mean[{t}]", _scatter_mean_kernel,
                       {"sums_ptr": "*fp32", "counts_ptr": "*i32", "proto_ptr": f"*{t}",
                        "counts_out_ptr": "*i64", "C": "i32", "D": "i32"},
                       dict(BLOCK_C=MEAN_CLASSES, BLOCK_D=SCATTER_COLS)),
            KernelSpec(f"segment_mean[{t}]", _segment_mean_kernel,
                       {"z_ptr": f"*{t}", "order_ptr": "*i64", "starts_ptr": "*i64",
                        "counts_ptr": "*i64", "proto_ptr": f"*{t}", "D": "i32",
                        "stride_zn": "i32"}, scatter),
            KernelSpec(f"gather_mean_grad[{t}]", _gather_mean_grad_kernel,
                       {"grad_ptr": f"*{t}", "y_ptr": "*i64", "counts_ptr": "*i64",
                        "dz_ptr": f"*{t}", "N": "i32", "D": "i32", "stride_gc": "i32"}, scatter),
            KernelSpec(f"infonce_norms[{t}]", _infonce_norms_kernel,
                       {"z_ptr": f"*{t}", "p_ptr": f"*{t}", "z_norms_ptr": "*fp32",
                        "p_norms_ptr": "*fp32", "R": "i32", "N": "i32", "C": "i32", "D": "i32",
                        "stride_zv": "i32", "stride_zn": "i32", "stride_pc": "i32"},
                       dict(BLOCK_R=NORM_ROWS, BLOCK_D=NORM_COLS)),
            KernelSpec(f"infonce_dp_finalize[{t}]", _infonce_dp_finalize_kernel,
                       {"p_ptr": f"*{t}", "p_norms_ptr": "*fp32", "part_ptr": "*fp32",
                        "dp_ptr": f"*{t}", "C": "i32", "D": "i32", "num_splits": "i32",
                        "stride_pc": "i32", "inv_tau": "fp32"},
                       dict(BLOCK_D=FINALIZE_COLS)),
        ]
        shared = {"z_ptr": f"*{t}", "y_ptr": "*i64", "p_ptr": f"*{t}", "mask_ptr": "*i8",
                  "lse_ptr": "*fp32", "N": "i32", "D": "i32", "C": "i32",
                  "has_mask": "i32", "stride_zv": "i32", "stride_zn": "i32", "stride_pc": "i32",
                  "inv_tau": "fp32", "inv_rows": "fp32"}
        rows_pass = {"row_start": "i32", "row_end": "i32", "N": "i32", "D": "i32", "C": "i32",
                     "stride_zv": "i32", "stride_zn": "i32"}
        for block_c in sorted({_class_block(1), _class_block(4096)}):
            meta = dict(BLOCK_M=ROWS, BLOCK_C=block_c, BLOCK_K=K_CHUNK, UPCAST_DOT=False)
            tag = f"{t},BLOCK_C={block_c}"
            specs += [
                KernelSpec(f"infonce_fwd[{tag}]", _infonce_fwd_kernel,
                           {**shared, "R": "i32", "partial_ptr": "*fp32"}, meta,
                           num_warps=INFONCE_WARPS),
                KernelSpec(f"infonce_logit_grad[{tag}]", _infonce_logit_grad_kernel,
                           {**shared, **rows_pass, "grad_ptr": "*fp32", "z_norms_ptr": "*fp32",
                            "p_norms_ptr": "*fp32", "g_ptr": "*fp32", "row_radial_ptr": "*fp32"},
                           meta, num_warps=INFONCE_WARPS),
                KernelSpec(f"infonce_dz[{tag}]", _infonce_dz_kernel,
                           {**rows_pass, "z_ptr": f"*{t}", "p_ptr": f"*{t}",
                            "z_norms_ptr": "*fp32", "p_norms_ptr": "*fp32", "g_ptr": "*fp32",
                            "row_radial_ptr": "*fp32", "dz_ptr": f"*{t}", "stride_pc": "i32",
                            "inv_tau": "fp32"},
                           dict(BLOCK_M=ROWS, BLOCK_C=block_c, BLOCK_DO=D_OUT),
                           num_warps=INFONCE_WARPS),
            ]
        specs.append(KernelSpec(
            f"infonce_dp_partial[{t}]", _infonce_dp_partial_kernel,
            {**rows_pass, "z_ptr": f"*{t}", "z_norms_ptr": "*fp32", "g_ptr": "*fp32",
             "part_ptr": "*fp32", "num_splits": "i32", "accumulate": "i32"},
            dict(BLOCK_M=ROWS, BLOCK_C=DP_CLASSES, BLOCK_DO=D_OUT), num_warps=INFONCE_WARPS))
    return specs


def aot_launches():
    """Forward + backward of the batch prototypes and the prototype InfoNCE over them, at the
    benchmark shapes (N = 32, 1024, 65536 x C = 20, 30, 1024; D = 768) in each dtype, with the
    atomic and the deterministic scatter-mean."""
    from mvcl_fast.kernels.aot import mode_name

    def step(n, num_classes, dtype, deterministic):
        def launch():
            z = torch.empty(n, 768, dtype=dtype)
            y = torch.randint(num_classes, (n,))
            prototypes, counts = batch_prototypes_forward(z, y, num_classes, deterministic)
            views = z.unsqueeze(0)
            _, lse = prototype_infonce_forward(views, y, prototypes, counts > 0, 0.1)
            _, d_prototypes = prototype_infonce_backward(torch.ones(()), views, y, prototypes,
                                                         counts > 0, 0.1, lse)
            batch_prototypes_backward(d_prototypes, y, counts)
        return launch

    return [(f"prototypes[N={n},C={c},{mode_name(dtype, False)}"
             f"{',deterministic' if deterministic else ''}]", step(n, c, dtype, deterministic))
            for dtype in TORCH_TO_TRITON for n in (32, 1024, 65536) for c in (20, 30, 1024)
            for deterministic in (False, True)]
