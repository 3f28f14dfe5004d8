"""Fused DAF attention: out = residual + sigmoid(gate) * MHA(q, k, v), forward and backward.

FlashAttention-2 style (as the Triton tutorial 06-fused-attention), for the
coarse-to-fine fusion of MVCL-DAF++ (SPEC op 4):

* forward: one program per (query block, batch * head). The Q tile stays
  resident while K/V tiles stream past it with an online softmax in base 2
  (log2(e) folded into the scale). The epilogue applies the gate and the
  residual and also stores the ungated attention (the factor of dgate) and
  the natural-log log-sum-exp of each row for the backward.
* backward: a preprocess kernel turns grad_out into dattn = grad_out *
  sigmoid(gate), dgate = grad_out * attn * s (1 - s) and delta =
  rowsum(dattn * attn) per head; then one kernel per key block accumulates
  dK/dV over all query blocks, and one kernel per query block accumulates dQ
  over all key blocks. Every output element has exactly one writer: no
  atomics, no N x N buffer.

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

Tiles are autotuned per (head dim, dot precision, dtype, power-of-two bucket
of each sequence length) among the configs declared for that dtype and head
width; aot_specs() lists each of them for the compile report. Offsets within
one batch item are 32-bit: a [L, D] slice (its rows times its row stride) must
stay under 2**31 elements.
"""
from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from mvcl_fast.backend import triton_interpreter_enabled
from mvcl_fast.kernels.aot import KernelSpec

LOG2E = tl.constexpr(1.4426950408889634)  # natural-log scores -> base 2
LN2 = tl.constexpr(0.6931471805599453)

# GPU autotune configs per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages,
# widest head row in bytes = element size x BLOCK_HD it is tried for).
# BLOCK_M tiles the queries and BLOCK_N the keys in every kernel: the forward
# and dQ keep the query tile resident, dK/dV the key tile. Each entry compiles
# without register spills for sm_80 and sm_90a at every width it is tried for
# (fp16/bf16 head dim 64 = 128 bytes, 128 = 256 bytes; tf32 twice that), with
# row strides of unknown alignment (scalar loads, the register-hungriest case)
# as with strides that are multiples of 16 (vector loads).
TENSOR_CORE_CONFIGS = {  # fp16, bf16, and fp32 as tf32
    "fwd": [(16, 32, 4, 3, 512), (32, 32, 4, 3, 512), (32, 64, 8, 3, 512), (32, 128, 4, 3, 128),
            (64, 32, 8, 3, 128), (128, 32, 8, 3, 128)],
    "dkdv": [(16, 32, 4, 3, 512), (32, 32, 4, 3, 512), (16, 64, 4, 3, 128), (16, 128, 8, 3, 128),
             (32, 64, 8, 3, 256), (32, 128, 8, 3, 128)],
    "dq": [(16, 64, 4, 3, 512), (32, 32, 4, 3, 256), (32, 64, 4, 3, 256), (64, 32, 4, 3, 256),
           (64, 64, 8, 3, 128), (128, 64, 8, 3, 128)],
}
# fp32 with IEEE dots has no tensor-core path: the dots unroll into FMAs that
# hold far more registers, so the tiles are small and mostly 8 warps share them.
FMA_CONFIGS = {
    "fwd": [(16, 32, 8, 2, 512), (16, 64, 8, 2, 512), (32, 32, 8, 2, 512), (32, 64, 8, 2, 256)],
    "dkdv": [(16, 32, 8, 2, 512), (32, 32, 8, 2, 512)],
    "dq": [(16, 32, 8, 2, 512), (32, 16, 4, 2, 512), (64, 16, 4, 2, 512)],
}
# The interpreter runs every program in numpy: benchmarking configs there is
# meaningless and slow, so it gets this single config, whose tiles still cut
# the test shapes (80 queries, 231 keys) into several ragged blocks (the tests
# also force the smallest GPU tile on the interpreter).
INTERPRETER_CONFIG = (64, 128, 4, 1)
MAX_HEAD_DIM = 128
PREPROCESS_BLOCK_M = 32
PREPROCESS_WARPS = 4
TUNE_KEY = ["HEAD_DIM", "PRECISION", "len_q_bucket", "len_k_bucket"]  # + the tensors' dtypes


def _config_table(dtype: torch.dtype, precision: str, kernel: str):
    return (FMA_CONFIGS if dtype == torch.float32 and precision == "ieee" else TENSOR_CORE_CONFIGS)[kernel]


