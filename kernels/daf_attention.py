"""Fused DAF attention: out = residual + sigmoid(gate) * MHA(q, k, v), forward and backward.

FlashAttention-style (as the Triton tutorial 06-fused-attention and
FlashAttention's Triton kernel), for the coarse-to-fine fusion of MVCL-DAF++
(docs/design.md, op 4), in two launches, one per direction:

* forward: one program per (query tile, batch * head). The Q tile stays
  resident while K/V tiles stream past it with an online softmax in base 2
  (log2(e) folded into the scale). The epilogue applies the gate and the
  residual and also stores the ungated attention (the factor of dgate) and
  the natural-log log-sum-exp of each row for the backward.
* backward: one program per (batch * head), walking its queries in row tiles
  (DAF's text side is short, Lq = 30-80: one to three tiles, see _row_tile).
  The preprocess is folded into each tile's prologue (dattn = grad_out *
  sigmoid(gate), dgate, delta = rowsum(dattn * attn)); then K/V tiles stream
  past: dQ of the row tile accumulates in registers and is stored after its
  key loop; dK/dV of a key tile are complete after the last row tile, the
  earlier ones leaving fp32 partial sums that only this program reads back
  (a barrier between row tiles orders them). No atomics, no zeroed buffers,
  no casts: one launch per direction at every length, K and V streamed from
  DRAM twice per step in all (the row tiles re-read them from L2).

Both kernels stop at each batch row's last unpadded key (scanned from the
mask in the kernel, no host sync), so the work follows the valid length;
the backward writes the zero dK/dV of the skipped keys.

Heads are read in place: head h of a [B, L, D] tensor is its columns
h * head_dim : (h + 1) * head_dim, addressed through the tensor's strides (no
transpose, no copy; non-contiguous inputs work as they are). Head dims that
are not powers of two run in a padded BLOCK_HD tile with masked columns.

Padded keys (key_padding_mask True) get score -inf. A query whose keys are all
padded gets attention 0 and lse -inf, never NaN: the running max is replaced
by 0 while it is still -inf (so exp2 stays finite), the normaliser by 1 where
it is 0, and in the backward lse -inf becomes +inf so that p = exp2(s - lse)
is exactly 0 for such rows.

Precision: fp16/bf16 inputs feed tensor-core dots with fp32 accumulation; p
and dS are rounded to the input dtype before their dots, as in FlashAttention.
fp32 dots are IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 is set.

Launch configs are pinned per dot kind, head width and query-length bucket
(CONFIGS); MVCL_FAST_AUTOTUNE=1 makes each launch search the full config
space (SEARCH_SPACE) instead and print the config it chose, to pin.
Offsets within one batch item are 32-bit: a [L, D] slice (its rows times its
row stride) must stay under 2**31 elements.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mvcl_fast.backend import triton_interpreter_enabled
from mvcl_fast.kernels.shared import (ARCH_CLASSES, AUTOTUNE_ENV, LN2, LOG2E, LaunchConfig,
                                      arch_class, autotune_requested, fp32_dot_precision,
                                      lacks_bf16_dot)

MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class _Config(LaunchConfig):
    """A launch of the DAF kernels: block_m query rows x block_n keys (no block_k: a program's
    dots span the head). The forward's block_m holds up to SHORT_QUERIES queries, long_block_m
    more; the backward's block_m is its largest row tile (_row_tile picks the launch's)."""
    long_block_m: int = 0


# Pinned launch configs, one set of rows for sm_80 and sm_90a (no GPU has tuned them apart
# yet: MVCL_FAST_AUTOTUNE=1 on one prints what to pin). Rows of (target: "gpu" or
# "interpreter", kernel, dot kind ("mma": fp16/bf16 and tf32 on tensor cores; "fma": IEEE fp32,
# whose dots unroll into FMAs), widest head row in bytes = element size x BLOCK_HD,
# _Config(block_m, block_n, block_k, num_warps, num_stages, ...)), None matching any; a launch
# takes the first row that matches it.
# Every specialisation of the AOT launches (mvcl_fast.tools.aot_launches) compiles for
# sm_90a without spills under triton 3.6.0 and 3.9.0 (python -m mvcl_fast.tools.report).
# 128 rows of 128 bytes (bf16 head dim 64) spill at 255 registers (8 warps, 16 or 32 keys; 16
# warps: 128 registers, spills); so do 64-row forward tiles of 128-byte heads, and IEEE fp32
# backward tiles of 32 x 16 at head dim 64 (ptxas of triton 3.6; 16 x 16 at 8 warps under 3.9)
# and IEEE fp32 forward tiles of 32 x 32 at head dim 32 (triton 3.6).
# Launches on sm_80, sm_86 and sm_89 also pass shared.MAX_REGISTERS' cap of 255: without it
# ptxas held the fp16/bf16 backward at head dim 64 (32 x 32 tiles) to 168 registers on sm_86
# and sm_89 and spilled 16 B.
SHORT_QUERIES = 128
CONFIGS = (
    # forward: 16 query rows fit Lq = 30-80 with at most 15 masked rows (none at 48 or 80).
    ("gpu", "fwd", "mma", 128, _Config(16, 64, 0, 4, 3, long_block_m=32)),
    ("gpu", "fwd", "mma", 512, _Config(16, 32, 0, 4, 3, long_block_m=32)),
    ("gpu", "fwd", "fma", 512, _Config(16, 32, 0, 8, 2, long_block_m=16)),
    # The 128-byte backward row takes 4 warps: at 8 its 32 x 32 tiles (Lq = 80) spill 4-16
    # bytes at 128 registers under both.
    ("gpu", "bwd", "mma", 128, _Config(64, 32, 0, 4, 2)),
    ("gpu", "bwd", "mma", 512, _Config(32, 32, 0, 8, 2)),
    # The 256-byte FMA row one stage: at two, its 16 x 16 tiles spill 8 bytes at 96 registers
    # under 3.9.
    ("gpu", "bwd", "fma", 256, _Config(16, 16, 0, 4, 1)),
    ("gpu", "bwd", "fma", 512, _Config(16, 16, 0, 8, 2)),
    # The interpreter runs every program in numpy, at a cost per tile op: the CPU tests launch
    # few large tiles (which still cut their 80 queries x 231 keys into ragged blocks) and
    # force the GPU's smallest tiles where they test many blocks.
    ("interpreter", "fwd", None, 512, _Config(64, 128, 0, 4, 1, long_block_m=64)),
    ("interpreter", "bwd", None, 512, _Config(128, 128, 0, 4, 1)),
)
# What MVCL_FAST_AUTOTUNE=1 searches (pruned to the launch's lengths): per kernel, every
# combination of these values of the _Config fields.
SEARCH_SPACE = {
    "fwd": {"block_m": (16, 32, 64, 128), "block_n": (16, 32, 64, 128), "num_warps": (4, 8),
            "num_stages": (2, 3)},
    "bwd": {"block_m": (16, 32, 64, 128), "block_n": (16, 32, 64, 128), "num_warps": (4, 8),
            "num_stages": (1, 2, 3)},
}
TUNE_KEY = ["HEAD_DIM", "PRECISION", "len_q_bucket", "len_k_bucket"]  # + the tensors' dtypes


def _dot_kind(dtype: torch.dtype, precision: str) -> str:
    return "fma" if dtype == torch.float32 and precision == "ieee" else "mma"


def _config_target() -> str:
    """Which rows of CONFIGS launches take: "interpreter" under Triton's interpreter, else "gpu"."""
    return "interpreter" if triton_interpreter_enabled() else "gpu"


