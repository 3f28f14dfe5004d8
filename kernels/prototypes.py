"""Fused Triton kernels for batch prototypes (scatter-mean) and the prototype InfoNCE.

Notation: z [V, N, D] (V views of N rows sharing the labels y [N]; row r = v N + n,
R = V N rows), C classes, tau. Everything is deterministic: no float atomics, every
sum in a fixed order.

Scatter-mean (SPEC op 1), `_class_sums_kernel`: the class sums are a GEMM with a
one-hot matrix, S^T [D, C] = z^T [D, R] @ onehot(y) [R, C], on the tensor cores
(bf16/fp16 operands are exact, the one-hot is exact, fp32 accumulation). A program
owns (class tile, D chunk, row split) and walks the row tiles of its split; when a
large batch needs row splits to fill the GPU, `_class_sums_reduce_kernel` adds the
splits in order. The counts come from the same one-hot tiles. Backward
(`_gather_mean_grad_kernel`): dz_i = dP_{y_i} / count_{y_i}.

Prototype InfoNCE (SPEC op 2) as one op, forward and backward:

- The normalisation is scale-free, so the batch prototypes need only the class
  sums: norm(P_c) = S_c / max(|S_c|, count_c eps) exactly (|P_c| = |S_c| / count_c).
  The through-prototype gradient of z_i is dS_{y_i}: the mean's 1/count folds away.
- The loss is a scalar, so its gradient is grad_loss times the gradient of the
  loss with grad 1. The forward kernel (`_infonce_fwd_kernel`), once per row tile,
  has the logits, the lse and so G = softmax - onehot in registers: when a
  gradient is needed it also accumulates the class-side GEMM dS_hat^T += z_hat^T G,
  then finalises dS = J_norm(S)^T dS_hat (in place when one program did every row;
  else `_infonce_finalize_kernel` adds the programs' partials in order). The loss
  partials are summed the same way. The backward (`_infonce_bwd_kernel`) is then
  one pass over the rows: recompute the logits from z and S, G from the saved lse,
  dz_hat = G S_hat / tau, the Jacobian dz = (dz_hat - z_hat (z_hat . dz_hat)) / |z|
  with z_hat . dz_hat = sum_c G_rc L_rc, plus grad dS_{y_r}; z is read 3 times in all
  (sums, forward, backward; 2 when the sums are fused) and dz written once.
- Launches for a forward + backward: sums (+ reduce for a large batch), forward
  (+ finalize when several programs share the rows), backward: 2 to 5, no memset,
  no host sync. When one forward program takes every row (a small batch), it writes
  the class sums itself first (FUSED_SUMS): 2 launches and 2 passes over z.
  Explicit prototypes skip the sums; their gradient dP is scaled by extra programs
  of the backward launch.
- Many classes (more than one class tile), the class split: a row program would walk
  every class tile for the lse, again for G and again per D chunk of dz (1,920 tile
  steps a row tile at C = 1024, D = 768, one program at N = 32). Instead
  `_infonce_lse_kernel` (row tile, class chunk) stages the base-2 logits in fp32 with
  the online-softmax partials of its chunk, |z| and 1 / |S|;
  `_infonce_class_grad_kernel` (class tile, D chunk, row split) combines the partials
  into the lse, takes G from the staged logits and accumulates dS_hat (and the loss);
  the finalize kernel applies dS's Jacobian; the backward (STAGED) reads the logits
  instead of recomputing them. Every launch then either fills the GPU or walks at most
  about MAX_SERIAL_STEPS tiles, and the logits are computed once. The staging costs
  R C fp32, as eager's own logits; past STAGED_LOGITS_LIMIT the row programs
  recompute instead (memory flat).
- Precision: fp32 inputs use tf32x3 for every dot (about fp32). For fp16/bf16 the
  raw rows enter the tensor cores as they are (exact); the fp32 operands (S_hat, G)
  are split into a high and a low half (x = hi + lo, about 16 mantissa bits), two or
  three MMAs per product, fp32 accumulation. Under Triton's interpreter, whose bf16
  dot is wrong, the same split runs on fp32 operands holding the halves' values.
- Labels are never trusted for addressing: a row whose label is outside [0, C)
  adds to no class and gets a NaN loss; nothing is read or written out of bounds.
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

# Row tile of every kernel: 64 rows, one wgmma M for one warp group (4 warps); the class-side
# GEMMs (sums, dS) take their M from the 64-wide D chunks. No software pipelining: with it, or
# 8 warps, or 64-wide logits chunks, kernels spilled under triton 3.6 (kernels/report.py).
ROWS = 64
NUM_WARPS = 4
NUM_STAGES = 1
K_CHUNK = 32    # D chunk of the logits dots
D_OUT = 64      # D chunk of the gradient GEMMs and of the sums
FINAL_COLS = 256
# The backward reading staged logits: 8 warps (4 spilled 32 B in fp32 under triton 3.9).
STAGED_BWD_WARPS = 8
# A program walks at most about this many serial tile steps while the GPU has SMs to spare.
MAX_SERIAL_STEPS = 64
SM_COUNT = 132  # an H100/H200
TARGET_PROGRAMS = 2 * SM_COUNT
# The class split stages the logits (fp32) of at most this many (row, class) pairs, 1 GiB: no
# more than eager PyTorch's own fp32 logits. Beyond it the row programs recompute them.
STAGED_LOGITS_LIMIT = 1 << 28
LOSS_CHUNK = 256

# Dot modes: fp32 (tf32x3), a half dtype on the tensor cores, or the interpreter's fp32 stand-in.
DOT_FP32, DOT_HALF, DOT_EMULATED = 0, 1, 2

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TRITON_HALF = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.bfloat16}


def class_block(num_classes: int) -> int:
    """Class tile: 16 or 32 (the K of the dz GEMM must be a multiple of 16; 64 spills)."""
    return 16 if num_classes <= 16 else 32


def _dot_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return DOT_FP32
    if dtype == torch.bfloat16 and triton_interpreter_enabled():
        return DOT_EMULATED
    return DOT_HALF


# ------------------------------------------------------------------ helpers
@triton.jit
def _inv_norm(norm):
    """1 / max(norm, eps): x times this is F.normalize(x)."""
    return 1.0 / tl.maximum(norm, NORM_EPS)


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
def _labels(y_ptr, n, row_ok, C):
    """(labels, valid): a label outside [0, C) is never used as an address."""
    labels = tl.load(y_ptr + n, mask=row_ok, other=0)
    return labels, row_ok & (labels >= 0) & (labels < C)


@triton.jit
def _mma(a, b, acc, MODE: tl.constexpr, HALF: tl.constexpr):
    """acc + a @ b at about fp32 precision for fp32 a, b (values of magnitude <= ~1).

    fp32 inputs: tf32x3. Half inputs: both operands split hi + lo, three MMAs (lo @ lo dropped).
    """
    if MODE == 0:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        a_hi = a.to(HALF)
        b_hi = b.to(HALF)
        a_lo = (a - a_hi.to(tl.float32)).to(HALF)
        b_lo = (b - b_hi.to(tl.float32)).to(HALF)
        if MODE == 2:
            a_hi, a_lo = a_hi.to(tl.float32), a_lo.to(tl.float32)
            b_hi, b_lo = b_hi.to(tl.float32), b_lo.to(tl.float32)
        acc = tl.dot(a_hi, b_hi, acc)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_lo, b_hi, acc)
    return acc


@triton.jit
def _mma_exact_left(x, b, acc, MODE: tl.constexpr, HALF: tl.constexpr):
    """acc + x @ b for x in the input dtype (exact on the tensor cores) and fp32 b: b split hi + lo."""
    if MODE == 0:
        acc = tl.dot(x, b, acc, input_precision="tf32x3")
    else:
        b_hi = b.to(HALF)
        b_lo = (b - b_hi.to(tl.float32)).to(HALF)
        if MODE == 2:
            x = x.to(tl.float32)
            b_hi, b_lo = b_hi.to(tl.float32), b_lo.to(tl.float32)
        acc = tl.dot(x, b_hi, acc)
        acc = tl.dot(x, b_lo, acc)
    return acc


@triton.jit
def _class_scale(sq, counts, SUMS: tl.constexpr):
    """(1 / the normaliser, radial) of class rows with squared norms sq.

    SUMS (class sums of the batch): norm(P) = S / max(|S|, count eps), 0 for an absent
    class; explicit prototypes: P / max(|P|, eps). radial: whether the normalisation's
    Jacobian has its radial term (not below eps, as clamp_min's gradient).
    """
    norm = tl.sqrt(sq)
    if SUMS:
        floor = counts.to(tl.float32) * NORM_EPS
        inv = tl.where(counts > 0, 1.0 / tl.maximum(norm, floor), 0.0)
        radial = tl.where((counts > 0) & (norm >= floor), 1.0, 0.0)
    else:
        inv = 1.0 / tl.maximum(norm, NORM_EPS)
        radial = tl.where(norm >= NORM_EPS, 1.0, 0.0)
    return inv, radial


@triton.jit
def _class_rows(s_ptr, counts_ptr, cls, cls_ok, stride_sc, D, SUMS: tl.constexpr,
                HAS_COUNTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(inv, radial, candidate) of a class tile: its norms over all of D, and which classes compete."""
    counts = tl.zeros([BLOCK_C], dtype=tl.int64) + 1
    if HAS_COUNTS:
        counts = tl.load(counts_ptr + cls, mask=cls_ok, other=0)
    sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        s = tl.load(s_ptr + cls.to(tl.int64)[:, None] * stride_sc + cols[None, :],
                    mask=cls_ok[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(s * s, axis=1)
    inv, radial = _class_scale(sq, counts, SUMS)
    return inv, radial, cls_ok & (counts > 0)


@triton.jit
def _tile_logits(z_ptr, z_off, row_ok, s_ptr, counts_ptr, cls, stride_sc, D, C, scale2,
                 SUMS: tl.constexpr, HAS_COUNTS: tl.constexpr, MODE: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Logits of a (row tile, class tile), times scale2 (log2(e) / tau: base 2), -inf where a
    class does not compete; with inv_s, the candidates and the rows' norms.

    Raw z rows enter the dot (exact for half inputs) and are scaled by 1 / |z| after it;
    S_hat = S inv_s is split hi + lo. The rows' squared norms come from the same tiles.
    """
    cls_ok = cls < C
    inv_s, _, candidate = _class_rows(s_ptr, counts_ptr, cls, cls_ok, stride_sc, D, SUMS,
                                      HAS_COUNTS, BLOCK_C, BLOCK_DO)
    dots = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    sq_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_off = cls.to(tl.int64) * stride_sc
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        z = tl.load(z_ptr + z_off[:, None] + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        zf = z.to(tl.float32)
        sq_z += tl.sum(zf * zf, axis=1)
        # S loaded transposed, [BLOCK_K, BLOCK_C], ready for the dot.
        s_hat = tl.load(s_ptr + s_off[None, :] + ks[:, None],
                        mask=cls_ok[None, :] & k_ok[:, None],
                        other=0.0).to(tl.float32) * inv_s[None, :]
        dots = _mma_exact_left(z, s_hat, dots, MODE, HALF)
    z_norm = tl.sqrt(sq_z)
    logits2 = dots * (_inv_norm(z_norm) * scale2)[:, None]
    return tl.where(candidate[None, :], logits2, float("-inf")), inv_s, candidate, z_norm


@triton.jit
def _softmax_shift(m):
    """The online softmax's shift: its running max, or 0 while every logit so far is masked
    (m = -inf), so that no -inf - -inf is taken."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_softmax(m, l, logits2):
    """(max, sum of 2^(logit - max)) per row after one more tile of base-2 logits."""
    m_new = tl.maximum(m, tl.max(logits2, axis=1))
    shift = _softmax_shift(m_new)
    return m_new, l * tl.exp2(m - shift) + tl.sum(tl.exp2(logits2 - shift[:, None]), axis=1)


@triton.jit
def _logit_grad(logits2, lse2, labels, row_ok, cls):
    """G = softmax - onehot (dLoss/dlogit for grad_loss = R); 0 for rows out of range."""
    prob = tl.exp2(logits2 - lse2[:, None])
    onehot = tl.where(cls[None, :] == labels[:, None], 1.0, 0.0)
    return tl.where(row_ok[:, None], prob - onehot, 0.0)


@triton.jit
def _dz_hat_tile(s_ptr, cls, inv_s, g, cols, stride_sc, C, D, acc, MODE: tl.constexpr,
                 HALF: tl.constexpr):
    """acc + G @ S_hat[cls, cols]: one class tile's share of dz_hat for a D chunk."""
    s_hat = tl.load(s_ptr + cls.to(tl.int64)[:, None] * stride_sc + cols[None, :],
                    mask=(cls < C)[:, None] & (cols < D)[None, :],
                    other=0.0).to(tl.float32) * inv_s[:, None]
    return _mma(g, s_hat, acc, MODE, HALF)


@triton.jit
def _ds_hat_chunk(z_ptr, z_off, row_ok, inv_z, g, cols, D, acc, MODE: tl.constexpr,
                  HALF: tl.constexpr):
    """acc + z_hat[:, cols]^T @ G: a row tile's share of dS_hat^T for one D chunk.

    The raw rows enter the tensor cores (exact) and 1 / |z| scales G's rows instead, except
    for fp16, whose range 1 / |z| can leave: there z_hat itself is split (three MMAs).
    """
    z = tl.load(z_ptr + z_off[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < D)[None, :],
                other=0.0)
    if MODE == 1 and HALF == tl.float16:
        acc = _mma(tl.trans(z.to(tl.float32) * inv_z[:, None]), g, acc, MODE, HALF)
    else:
        acc = _mma_exact_left(tl.trans(z), g * inv_z[:, None], acc, MODE, HALF)
    return acc


@triton.jit
def _accumulate_ds(part_ptr, pid, fresh, z_ptr, z_off, row_ok, inv_z, g, cls, C, D, scale,
                   MODE: tl.constexpr, HALF: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    """part[pid, cls, :] (fresh: =, else +=) scale * z_hat^T G over every D chunk (stored as [C, D])."""
    for d0 in range(0, D, BLOCK_DO):
        cols = d0 + tl.arange(0, BLOCK_DO)
        ds_hat = _ds_hat_chunk(z_ptr, z_off, row_ok, inv_z, g, cols, D,
                               tl.zeros([BLOCK_DO, BLOCK_C], dtype=tl.float32), MODE, HALF) * scale
        block = part_ptr + (pid.to(tl.int64) * C + cls)[None, :] * D + cols[:, None]
        ok = (cols < D)[:, None] & (cls < C)[None, :]
        if not fresh:
            ds_hat += tl.load(block, mask=ok, other=0.0)
        tl.store(block, ds_hat, mask=ok)


@triton.jit
def _finalize_ds(part_ptr, num_parts, s_ptr, counts_ptr, ds_ptr, cls, cls_ok, stride_sc, C, D,
                 SUMS: tl.constexpr, HAS_COUNTS: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """dS = (dS_hat - radial S_hat (S_hat . dS_hat)) inv_s for a class tile, dS_hat = sum of parts.

    Two passes over D: S_hat . dS_hat needs all of dS_hat before any of dS is written. The parts
    are added in order (deterministic); ds may be part 0 itself (each element is read before
    it is written, by the same thread).
    """
    inv_s, radial, _ = _class_rows(s_ptr, counts_ptr, cls, cls_ok, stride_sc, D, SUMS, HAS_COUNTS,
                                   BLOCK_C, BLOCK_D)
    dot = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds_hat, s, offs, ok = _ds_hat_parts(part_ptr, num_parts, s_ptr, cls, cls_ok, d0, stride_sc,
                                            C, D, BLOCK_C, BLOCK_D)
        dot += tl.sum(ds_hat * s, axis=1)
    coef = radial * inv_s * inv_s * dot
    for d0 in range(0, D, BLOCK_D):
        ds_hat, s, offs, ok = _ds_hat_parts(part_ptr, num_parts, s_ptr, cls, cls_ok, d0, stride_sc,
                                            C, D, BLOCK_C, BLOCK_D)
        tl.store(ds_ptr + offs, inv_s[:, None] * (ds_hat - coef[:, None] * s), mask=ok)


@triton.jit
def _ds_hat_parts(part_ptr, num_parts, s_ptr, cls, cls_ok, d0, stride_sc, C, D,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(dS_hat = the parts' sum in order, S as fp32, offsets in [C, D], mask) of one D chunk."""
    cols = d0 + tl.arange(0, BLOCK_D)
    ok = cls_ok[:, None] & (cols < D)[None, :]
    offs = cls.to(tl.int64)[:, None] * D + cols[None, :]
    ds_hat = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for p in range(0, num_parts):
        ds_hat += tl.load(part_ptr + p * C * D + offs, mask=ok, other=0.0)
    s = tl.load(s_ptr + cls.to(tl.int64)[:, None] * stride_sc + cols[None, :], mask=ok,
                other=0.0).to(tl.float32)
    return ds_hat, s, offs, ok


# ------------------------------------------------------------ scatter-mean
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


# ------------------------------------------------------- prototype InfoNCE
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


# --------------------------------------------------------------- launchers
def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (the kernels take any other stride), else a copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _dot_meta(dtype: torch.dtype) -> dict:
    return dict(MODE=_dot_mode(dtype), HALF=TRITON_HALF[dtype])


def _sum_splits(rows: int, dim: int, num_classes: int) -> int:
    """Row splits of a (class tile, D chunk) grid, the sums' or the class split's dS_hat: one
    unless a program would walk too many row tiles on an idle GPU."""
    row_tiles = triton.cdiv(rows, ROWS)
    programs = triton.cdiv(num_classes, class_block(num_classes)) * triton.cdiv(dim, D_OUT)
    if row_tiles <= MAX_SERIAL_STEPS or 2 * programs >= TARGET_PROGRAMS:
        return 1
    return min(triton.cdiv(row_tiles, MAX_SERIAL_STEPS), triton.cdiv(TARGET_PROGRAMS, programs))


def class_sums(z: torch.Tensor, y: torch.Tensor, num_classes: int, mean: bool):
    """(per-class sums in fp32, or means in z.dtype; counts [C] int64) of the rows of z [V, N, D].

    Rows of every view count (label y[n] for z[v, n]); a label outside [0, C) counts nowhere.
    One launch, or two when the rows are split (added in split order: deterministic).
    """
    views, n, dim = z.shape
    rows = views * n
    block_c = class_block(num_classes)
    out_dtype = z.dtype if mean else torch.float32
    out = torch.empty((num_classes, dim), dtype=out_dtype, device=z.device)
    counts = torch.empty(num_classes, dtype=torch.int64, device=z.device)
    splits = _sum_splits(rows, dim, num_classes)
    grid = triton.cdiv(num_classes, block_c) * triton.cdiv(dim, D_OUT)
    args = dict(R=rows, N=n, D=dim, C=num_classes, stride_zv=z.stride(0), stride_zn=z.stride(1),
                num_splits=splits, MEAN=mean, BLOCK_M=ROWS, BLOCK_C=block_c, BLOCK_D=D_OUT,
                MODE=_dot_mode(z.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if splits == 1:
        _class_sums_kernel[(grid,)](z, y, out, counts, FINAL=True, **args)
        return out, counts
    part = torch.empty((splits, num_classes, dim), dtype=torch.float32, device=z.device)
    part_counts = torch.empty((splits, num_classes), dtype=torch.int32, device=z.device)
    _class_sums_kernel[(grid * splits,)](z, y, part, part_counts, FINAL=False, **args)
    _class_sums_reduce_kernel[(grid,)](part, part_counts, out, counts, num_classes, dim, splits,
                                       MEAN=mean, BLOCK_C=block_c, BLOCK_D=D_OUT,
                                       num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out, counts


def batch_prototypes_forward(z: torch.Tensor, y: torch.Tensor, num_classes: int):
    """(prototypes [C, D] in z.dtype, counts [C] int64) of z [N, D] by labels y [N]."""
    return class_sums(_unit_stride(z).unsqueeze(0), y.contiguous(), num_classes, mean=True)


def batch_prototypes_backward(grad_prototypes: torch.Tensor, y: torch.Tensor,
                              counts: torch.Tensor) -> torch.Tensor:
    """dz [N, D] in the gradient's dtype: dz_i = dP_{y_i} / count_{y_i}."""
    grad_prototypes = _unit_stride(grad_prototypes)
    (num_classes, dim), n = grad_prototypes.shape, y.shape[0]
    dz = torch.empty((n, dim), dtype=grad_prototypes.dtype, device=grad_prototypes.device)
    _gather_mean_grad_kernel[(triton.cdiv(n, ROWS), triton.cdiv(dim, D_OUT))](
        grad_prototypes, y.contiguous(), counts, dz, n, dim, num_classes,
        grad_prototypes.stride(0), BLOCK_N=ROWS, BLOCK_D=D_OUT, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dz


def _forward_plan(rows: int, dim: int, num_classes: int, need_ds: bool) -> tuple[int, int]:
    """(programs, row tiles per program) of the forward kernel.

    A program takes as many row tiles as fit in MAX_SERIAL_STEPS tile steps (fewer
    programs: fewer dS partials to write and add), but never so few programs that a
    large batch leaves SMs idle.
    """
    row_tiles = triton.cdiv(rows, ROWS)
    class_tiles = triton.cdiv(num_classes, class_block(num_classes))
    logit_steps = triton.cdiv(dim, K_CHUNK) * class_tiles
    steps = logit_steps
    if need_ds:
        steps += triton.cdiv(dim, D_OUT) * class_tiles + (logit_steps if class_tiles > 1 else 0)
    per_program = max(1, MAX_SERIAL_STEPS // steps, triton.cdiv(row_tiles, TARGET_PROGRAMS))
    per_program = min(per_program, row_tiles)
    return triton.cdiv(row_tiles, per_program), per_program


def splits_classes(rows: int, num_classes: int) -> bool:
    """Whether the loss takes the class split: several class tiles (one tile's logits stay in
    registers, and the row programs are the better plan), and logits small enough to stage."""
    return num_classes > class_block(num_classes) and rows * num_classes <= STAGED_LOGITS_LIMIT


def staged_size(rows: int, num_classes: int) -> int:
    """Elements of the class split's staged statistics (fp32): logits [R, C], |z| [R], inv_s [C];
    0 when the rows' programs recompute the logits instead."""
    return rows * num_classes + rows + num_classes if splits_classes(rows, num_classes) else 0


def prototype_infonce_forward(z: torch.Tensor, y: torch.Tensor, prototypes: Optional[torch.Tensor],
                              counts: Optional[torch.Tensor], num_classes: int, tau: float,
                              need_ds: bool):
    """The loss of z [V, N, D] against the batch's class sums (prototypes None) or prototypes.

    Returns (loss 0-dim in z.dtype, lse [V, N] fp32, S [C, D] (fp32 sums, or the prototypes),
    counts [C] int64 (empty without), dS_unit [C, D] fp32: the gradient of the loss for grad 1
    reaching S (empty unless need_ds), the staged statistics (fp32 [staged_size], empty unless
    the class split runs)). counts with explicit prototypes masks absent classes.
    """
    z, y = _unit_stride(z), y.contiguous()
    views, n, dim = z.shape
    rows, device = views * n, z.device
    sums = prototypes is None
    if splits_classes(rows, num_classes):
        if sums:
            s, counts = class_sums(z, y, num_classes, mean=False)
        else:
            s = _unit_stride(prototypes)
        return _class_split_forward(z, y, s, counts, sums, num_classes, tau, need_ds)
    programs, per_program = _forward_plan(rows, dim, num_classes, need_ds)
    single = programs == 1
    fused_sums = sums and single
    if fused_sums:  # one program does every row: it writes the class sums itself first
        s = torch.empty((num_classes, dim), dtype=torch.float32, device=device)
        counts = torch.empty(num_classes, dtype=torch.int64, device=device)
    elif sums:
        s, counts = class_sums(z, y, num_classes, mean=False)
    else:
        s = _unit_stride(prototypes)
    has_counts = counts is not None
    if not has_counts:
        counts = torch.empty(0, dtype=torch.int64, device=device)
    block_c = class_block(num_classes)
    lse = torch.empty((views, n), dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=z.dtype, device=device)
    loss_out = loss if single else torch.empty(programs, dtype=torch.float32, device=device)
    part = torch.empty((programs if need_ds else 0, num_classes, dim), dtype=torch.float32,
                       device=device)
    flags = dict(SUMS=sums, HAS_COUNTS=has_counts, NEED_DS=need_ds)
    _infonce_fwd_kernel[(programs,)](
        z, y, s, counts, lse, loss_out, part, rows, n, dim, num_classes, z.stride(0), z.stride(1),
        s.stride(0), 1.0 / tau, 1.0 / rows, per_program, SINGLE=single,
        ONE_TILE=num_classes <= block_c, FUSED_SUMS=fused_sums, BLOCK_M=ROWS, BLOCK_C=block_c,
        BLOCK_K=K_CHUNK, BLOCK_DO=D_OUT, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **flags,
        **_dot_meta(z.dtype))
    if single:
        ds = part[0] if need_ds else torch.empty(0, dtype=torch.float32, device=device)
    else:
        ds = torch.empty((num_classes, dim) if need_ds else 0, dtype=torch.float32, device=device)
        finalize_programs = 1 + (triton.cdiv(num_classes, block_c) if need_ds else 0)
        _infonce_finalize_kernel[(finalize_programs,)](
            part, programs, s, counts, ds, loss_out, loss, num_classes, dim, s.stride(0),
            BLOCK_C=block_c, BLOCK_D=D_OUT, LOSS_BLOCK=LOSS_CHUNK, num_warps=NUM_WARPS,
            num_stages=NUM_STAGES, **flags)
    return loss, lse, s, counts, ds, torch.empty(0, dtype=torch.float32, device=device)


def _class_split_forward(z, y, s, counts, sums, num_classes, tau, need_ds):
    """The forward when classes are many and rows few: (row tile, class chunk) programs stage
    the logits and the softmax partials, then (class tile, D chunk, row split) programs take G
    from them for dS_hat and the loss, and the finalize kernel applies dS's Jacobian and adds
    the splits in order. 3 launches after the sums; the backward reads the staged logits."""
    views, n, dim = z.shape
    rows, device = views * n, z.device
    has_counts = counts is not None
    if not has_counts:
        counts = torch.empty(0, dtype=torch.int64, device=device)
    block_c = class_block(num_classes)
    class_tiles, row_tiles = triton.cdiv(num_classes, block_c), triton.cdiv(rows, ROWS)
    # One class tile is a step per K chunk of the logits and per D chunk of its norms.
    tile_steps = triton.cdiv(dim, K_CHUNK) + triton.cdiv(dim, D_OUT)
    tiles_per_chunk = max(1, MAX_SERIAL_STEPS // tile_steps)
    chunks = triton.cdiv(class_tiles, tiles_per_chunk)
    stats = torch.empty(staged_size(rows, num_classes), dtype=torch.float32, device=device)
    lse_part = torch.empty((2, chunks, rows), dtype=torch.float32, device=device)
    dot = _dot_meta(z.dtype)
    _infonce_lse_kernel[(row_tiles * chunks,)](
        z, y, s, counts, stats, lse_part, rows, n, dim, num_classes, z.stride(0), z.stride(1),
        s.stride(0), 1.0 / tau, tiles_per_chunk, SUMS=sums, HAS_COUNTS=has_counts, BLOCK_M=ROWS,
        BLOCK_C=block_c, BLOCK_K=K_CHUNK, BLOCK_DO=D_OUT, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES, **dot)
    if need_ds:  # the same (class tile, D chunk) grid as the sums
        splits = _sum_splits(rows, dim, num_classes)
    else:  # the loss alone: one program per split, so split the rows as finely as the steps ask
        splits = min(triton.cdiv(row_tiles, MAX_SERIAL_STEPS), TARGET_PROGRAMS)
    lse = torch.empty((views, n), dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=z.dtype, device=device)
    loss_part = torch.empty(splits, dtype=torch.float32, device=device)
    part = torch.empty((splits if need_ds else 0, num_classes, dim), dtype=torch.float32,
                       device=device)
    programs = class_tiles * triton.cdiv(dim, D_OUT) if need_ds else 1
    _infonce_class_grad_kernel[(programs * splits,)](
        z, y, stats, lse_part, lse, loss_part, part, rows, n, dim, num_classes, z.stride(0),
        z.stride(1), 1.0 / tau, 1.0 / rows, chunks, splits, NEED_DS=need_ds, BLOCK_M=ROWS,
        BLOCK_C=block_c, BLOCK_DO=D_OUT, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **dot)
    # One split: dS is finalised in place in its part (each element read before it is written).
    ds = part[0] if need_ds and splits == 1 else torch.empty(
        (num_classes, dim) if need_ds else 0, dtype=torch.float32, device=device)
    _infonce_finalize_kernel[(1 + (class_tiles if need_ds else 0),)](
        part, splits, s, counts, ds, loss_part, loss, num_classes, dim, s.stride(0),
        SUMS=sums, HAS_COUNTS=has_counts, NEED_DS=need_ds, BLOCK_C=block_c, BLOCK_D=D_OUT,
        LOSS_BLOCK=LOSS_CHUNK, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return loss, lse, s, counts, ds, stats


def prototype_infonce_backward(grad_loss: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                               s: torch.Tensor, counts: torch.Tensor, lse: torch.Tensor,
                               ds: torch.Tensor, stats: torch.Tensor, tau: float, sums: bool,
                               through: bool, need_dp: bool):
    """(dz [V, N, D] in z.dtype, dP [C, D] in the prototypes' dtype or empty) in one launch.

    through: the batch prototypes' path (dz += grad dS_{y}); need_dp: explicit prototypes
    that want their gradient (grad dS_unit); stats: the class split's staged statistics.
    """
    z, y = _unit_stride(z), y.contiguous()
    views, n, dim = z.shape
    rows, num_classes = views * n, s.shape[0]
    block_c = class_block(num_classes)
    row_tiles = triton.cdiv(rows, ROWS)
    d_chunks = triton.cdiv(dim, D_OUT)
    staged = stats.numel() > 0
    # A program walks its row tile's logits and then its D chunks of dz; several programs share
    # the D chunks (each recomputing, or loading when staged, the logits) only where one would
    # walk too many steps.
    class_tiles = triton.cdiv(num_classes, block_c)
    logit_steps = class_tiles * (1 if staged else triton.cdiv(dim, K_CHUNK))
    steps = logit_steps + d_chunks * (class_tiles + (logit_steps if class_tiles > 1 else 0))
    d_split = max(1, min(d_chunks, triton.cdiv(steps, MAX_SERIAL_STEPS)))
    dz = torch.empty((views, n, dim), dtype=z.dtype, device=z.device)
    dp = torch.empty((num_classes, dim) if need_dp else 0, dtype=s.dtype, device=z.device)
    dp_programs = triton.cdiv(num_classes * dim, FINAL_COLS * 4) if need_dp else 0
    _infonce_bwd_kernel[(row_tiles * d_split + dp_programs,)](
        grad_loss, z, y, s, counts, lse, ds, stats, dz, dp, rows, n, dim, num_classes,
        z.stride(0), z.stride(1), s.stride(0), 1.0 / tau, 1.0 / rows, d_split, SUMS=sums,
        HAS_COUNTS=counts.numel() > 0, THROUGH=through, NEED_DP=need_dp,
        ONE_TILE=num_classes <= block_c, STAGED=staged, BLOCK_M=ROWS, BLOCK_C=block_c,
        BLOCK_K=K_CHUNK, BLOCK_DO=D_OUT, DP_BLOCK=FINAL_COLS * 4, num_stages=NUM_STAGES,
        num_warps=STAGED_BWD_WARPS if staged else NUM_WARPS,
        **_dot_meta(z.dtype))
    return dz, dp


# ------------------------------------------------------------ AOT declaration
def aot_specs() -> list[KernelSpec]:
    """Every kernel in every config it launches with (per dtype, class tile and mode flags)."""
    specs = []
    for torch_dtype, t in TORCH_TO_TRITON.items():
        dot = dict(MODE=DOT_FP32 if t == "fp32" else DOT_HALF, HALF=TRITON_HALF[torch_dtype])
        z = {"z_ptr": f"*{t}", "y_ptr": "*i64", "R": "i32", "N": "i32", "D": "i32", "C": "i32",
             "stride_zv": "i32", "stride_zn": "i32"}
        for mean in (True, False):
            for final in (True, False):
                specs.append(KernelSpec(
                    f"class_sums[{t},MEAN={mean},FINAL={final}]", _class_sums_kernel,
                    {**z, "out_ptr": f"*{t}" if mean and final else "*fp32",
                     "counts_ptr": "*i64" if final else "*i32", "num_splits": "i32"},
                    dict(MEAN=mean, FINAL=final, MODE=dot["MODE"], BLOCK_M=ROWS, BLOCK_C=32,
                         BLOCK_D=D_OUT), num_warps=NUM_WARPS, num_stages=NUM_STAGES))
            specs.append(KernelSpec(
                f"class_sums_reduce[{t},MEAN={mean}]", _class_sums_reduce_kernel,
                {"part_ptr": "*fp32", "part_counts_ptr": "*i32",
                 "out_ptr": f"*{t}" if mean else "*fp32", "counts_ptr": "*i64", "C": "i32",
                 "D": "i32", "num_splits": "i32"},
                dict(MEAN=mean, BLOCK_C=32, BLOCK_D=D_OUT), num_warps=NUM_WARPS, num_stages=NUM_STAGES))
        specs.append(KernelSpec(
            f"gather_mean_grad[{t}]", _gather_mean_grad_kernel,
            {"grad_ptr": f"*{t}", "y_ptr": "*i64", "counts_ptr": "*i64", "dz_ptr": f"*{t}",
             "N": "i32", "D": "i32", "C": "i32", "stride_gc": "i32"},
            dict(BLOCK_N=ROWS, BLOCK_D=D_OUT), num_warps=NUM_WARPS, num_stages=NUM_STAGES))
        for block_c, one_tile in ((16, True), (32, True), (32, False)):
            for sums in (True, False):
                s_type = "*fp32" if sums else f"*{t}"
                shared = {**z, "s_ptr": s_type, "counts_ptr": "*i64", "lse_ptr": "*fp32",
                          "stride_sc": "i32", "inv_tau": "fp32", "inv_rows": "fp32"}
                flags = dict(SUMS=sums, HAS_COUNTS=sums, ONE_TILE=one_tile, BLOCK_M=ROWS,
                             BLOCK_C=block_c, BLOCK_K=K_CHUNK, BLOCK_DO=D_OUT, **dot)
                tag = f"{t},BLOCK_C={block_c},ONE_TILE={one_tile},SUMS={sums}"
                for single, fused in sorted({(True, sums), (True, False), (False, False)}):
                    specs.append(KernelSpec(
                        f"infonce_fwd[{tag},SINGLE={single},FUSED_SUMS={fused}]",
                        _infonce_fwd_kernel,
                        {**shared, "loss_ptr": f"*{t}" if single else "*fp32",
                         "part_ptr": "*fp32", "tiles_per_program": "i32"},
                        dict(flags, NEED_DS=True, SINGLE=single, FUSED_SUMS=fused),
                        num_warps=NUM_WARPS, num_stages=NUM_STAGES))
                specs.append(KernelSpec(
                    f"infonce_finalize[{tag}]", _infonce_finalize_kernel,
                    {"part_ptr": "*fp32", "num_parts": "i32", "s_ptr": s_type,
                     "counts_ptr": "*i64", "ds_ptr": "*fp32", "loss_part_ptr": "*fp32",
                     "loss_ptr": f"*{t}", "C": "i32", "D": "i32", "stride_sc": "i32"},
                    dict(SUMS=sums, HAS_COUNTS=sums, NEED_DS=True, BLOCK_C=block_c,
                         BLOCK_D=D_OUT, LOSS_BLOCK=LOSS_CHUNK), num_warps=NUM_WARPS, num_stages=NUM_STAGES))
                for staged in (False, True) if not one_tile else (False,):
                    specs.append(KernelSpec(
                        f"infonce_bwd[{tag},STAGED={staged}]", _infonce_bwd_kernel,
                        {**shared, "grad_ptr": f"*{t}", "ds_ptr": "*fp32", "stats_ptr": "*fp32",
                         "dz_ptr": f"*{t}", "dp_ptr": f"*{t}", "d_split": "i32"},
                        dict(flags, THROUGH=sums, NEED_DP=not sums, STAGED=staged,
                             DP_BLOCK=FINAL_COLS * 4),
                        num_warps=STAGED_BWD_WARPS if staged else NUM_WARPS,
                        num_stages=NUM_STAGES))
                if not one_tile:  # the class split
                    specs.append(KernelSpec(
                        f"infonce_lse[{tag}]", _infonce_lse_kernel,
                        {**z, "s_ptr": s_type, "counts_ptr": "*i64", "stats_ptr": "*fp32",
                         "lse_part_ptr": "*fp32", "stride_sc": "i32", "inv_tau": "fp32",
                         "tiles_per_chunk": "i32"},
                        dict(SUMS=sums, HAS_COUNTS=sums, BLOCK_M=ROWS, BLOCK_C=block_c,
                             BLOCK_K=K_CHUNK, BLOCK_DO=D_OUT, **dot),
                        num_warps=NUM_WARPS, num_stages=NUM_STAGES))
        for need_ds in (True, False):
            specs.append(KernelSpec(
                f"infonce_class_grad[{t},NEED_DS={need_ds}]", _infonce_class_grad_kernel,
                {**z, "stats_ptr": "*fp32", "lse_part_ptr": "*fp32", "lse_ptr": "*fp32",
                 "loss_part_ptr": "*fp32", "part_ptr": "*fp32", "inv_tau": "fp32",
                 "inv_rows": "fp32", "num_chunks": "i32", "num_splits": "i32"},
                dict(NEED_DS=need_ds, BLOCK_M=ROWS, BLOCK_C=32, BLOCK_DO=D_OUT, **dot),
                num_warps=NUM_WARPS, num_stages=NUM_STAGES))
    return specs


def aot_launches():
    """Forward + backward of the prototype InfoNCE (batch prototypes, V = 1 and 3; explicit
    prototypes) and of the scatter-mean, at the benchmark shapes (N = 32, 1024, 65536 x
    C = 20, 30, 1024; D = 768), the structure test's (N = 256, D = 128, C = 20) and one past
    the staging limit, each dtype."""
    from mvcl_fast.kernels.aot import mode_name

    def step(views, n, dim, num_classes, dtype, explicit):
        def launch():
            z = torch.empty(views, n, dim, dtype=dtype)
            y = torch.randint(num_classes, (n,))
            prototypes = torch.empty(num_classes, dim, dtype=dtype) if explicit else None
            _, lse, s, counts, ds, stats = prototype_infonce_forward(
                z, y, prototypes, None, num_classes, 0.1, True)
            prototype_infonce_backward(torch.ones((), dtype=dtype), z, y,
                                       s if prototypes is None else prototypes, counts, lse, ds,
                                       stats, 0.1, not explicit, not explicit, explicit)
            if views == 1 and not explicit:
                means, counts = batch_prototypes_forward(z[0], y, num_classes)
                batch_prototypes_backward(means, y, counts)
        return launch

    # C = 2048 at 3 x 65536 rows: too many logits to stage, the row programs recompute them.
    shapes = [(v, n, 768, c, e) for n in (32, 1024, 65536) for c in (20, 30, 1024)
              for v, e in ((1, False), (3, False), (1, True))] + [
        (1, 256, 128, 20, False), (3, 65536, 768, 2048, False)]
    return [(f"prototypes[V={v},N={n},D={d},C={c},{'explicit' if e else 'batch'},"
             f"{mode_name(dtype, False)}]", step(v, n, d, c, dtype, e))
            for dtype in TORCH_TO_TRITON for v, n, d, c, e in shapes]