def _configs_for(dtype: torch.dtype, precision: str, block_hd: int, kernel: str):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tried for this dtype, dot precision and width."""
    row_bytes = dtype.itemsize * block_hd
    return [entry[:4] for entry in _config_table(dtype, precision, kernel) if entry[4] >= row_bytes]


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        allowed = set(_configs_for(args["Q"].dtype, args["PRECISION"], args["BLOCK_HD"], kernel))
        fits = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        # A 128-row tile over 37 queries is mostly masked work: tiles longer than the
        # bucketed sequence are dropped, except the shortest, so a config is left.
        shortest_m = min(c.kwargs["BLOCK_M"] for c in fits)
        shortest_n = min(c.kwargs["BLOCK_N"] for c in fits)
        return [c for c in fits
                if c.kwargs["BLOCK_M"] <= max(shortest_m, args["len_q_bucket"])
                and c.kwargs["BLOCK_N"] <= max(shortest_n, args["len_k_bucket"])]
    return prune


def _autotune(kernel: str):
    """triton.autotune over both config tables of a kernel, pruned to the launch at hand."""
    if triton_interpreter_enabled():
        tiles = [INTERPRETER_CONFIG]
    else:
        tiles = sorted({entry[:4] for table in (TENSOR_CORE_CONFIGS, FMA_CONFIGS) for entry in table[kernel]})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return triton.autotune(configs=configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune(kernel)})


def _length_bucket(length: int) -> int:
    """Autotune key for a sequence length: powers of two from 16 to 4096."""
    return min(max(triton.next_power_of_2(length), 16), 4096)


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


@_autotune("fwd")
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_HD], dtype=tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        cols = start_n + offs_n
        key_ok = _key_valid(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, cols, len_k, HAS_MASK)
        k = _load_tile(K, cols, len_k, stride_kn, stride_kd, HEAD_DIM, BLOCK_HD)
        s = _mma(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While every key so far is padded the max is -inf: subtract 0 instead (p = 0, not NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, cols, len_k, stride_vn, stride_vd, HEAD_DIM, BLOCK_HD)
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
def _daf_bwd_preprocess_kernel(
    GRAD_OUT, GATE, ATTN, DGATE, DATTN, DELTA,
    stride_ob, stride_om, stride_od,
    stride_gb, stride_gm, stride_gd,
    stride_ab, stride_am, stride_ad,
    stride_dgb, stride_dgm, stride_dgd,
    stride_tb, stride_tm, stride_td,
    num_heads, len_q,
    HEAD_DIM: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    grad = _load_tile(_head_base(GRAD_OUT, pid_bh, num_heads, stride_ob, stride_od, HEAD_DIM),
                      rows, len_q, stride_om, stride_od, HEAD_DIM, BLOCK_HD).to(tl.float32)
    gate = _load_tile(_head_base(GATE, pid_bh, num_heads, stride_gb, stride_gd, HEAD_DIM),
                      rows, len_q, stride_gm, stride_gd, HEAD_DIM, BLOCK_HD).to(tl.float32)
    attn = _load_tile(_head_base(ATTN, pid_bh, num_heads, stride_ab, stride_ad, HEAD_DIM),
                      rows, len_q, stride_am, stride_ad, HEAD_DIM, BLOCK_HD).to(tl.float32)
    sig = tl.sigmoid(gate)
    # Rounded to the input dtype first, as the dots of dP will see it: delta then matches
    # rowsum(p * dP) exactly in exact arithmetic, so dS sums to 0 over each row as it should.
    dattn = (grad * sig).to(DATTN.dtype.element_ty).to(tl.float32)
    _store_tile(_head_base(DGATE, pid_bh, num_heads, stride_dgb, stride_dgd, HEAD_DIM),
                grad * attn * sig * (1.0 - sig), rows, len_q, stride_dgm, stride_dgd, HEAD_DIM, BLOCK_HD)
    _store_tile(_head_base(DATTN, pid_bh, num_heads, stride_tb, stride_td, HEAD_DIM),
                dattn, rows, len_q, stride_tm, stride_td, HEAD_DIM, BLOCK_HD)
    tl.store(DELTA + pid_bh.to(tl.int64) * len_q + rows, tl.sum(dattn * attn, 1), mask=rows < len_q)


@_autotune("dkdv")
@triton.jit
def _daf_bwd_dkdv_kernel(
    Q, K, V, DATTN, KEY_PAD, LSE, DELTA, DK, DV,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_tb, stride_tm, stride_td,
    stride_pb, stride_pn,
    stride_dkb, stride_dkn, stride_dkd,
    stride_dvb, stride_dvn, stride_dvd,
    num_heads, len_q, len_k, sm_scale, len_q_bucket, len_k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_HD: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    qk_scale = sm_scale * LOG2E
    key_ok = _key_valid(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, cols, len_k, HAS_MASK)
    k = _load_tile(_head_base(K, pid_bh, num_heads, stride_kb, stride_kd, HEAD_DIM),
                   cols, len_k, stride_kn, stride_kd, HEAD_DIM, BLOCK_HD)
    v = _load_tile(_head_base(V, pid_bh, num_heads, stride_vb, stride_vd, HEAD_DIM),
                   cols, len_k, stride_vn, stride_vd, HEAD_DIM, BLOCK_HD)
    Q = _head_base(Q, pid_bh, num_heads, stride_qb, stride_qd, HEAD_DIM)
    DATTN = _head_base(DATTN, pid_bh, num_heads, stride_tb, stride_td, HEAD_DIM)
    LSE += pid_bh.to(tl.int64) * len_q
    DELTA += pid_bh.to(tl.int64) * len_q

    dk = tl.zeros([BLOCK_N, BLOCK_HD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_HD], dtype=tl.float32)
    for start_m in range(0, len_q, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(Q, rows, len_q, stride_qm, stride_qd, HEAD_DIM, BLOCK_HD)
        do = _load_tile(DATTN, rows, len_q, stride_tm, stride_td, HEAD_DIM, BLOCK_HD)
        lse2 = _base2_lse(LSE, rows, len_q)
        delta = tl.load(DELTA + rows, mask=rows < len_q, other=0.0)
        # Transposed scores [keys, queries]: the key tile is the resident operand.
        p_t = tl.exp2(_mma(k, tl.trans(q), None, PRECISION, UPCAST) * qk_scale - lse2[None, :])
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
        dv = _mma(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        dp_t = _mma(v, tl.trans(do), None, PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(ds_t.to(q.dtype), q, dk, PRECISION, UPCAST)

    _store_tile(_head_base(DK, pid_bh, num_heads, stride_dkb, stride_dkd, HEAD_DIM),
                dk * sm_scale, cols, len_k, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_HD)
    _store_tile(_head_base(DV, pid_bh, num_heads, stride_dvb, stride_dvd, HEAD_DIM),
                dv, cols, len_k, stride_dvn, stride_dvd, HEAD_DIM, BLOCK_HD)


@_autotune("dq")
@triton.jit
def _daf_bwd_dq_kernel(
    Q, K, V, DATTN, KEY_PAD, LSE, DELTA, DQ,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_tb, stride_tm, stride_td,
    stride_pb, stride_pn,
    stride_dqb, stride_dqm, stride_dqd,
    num_heads, len_q, len_k, sm_scale, len_q_bucket, len_k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_HD: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    qk_scale = sm_scale * LOG2E
    q = _load_tile(_head_base(Q, pid_bh, num_heads, stride_qb, stride_qd, HEAD_DIM),
                   rows, len_q, stride_qm, stride_qd, HEAD_DIM, BLOCK_HD)
    do = _load_tile(_head_base(DATTN, pid_bh, num_heads, stride_tb, stride_td, HEAD_DIM),
                    rows, len_q, stride_tm, stride_td, HEAD_DIM, BLOCK_HD)
    lse2 = _base2_lse(LSE + pid_bh.to(tl.int64) * len_q, rows, len_q)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * len_q + rows, mask=rows < len_q, other=0.0)
    K = _head_base(K, pid_bh, num_heads, stride_kb, stride_kd, HEAD_DIM)
    V = _head_base(V, pid_bh, num_heads, stride_vb, stride_vd, HEAD_DIM)

    dq = tl.zeros([BLOCK_M, BLOCK_HD], dtype=tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        cols = start_n + offs_n
        key_ok = _key_valid(KEY_PAD, stride_pb, stride_pn, pid_bh, num_heads, cols, len_k, HAS_MASK)
        k = _load_tile(K, cols, len_k, stride_kn, stride_kd, HEAD_DIM, BLOCK_HD)
        v = _load_tile(V, cols, len_k, stride_vn, stride_vd, HEAD_DIM, BLOCK_HD)
        p = tl.exp2(_mma(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale - lse2[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)
        dp = _mma(do, tl.trans(v), None, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, PRECISION, UPCAST)

    _store_tile(_head_base(DQ, pid_bh, num_heads, stride_dqb, stride_dqd, HEAD_DIM),
                dq * sm_scale, rows, len_q, stride_dqm, stride_dqd, HEAD_DIM, BLOCK_HD)


# ----------------------------------------------------------------------------- launchers

def _tile(head_dim: int) -> dict:
    """HEAD_DIM / BLOCK_HD constexprs: the head dim padded to a power of two, >= 16 for tl.dot."""
    return {"HEAD_DIM": head_dim, "BLOCK_HD": max(16, triton.next_power_of_2(head_dim))}


def _head_dim(x: torch.Tensor, num_heads: int) -> int:
    head_dim = x.shape[-1] // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the fused daf_attention kernels take head_dim <= {MAX_HEAD_DIM}, got "
                         f"{head_dim} (D={x.shape[-1]}, num_heads={num_heads}); use more heads or "
                         "MVCL_FAST_BACKEND=reference")
    return head_dim


def _dot_flags(dtype: torch.dtype):
    """PRECISION / UPCAST constexprs for inputs of this dtype."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    upcast = dtype == torch.bfloat16 and triton_interpreter_enabled()
    return {"PRECISION": "tf32" if tf32 else "ieee", "UPCAST": upcast}