def _config(kernel: str, dtype: torch.dtype, precision: str, block_hd: int,
            target: str | None = None) -> _Config:
    """The config of a `kernel` launch at this dtype, dot precision and padded head width, for
    `target` (by default _config_target()'s): the first matching row of CONFIGS."""
    target = target or _config_target()
    kind, row_bytes = _dot_kind(dtype, precision), dtype.itemsize * block_hd
    for row_target, row_kernel, row_kind, widest, config in CONFIGS:
        if (row_target in (None, target) and row_kernel == kernel and row_kind in (None, kind)
                and row_bytes <= widest):
            return config
    raise ValueError(f"no pinned daf_attention {kernel} config for {row_bytes}-byte head rows "
                     f"({dtype}, BLOCK_HD={block_hd})")


def _length_bucket(length: int) -> int:
    """Autotune key for a sequence length: powers of two from 16 to 4096."""
    return min(max(triton.next_power_of_2(length), 16), 4096)


def _row_tile(len_q: int, largest: int) -> int:
    """The backward's row tile: the largest power of two from 16 to `largest` whose tiles leave
    at most a quarter of their rows masked (each row tile is one more pass over K and V; Lq = 80
    gets 32, Lq = 48 gets one tile of 64), else 16."""
    block_m = largest
    while block_m > 16:
        padded = triton.cdiv(len_q, block_m) * block_m
        if 4 * (padded - len_q) <= padded:
            break
        block_m //= 2
    return block_m


