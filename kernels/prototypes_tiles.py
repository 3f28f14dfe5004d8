"""The @triton.jit helpers of the prototype kernels (mvcl_fast.kernels.prototypes describes
the design): row and class addressing, the dot modes' MMAs, logits tiles, the online
softmax and the class-side gradient GEMM."""
from __future__ import annotations

import triton
import triton.language as tl

from mvcl_fast.kernels.shared import NORM_EPS


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