def _mask_args(key_padding_mask):
    if key_padding_mask is None:
        return None, 0, 0
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)


def daf_attention_forward(q, k, v, gate, residual, key_padding_mask, num_heads: int):
    """(out, attn, lse): out = residual + sigmoid(gate) * attn, attn [B, Lq, D], lse [B, H, Lq] fp32."""
    head_dim = _head_dim(q, num_heads)
    batch, len_q, _ = q.shape
    len_k = k.shape[1]
    out = torch.empty_like(q)
    attn = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, len_q, device=q.device, dtype=torch.float32)
    mask, stride_pb, stride_pn = _mask_args(key_padding_mask)

    def grid(meta):
        return (triton.cdiv(len_q, meta["BLOCK_M"]), batch * num_heads)

    _daf_fwd_kernel[grid](
        q, k, v, gate, residual, mask, out, attn, lse,
        *q.stride(), *k.stride(), *v.stride(), *gate.stride(), *residual.stride(),
        stride_pb, stride_pn, *out.stride(),
        num_heads, len_q, len_k, 1.0 / math.sqrt(head_dim), _length_bucket(len_q), _length_bucket(len_k),
        HAS_MASK=mask is not None, **_tile(head_dim), **_dot_flags(q.dtype))
    return out, attn, lse


def daf_attention_backward(grad_out, q, k, v, gate, key_padding_mask, attn, lse, num_heads: int):
    """(dq, dk, dv, dgate) of out = residual + sigmoid(gate) * attention(q, k, v)."""
    head_dim = _head_dim(q, num_heads)
    batch, len_q, dim = q.shape
    len_k = k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dgate = torch.empty_like(gate)
    # dattn is FlashAttention's dO; kept in the input dtype, which is what its dots consume.
    dattn = torch.empty(batch, len_q, dim, device=q.device, dtype=q.dtype)
    delta = torch.empty(batch, num_heads, len_q, device=q.device, dtype=torch.float32)
    mask, stride_pb, stride_pn = _mask_args(key_padding_mask)
    scalars = (num_heads, len_q, len_k, 1.0 / math.sqrt(head_dim), _length_bucket(len_q), _length_bucket(len_k))
    tile = _tile(head_dim)
    flags = dict(tile, HAS_MASK=mask is not None, **_dot_flags(q.dtype))

    _daf_bwd_preprocess_kernel[(triton.cdiv(len_q, PREPROCESS_BLOCK_M), batch * num_heads)](
        grad_out, gate, attn, dgate, dattn, delta,
        *grad_out.stride(), *gate.stride(), *attn.stride(), *dgate.stride(), *dattn.stride(),
        num_heads, len_q, BLOCK_M=PREPROCESS_BLOCK_M, num_warps=PREPROCESS_WARPS, **tile)

    _daf_bwd_dkdv_kernel[lambda meta: (triton.cdiv(len_k, meta["BLOCK_N"]), batch * num_heads)](
        q, k, v, dattn, mask, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dattn.stride(), stride_pb, stride_pn,
        *dk.stride(), *dv.stride(),
        *scalars, **flags)

    _daf_bwd_dq_kernel[lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * num_heads)](
        q, k, v, dattn, mask, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dattn.stride(), stride_pb, stride_pn,
        *dq.stride(),
        *scalars, **flags)
    return dq, dk, dv, dgate