def _search_space(kernel: str, arch: str = "sm_90") -> list:
    space = SEARCH_SPACE[kernel]
    configs = []
    for values in itertools.product(*space.values()):
        config = _Config(block_k=0, **dict(zip(space, values)))
        configs.append(triton.Config({"BLOCK_M": config.block_m, "BLOCK_N": config.block_n},
                                     **config.options(arch)))
    return configs


def _prune_to_lengths(configs, named_args, **kwargs):
    """Drop tiles longer than the bucketed sequences (>= 16, so the 16-wide tiles stay):
    mostly masked work."""
    args = {**named_args, **kwargs}
    return [config for config in configs
            if config.kwargs["BLOCK_M"] <= args["len_q_bucket"]
            and config.kwargs["BLOCK_N"] <= args["len_k_bucket"]]


def _tuner(kernel: str, fn, arch: str, **options):
    return triton.autotune(configs=_search_space(kernel, arch), key=TUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune_to_lengths}, **options)(fn)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: in fp32 (the interpreter has no bf16 dot)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _head_base(X, pid_bh, num_heads, stride_b, stride_d, HEAD_DIM: tl.constexpr):
    """Pointer to element (batch, row 0, first column of the head) of a [B, L, D] tensor."""
    batch = (pid_bh // num_heads).to(tl.int64)
    head = (pid_bh % num_heads).to(tl.int64)
    return X + batch * stride_b + head * HEAD_DIM * stride_d


@triton.jit
def _load_tile(base, rows, len_rows, stride_row, stride_d, HEAD_DIM: tl.constexpr, BLOCK_HD: tl.constexpr):
    """[rows, BLOCK_HD] tile of one head, zero outside the sequence and the head dim.

    Pointers are rebuilt at every call rather than carried across loops:
    a carried [64, 64] pointer tensor alone costs 64 registers per thread.
    """
    cols = tl.arange(0, BLOCK_HD)
    mask = (rows < len_rows)[:, None] & (cols < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, rows, len_rows, stride_row, stride_d, HEAD_DIM: tl.constexpr,
                BLOCK_HD: tl.constexpr):
    cols = tl.arange(0, BLOCK_HD)
    mask = (rows < len_rows)[:, None] & (cols < HEAD_DIM)[None, :]
    tl.store(base + rows[:, None] * stride_row + cols[None, :] * stride_d,
             value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _key_valid(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, cols, len_k, HAS_MASK: tl.constexpr):
    """Keys that exist (cols < len_k) and are not padded."""
    valid = cols < len_k
    if HAS_MASK:
        batch = (pid_bh // num_heads).to(tl.int64)
        padded = tl.load(KEY_PAD + batch * stride_pb + cols * stride_pn, mask=valid, other=1)
        valid = valid & (padded == 0)
    return valid


@triton.jit
def _base2_lse(LSE, rows, len_q):
    """The saved natural lse in base 2; +inf for rows without keys (and tail rows) so p = 0."""
    lse = tl.load(LSE + rows, mask=rows < len_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _key_end(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, len_k, HAS_MASK: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """One past the last unpadded key of this program's batch row: where its key loop stops."""
    if HAS_MASK:
        pad_row = KEY_PAD + (pid_bh // num_heads).to(tl.int64) * stride_pb
        ends = tl.zeros([BLOCK_N], dtype=tl.int32)
        for start in range(0, len_k, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            padded = tl.load(pad_row + cols * stride_pn, mask=cols < len_k, other=1)
            ends = tl.maximum(ends, tl.where(padded == 0, cols + 1, 0))
        return tl.max(ends, 0)
    else:
        return len_k


@triton.jit
def _daf_fwd_kernel(
    Q, K, V, GATE, RES, KEY_PAD, OUT, ATTN, LSE,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_gb, stride_gm, stride_gd,
    stride_rb, stride_rm, stride_rd,
    stride_pb, stride_pn,
    stride_ob, stride_om, stride_od,  # OUT and ATTN (allocated alike)
    num_heads, len_q, len_k, sm_scale, len_q_bucket, len_k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_HD: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    qk_scale = sm_scale * LOG2E  # base-2 logits
    K = _head_base(K, pid_bh, num_heads, stride_kb, stride_kd, HEAD_DIM)
    V = _head_base(V, pid_bh, num_heads, stride_vb, stride_vd, HEAD_DIM)
    q = _load_tile(_head_base(Q, pid_bh, num_heads, stride_qb, stride_qd, HEAD_DIM),
                   rows, len_q, stride_qm, stride_qd, HEAD_DIM, BLOCK_HD)
    key_end = _key_end(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, len_k, HAS_MASK, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_HD], dtype=tl.float32)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + offs_n
        key_ok = _key_valid(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, cols, key_end, HAS_MASK)
        k = _load_tile(K, cols, key_end, stride_kn, stride_kd, HEAD_DIM, BLOCK_HD)
        s = _mma(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While every key so far is padded the max is -inf: subtract 0 instead (p = 0, not NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, cols, key_end, stride_vn, stride_vd, HEAD_DIM, BLOCK_HD)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)  # rows with no key: acc is 0, keep 0 / 1 and log2(1)
    attn = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * len_q + rows, lse, mask=rows < len_q)

    gate = _load_tile(_head_base(GATE, pid_bh, num_heads, stride_gb, stride_gd, HEAD_DIM),
                      rows, len_q, stride_gm, stride_gd, HEAD_DIM, BLOCK_HD).to(tl.float32)
    res = _load_tile(_head_base(RES, pid_bh, num_heads, stride_rb, stride_rd, HEAD_DIM),
                     rows, len_q, stride_rm, stride_rd, HEAD_DIM, BLOCK_HD).to(tl.float32)
    _store_tile(_head_base(OUT, pid_bh, num_heads, stride_ob, stride_od, HEAD_DIM),
                res + tl.sigmoid(gate) * attn, rows, len_q, stride_om, stride_od, HEAD_DIM, BLOCK_HD)
    _store_tile(_head_base(ATTN, pid_bh, num_heads, stride_ob, stride_od, HEAD_DIM),
                attn, rows, len_q, stride_om, stride_od, HEAD_DIM, BLOCK_HD)


@triton.jit
def _daf_bwd_kernel(
    Q, K, V, GATE, GRAD_OUT, ATTN, KEY_PAD, LSE, DQ, DK, DV, DGATE, DK_PART, DV_PART,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_gb, stride_gm, stride_gd,
    stride_ob, stride_om, stride_od,  # GRAD_OUT
    stride_ab, stride_am, stride_ad,  # ATTN
    stride_pb, stride_pn,
    stride_dqb, stride_dqm, stride_dqd,  # DQ and DGATE (allocated alike)
    stride_dkb, stride_dkn, stride_dkd,  # DK, DV, DK_PART and DV_PART (allocated alike)
    num_heads, len_q, len_k, sm_scale, len_q_bucket, len_k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_HD: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (batch, head) walks its query rows in BLOCK_M tiles. dQ of a tile is
    complete after its key loop (registers); dK/dV of a key tile after the last row tile: the
    earlier row tiles leave fp32 partial sums in DK_PART/DV_PART (DK/DV themselves when fp32),
    which only this program reads and writes, so no atomics and no zeroed buffers."""
    pid_bh = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    qk_scale = sm_scale * LOG2E
    K = _head_base(K, pid_bh, num_heads, stride_kb, stride_kd, HEAD_DIM)
    V = _head_base(V, pid_bh, num_heads, stride_vb, stride_vd, HEAD_DIM)
    DK = _head_base(DK, pid_bh, num_heads, stride_dkb, stride_dkd, HEAD_DIM)
    DV = _head_base(DV, pid_bh, num_heads, stride_dkb, stride_dkd, HEAD_DIM)
    DK_PART = _head_base(DK_PART, pid_bh, num_heads, stride_dkb, stride_dkd, HEAD_DIM)
    DV_PART = _head_base(DV_PART, pid_bh, num_heads, stride_dkb, stride_dkd, HEAD_DIM)
    key_end = _key_end(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, len_k, HAS_MASK, BLOCK_N)
    row_tiles = tl.cdiv(len_q, BLOCK_M)

    for tile in range(0, row_tiles):
        rows = tile * BLOCK_M + offs_m
        first = tile == 0
        last = tile == row_tiles - 1
        # The preprocess, folded in: dattn (FlashAttention's dO), dgate and delta of these rows.
        grad = _load_tile(_head_base(GRAD_OUT, pid_bh, num_heads, stride_ob, stride_od, HEAD_DIM),
                          rows, len_q, stride_om, stride_od, HEAD_DIM, BLOCK_HD).to(tl.float32)
        gate = _load_tile(_head_base(GATE, pid_bh, num_heads, stride_gb, stride_gd, HEAD_DIM),
                          rows, len_q, stride_gm, stride_gd, HEAD_DIM, BLOCK_HD).to(tl.float32)
        attn = _load_tile(_head_base(ATTN, pid_bh, num_heads, stride_ab, stride_ad, HEAD_DIM),
                          rows, len_q, stride_am, stride_ad, HEAD_DIM, BLOCK_HD).to(tl.float32)
        sig = tl.sigmoid(gate)
        _store_tile(_head_base(DGATE, pid_bh, num_heads, stride_dqb, stride_dqd, HEAD_DIM),
                    grad * attn * sig * (1.0 - sig), rows, len_q, stride_dqm, stride_dqd, HEAD_DIM,
                    BLOCK_HD)
        # Rounded to the input dtype, as the dots of dP see it: delta then matches rowsum(p * dP)
        # exactly in exact arithmetic, so dS sums to 0 over each row as it should.
        do = (grad * sig).to(Q.dtype.element_ty)
        delta = tl.sum(do.to(tl.float32) * attn, 1)
        q = _load_tile(_head_base(Q, pid_bh, num_heads, stride_qb, stride_qd, HEAD_DIM),
                       rows, len_q, stride_qm, stride_qd, HEAD_DIM, BLOCK_HD)
        lse2 = _base2_lse(LSE + pid_bh.to(tl.int64) * len_q, rows, len_q)

        dq = tl.zeros([BLOCK_M, BLOCK_HD], dtype=tl.float32)
        for start_n in range(0, key_end, BLOCK_N):
            cols = start_n + offs_n
            key_ok = _key_valid(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, cols, key_end, HAS_MASK)
            k = _load_tile(K, cols, key_end, stride_kn, stride_kd, HEAD_DIM, BLOCK_HD)
            v = _load_tile(V, cols, key_end, stride_vn, stride_vd, HEAD_DIM, BLOCK_HD)
            p = tl.exp2(_mma(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale - lse2[:, None])
            p = tl.where(key_ok[None, :], p, 0.0)
            dp = _mma(do, tl.trans(v), None, PRECISION, UPCAST)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dq = _mma(ds, k, dq, PRECISION, UPCAST)
            dv = _mma(tl.trans(p.to(do.dtype)), do, None, PRECISION, UPCAST)
            dk = _mma(tl.trans(ds), q, None, PRECISION, UPCAST) * sm_scale
            if not first:
                dk += _load_tile(DK_PART, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)
                dv += _load_tile(DV_PART, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)
            if last:
                _store_tile(DK, dk, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)
                _store_tile(DV, dv, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)
            else:
                _store_tile(DK_PART, dk, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)
                _store_tile(DV_PART, dv, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)
        _store_tile(_head_base(DQ, pid_bh, num_heads, stride_dqb, stride_dqd, HEAD_DIM),
                    dq * sm_scale, rows, len_q, stride_dqm, stride_dqd, HEAD_DIM, BLOCK_HD)
        # The next row tile loads the partial sums that other threads of this program stored.
        tl.debug_barrier()

    # The keys past the last unpadded one get no gradient.
    zero = tl.zeros([BLOCK_N, BLOCK_HD], dtype=tl.float32)
    for start_n in range(tl.cdiv(key_end, BLOCK_N) * BLOCK_N, len_k, BLOCK_N):
        cols = start_n + offs_n
        _store_tile(DK, zero, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)
        _store_tile(DV, zero, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)


# One tuner per arch class: their configs carry the class's compile options.
_FWD_TUNERS = {arch: _tuner("fwd", _daf_fwd_kernel, arch) for arch in ARCH_CLASSES}
_BWD_TUNERS = {arch: _tuner("bwd", _daf_bwd_kernel, arch) for arch in ARCH_CLASSES}


# ----------------------------------------------------------------------------- launchers

def _tile(head_dim: int) -> dict:
    """HEAD_DIM / BLOCK_HD constexprs: the head dim padded to a power of two, >= 16 for tl.dot."""
    return {"HEAD_DIM": head_dim, "BLOCK_HD": max(16, triton.next_power_of_2(head_dim))}


def _forward_config(dtype, precision, block_hd, len_q, target=None, arch="sm_90") -> dict:
    config = _config("fwd", dtype, precision, block_hd, target)
    block_m = config.block_m if _length_bucket(len_q) <= SHORT_QUERIES else config.long_block_m
    return {"BLOCK_M": block_m, "BLOCK_N": config.block_n, **config.options(arch)}


def _backward_config(dtype, precision, block_hd, len_q, target=None, arch="sm_90") -> dict:
    config = _config("bwd", dtype, precision, block_hd, target)
    return {"BLOCK_M": _row_tile(len_q, config.block_m), "BLOCK_N": config.block_n,
            **config.options(arch)}


def _head_dim(x: torch.Tensor, num_heads: int) -> int:
    head_dim = x.shape[-1] // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the fused daf_attention kernels take head_dim <= {MAX_HEAD_DIM}, got "
                         f"{head_dim} (D={x.shape[-1]}, num_heads={num_heads}); use more heads or "
                         "MVCL_FAST_BACKEND=reference")
    return head_dim


def _dot_flags(dtype: torch.dtype):
    """PRECISION / UPCAST constexprs for inputs of this dtype."""
    return {"PRECISION": fp32_dot_precision(dtype), "UPCAST": lacks_bf16_dot(dtype)}


def _mask_args(key_padding_mask):
    if key_padding_mask is None:
        return None, 0, 0
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)


_printed_choices = set()


def _launch(name: str, kernel, tuner, grid, args, constexprs: dict, pinned: dict):
    """Launch with the pinned config, or under MVCL_FAST_AUTOTUNE=1 search and print the choice."""
    if not autotune_requested():
        kernel[grid(pinned["BLOCK_M"])](*args, **constexprs, **pinned)
        return
    if triton_interpreter_enabled():
        raise RuntimeError(f"{AUTOTUNE_ENV}=1 needs a GPU to time the configs: unset it under "
                           "Triton's interpreter (TRITON_INTERPRET=1)")
    tuner[lambda meta: grid(meta["BLOCK_M"])](*args, **constexprs)
    for key, config in tuner.cache.items():
        if (name, key) not in _printed_choices:
            _printed_choices.add((name, key))
            print(f"{AUTOTUNE_ENV}: daf_attention {name} key={key}: {config}", flush=True)


def daf_attention_forward(q, k, v, gate, residual, key_padding_mask, num_heads: int):
    """(out, attn, lse): out = residual + sigmoid(gate) * attn, attn [B, Lq, D], lse [B, H, Lq] fp32."""
    head_dim = _head_dim(q, num_heads)
    batch, len_q, _ = q.shape
    len_k = k.shape[1]
    # Contiguous whatever q's strides, as the op's fake declares.
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    attn = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, num_heads, len_q, device=q.device, dtype=torch.float32)
    mask, stride_pb, stride_pn = _mask_args(key_padding_mask)
    tile, flags = _tile(head_dim), _dot_flags(q.dtype)
    arch = arch_class(q.device)
    _launch("fwd", _daf_fwd_kernel, _FWD_TUNERS[arch],
            lambda block_m: (triton.cdiv(len_q, block_m), batch * num_heads),
            (q, k, v, gate, residual, mask, out, attn, lse,
             *q.stride(), *k.stride(), *v.stride(), *gate.stride(), *residual.stride(),
             stride_pb, stride_pn, *out.stride(),
             num_heads, len_q, len_k, 1.0 / math.sqrt(head_dim), _length_bucket(len_q), _length_bucket(len_k)),
            dict(tile, HAS_MASK=mask is not None, **flags),
            _forward_config(q.dtype, flags["PRECISION"], tile["BLOCK_HD"], len_q, arch=arch))
    return out, attn, lse


def daf_attention_backward(grad_out, q, k, v, gate, key_padding_mask, attn, lse, num_heads: int):
    """(dq, dk, dv, dgate) of out = residual + sigmoid(gate) * attention(q, k, v)."""
    head_dim = _head_dim(q, num_heads)
    batch, len_q, _ = q.shape
    len_k = k.shape[1]
    mask, stride_pb, stride_pn = _mask_args(key_padding_mask)
    tile, flags = _tile(head_dim), _dot_flags(q.dtype)
    arch = arch_class(q.device)
    config = _backward_config(q.dtype, flags["PRECISION"], tile["BLOCK_HD"], len_q, arch=arch)
    # Contiguous, so that dq and dgate share strides, and dk, dv and their partial sums.
    dq, dgate = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(2))
    dk, dv = (torch.empty(k.shape, device=k.device, dtype=k.dtype) for _ in range(2))
    # Several row tiles leave fp32 partial dK/dV between them (in dk/dv when they are fp32);
    # under MVCL_FAST_AUTOTUNE the tuner may pick a shorter row tile than the pinned one.
    if k.dtype != torch.float32 and (len_q > config["BLOCK_M"] or autotune_requested()):
        dk_part, dv_part = (torch.empty(k.shape, device=k.device, dtype=torch.float32)
                            for _ in range(2))
    else:
        dk_part, dv_part = dk, dv
    _launch("bwd", _daf_bwd_kernel, _BWD_TUNERS[arch], lambda block_m: (batch * num_heads,),
            (q, k, v, gate, grad_out, attn, mask, lse, dq, dk, dv, dgate, dk_part, dv_part,
             *q.stride(), *k.stride(), *v.stride(), *gate.stride(), *grad_out.stride(), *attn.stride(),
             stride_pb, stride_pn, *dq.stride(), *dk.stride(),
             num_heads, len_q, len_k, 1.0 / math.sqrt(head_dim), _length_bucket(len_q), _length_bucket(len_k)),
            dict(tile, HAS_MASK=mask is not None, **flags), config)
    return dq, dk, dv, dgate