# ----------------------------------------------------------------------------- AOT declaration

AOT_HEAD_DIMS = (64, 128)   # the model's head dim (768 / 12) and the largest supported
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FP32_POINTERS = {"LSE", "DELTA"}


def _spec(name, kernel, element: str, constexprs: dict, num_warps: int, num_stages: int) -> KernelSpec:
    """KernelSpec of a launch on contiguous inputs.

    Unit strides (the head-dim axis, the mask's key axis) are the constant 1,
    as the JIT specializes an int argument equal to 1. Of the runtime
    arguments, upper-case names are tensors (the key padding mask bool,
    LSE/DELTA fp32, the rest the input dtype), sm_scale is fp32, the rest ints.
    """
    constexprs = dict(constexprs)
    sig = {}
    # kernel.fn: the Python function under both triton.jit and the interpreter's stand-in.
    for arg, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            continue
        if arg == "stride_pn" or (arg.startswith("stride_") and arg.endswith("d")):
            constexprs[arg] = 1
        elif arg == "KEY_PAD":
            sig[arg] = "*i1"
        elif arg.isupper():
            sig[arg] = "*fp32" if arg in _FP32_POINTERS else "*" + element
        else:
            sig[arg] = "fp32" if arg == "sm_scale" else "i32"
    return KernelSpec(name, kernel, sig, constexprs, num_warps, num_stages)


def aot_specs() -> list[KernelSpec]:
    """Every kernel x dtype (fp32 both IEEE and tf32) x AOT_HEAD_DIMS x each GPU
    autotune config tried there.

    Declared with the key padding mask on (HAS_MASK=True); the mask-free
    variant is the same code without the mask load.
    """
    tuned = [("fwd", _daf_fwd_kernel.fn, "daf_fwd"), ("dkdv", _daf_bwd_dkdv_kernel.fn, "daf_bwd_dkdv"),
             ("dq", _daf_bwd_dq_kernel.fn, "daf_bwd_dq")]
    variants = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "ieee"),
                (torch.bfloat16, "ieee")]
    specs = []
    for head_dim in AOT_HEAD_DIMS:
        tile = _tile(head_dim)
        for dtype, precision in variants:
            element = _TRITON_DTYPE[dtype]
            tag = f"{element}{'-tf32' if precision == 'tf32' else ''},hd={head_dim}"
            for kind, kernel, name in tuned:
                for m, n, warps, stages in _configs_for(dtype, precision, tile["BLOCK_HD"], kind):
                    specs.append(_spec(
                        f"{name}[{tag},BLOCK_M={m},BLOCK_N={n},warps={warps},stages={stages}]",
                        kernel, element, dict(tile, HAS_MASK=True, PRECISION=precision, UPCAST=False,
                                              BLOCK_M=m, BLOCK_N=n), warps, stages))
            if precision == "ieee":  # the preprocess has no dot
                specs.append(_spec(f"daf_bwd_preprocess[{tag},BLOCK_M={PREPROCESS_BLOCK_M}]",
                                   _daf_bwd_preprocess_kernel, element,
                                   dict(tile, BLOCK_M=PREPROCESS_BLOCK_M), PREPROCESS_WARPS, 3))
    return specs


def aot_launches():
    """Forward + backward at the benchmark shapes (B = 32, Lq = 80, D = 768, 12 heads; Lk = 80,
    310, 710, 8192 with padded keys) in every dtype mode."""
    from mvcl_fast.kernels.aot import DTYPE_MODES, matmul_tf32, mode_name

    def step(len_k, dtype, tf32):
        def launch():
            q, gate, residual, grad_out = (torch.empty(32, 80, 768, dtype=dtype) for _ in range(4))
            k, v = (torch.empty(32, len_k, 768, dtype=dtype) for _ in range(2))
            key_padding_mask = torch.zeros(32, len_k, dtype=torch.bool)
            with matmul_tf32(tf32):
                _, attn, lse = daf_attention_forward(q, k, v, gate, residual, key_padding_mask, 12)
                daf_attention_backward(grad_out, q, k, v, gate, key_padding_mask, attn, lse, 12)
        return launch

    return [(f"daf[Lk={len_k},{mode_name(dtype, tf32)}]", step(len_k, dtype, tf32))
            for dtype, tf32 in DTYPE_MODES for len_k in (80, 310, 710, 8192)]
