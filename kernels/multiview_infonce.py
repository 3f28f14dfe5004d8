"""Fused multi-view InfoNCE: forward and backward without the N x N logits.

For each view v, S_v = norm(anchor) norm(views_v)^T / tau and the loss is the
mean over views of mean_i (lse_i(S_v) - S_v[i, i]); symmetric=True averages
that with the same term over the columns of S_v (docs/design.md, op 3). Only O(N)
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
by kernel phase, input dtype and a D bucket (``CONFIGS``), so N
and D never force a recompile beyond Triton's own divisibility
specialisation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mvcl_fast.kernels.multiview_backward import _grad_kernel
from mvcl_fast.kernels.multiview_forward import _inverse_norms_kernel, _loss_kernel, _lse_kernel
from mvcl_fast.kernels.multiview_staged_backward import _staged_ds_kernel, _staged_grad_kernel
from mvcl_fast.kernels.shared import (NORM_EPS, TL_DTYPE, LaunchConfig, arch_class,
                                      fp32_dot_precision, lacks_bf16_dot)


# ----------------------------------------------------------------------------
# Configs: a fixed table keyed by kernel phase, input dtype and D bucket (N never recompiles).
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Config(LaunchConfig):
    """A launch of this file's kernels. The tile kernels: block_m anchor (or own) rows x
    block_n view rows, block_k deep (the D-chunk of the logit dot products; the staged
    gradient's: view rows of dS). _inverse_norms_kernel: block_m rows in block_k-wide D-chunks;
    _loss_kernel: block_m terms a step."""
    block_do: int = 0             # D-chunk of the gradient a backward program owns
    block_do_tail: int = 0        # a second output chunk the same program owns (0: none)
    always_chunked: bool = False  # the D-chunk loop even when one chunk holds D

    @property
    def out_chunk(self) -> int:
        """Columns of the gradient one backward program writes."""
        return self.block_do + self.block_do_tail

    def d_chunked(self, dim: int) -> bool:
        return self.always_chunked or dim > self.block_k


# The widest D-chunk a backward program accumulates, and the tail chunk beside it: up to
# their sum the backward is 4 units of V N^2 D multiply-adds; past it each further chunk
# recomputes the logits (1 unit per side). fp16/bf16 on sm_90 hold up to WIDE_D columns
# (a 512-wide tail, in 16-row tiles).
MAX_BLOCK_DO, MAX_BLOCK_DO_TAIL = 512, 256
WIDE_D = 1024

# Rows of (kernel phase, dtype class: "fp32" or "half" (fp16/bf16), widest padded D, arch class
# (shared.ARCH_CLASSES: "sm_90", or "sm_80" for sm_80, sm_86 and sm_89),
# _Config(block_m, block_n, block_k, num_warps, num_stages, ...)), None matching any; a launch
# takes the first row that matches it.
# Every config below compiles without spills for sm_90a under triton 3.6.0 and 3.9 at the
# specialisations the launchers use (python -m mvcl_fast.tools.report); so does every one for
# sm_80, sm_86 and sm_89 with shared.MAX_REGISTERS' cap of 255, without which ptxas held the
# fp32-tf32 gradient at D = 128 to 80 registers on sm_86 and sm_89 and spilled 24 B. Row tiles
# of 64 (lse) and 32 or fewer (gradient) give every kernel >= 132 programs at N = 4096, V = 4.
CONFIGS = (
    ("norms", None, None, None, _Config(8, 0, 128, 4, None)),
    ("loss", None, None, None, _Config(1024, 0, 0, 4, None)),
    # fp32: FMA ("ieee") or TF32 dots: smaller tiles, more warps.
    ("lse", "fp32", 64, None, _Config(64, 64, 64, 8, 2)),
    ("lse", "fp32", None, None, _Config(64, 64, 32, 8, 2)),
    ("lse", "half", 64, None, _Config(64, 64, 64, 4, 3)),
    ("lse", "half", 128, None, _Config(64, 64, 128, 4, 3)),
    ("lse", "half", None, None, _Config(64, 64, 64, 4, 3)),
    # The gradient's output chunks (block_do + block_do_tail) hold all of D up to
    # MAX_BLOCK_DO + MAX_BLOCK_DO_TAIL for fp32, WIDE_D for fp16/bf16 on sm_90 (512 on sm_80).
    # fp32: ptxas spills the single-chunk FMA form on sm_90a; the loop form does not.
    ("grad", "fp32", 64, None, _Config(32, 32, 32, 4, 2, block_do=64, always_chunked=True)),
    # sm_80, sm_86, sm_89: 16-row tiles (32 rows spilled 112 B with TF32 dots at 128
    # registers (8 warps) under triton 3.9; at 4 warps 56 B, and 1.4 KB in the FMA form).
    ("grad", "fp32", 128, "sm_80",
     _Config(16, 32, 32, 8, 1, block_do=128, always_chunked=True)),
    # 2 stages spill under triton 3.9.
    ("grad", "fp32", 128, None, _Config(32, 32, 32, 8, 1, block_do=128, always_chunked=True)),
    ("grad", "fp32", 256, None, _Config(32, 32, 32, 8, 2, block_do=256, always_chunked=True)),
    ("grad", "fp32", MAX_BLOCK_DO, None,
     _Config(16, 32, 32, 8, 2, block_do=MAX_BLOCK_DO, always_chunked=True)),
    # 32 keys spill.
    ("grad", "fp32", MAX_BLOCK_DO + MAX_BLOCK_DO_TAIL, None,
     _Config(16, 16, 32, 8, 2, block_do=MAX_BLOCK_DO, block_do_tail=MAX_BLOCK_DO_TAIL,
             always_chunked=True)),
    # The fp32 FMA form spills past 768 columns: 512-wide chunks there.
    ("grad", "fp32", None, None,
     _Config(16, 32, 32, 8, 2, block_do=MAX_BLOCK_DO, always_chunked=True)),
    ("grad", "half", 64, None, _Config(32, 64, 64, 4, 2, block_do=64)),
    # 64-row tiles spill under triton 3.6.
    ("grad", "half", 128, None, _Config(32, 64, 128, 4, 2, block_do=128)),
    ("grad", "half", 256, None, _Config(64, 64, 128, 8, 2, block_do=256)),
    ("grad", "half", MAX_BLOCK_DO, None, _Config(32, 64, 128, 8, 2, block_do=MAX_BLOCK_DO)),
    # sm_80's mma.sync code spills the tail (44 B at 32 x 32): 512-wide chunks there.
    ("grad", "half", None, "sm_80", _Config(32, 64, 128, 8, 2, block_do=MAX_BLOCK_DO)),
    # 768 columns of accumulator: 32 x 32 tiles in one stage (64 keys or 2 stages spill).
    ("grad", "half", MAX_BLOCK_DO + MAX_BLOCK_DO_TAIL, "sm_90",
     _Config(32, 32, 128, 8, 1, block_do=MAX_BLOCK_DO, block_do_tail=MAX_BLOCK_DO_TAIL)),
    # 1024 columns: 16-row tiles hold them in registers (216-232 of 255, both Tritons). Past
    # WIDE_D (a DDP rank's share: the whole batch stages dS), 1024-wide chunks halve the
    # recomputes of 512-wide ones.
    ("grad", "half", None, "sm_90",
     _Config(16, 32, 128, 8, 1, block_do=MAX_BLOCK_DO, block_do_tail=WIDE_D - MAX_BLOCK_DO)),
    # The staged backward (D past a program's output chunk, see _staged_backward): plain GEMM
    # tiles. _staged_ds_kernel: block_m anchor rows x block_n view rows, block_k deep.
    ("staged_ds", "fp32", None, None, _Config(64, 64, 32, 4, 2)),
    ("staged_ds", "half", None, None, _Config(128, 128, 64, 8, 3)),
    # _staged_grad_kernel: block_m own rows x block_do columns, block_k deep. fp32: the FMA
    # form spills 2.4 KB at 32 deep, 4 warps.
    ("staged_grad", "fp32", None, None, _Config(64, 0, 16, 8, 2, block_do=64)),
    ("staged_grad", "half", None, None, _Config(128, 0, 64, 8, 3, block_do=128)),
)


def _config(phase: str, dtype: torch.dtype, dim: int = 0, arch: str = "sm_90") -> _Config:
    """The config of a `phase` launch on `dtype` inputs of padded width `dim`, compiled for the
    arch class `arch` (shared.arch_class): the first matching row of CONFIGS."""
    kind = "fp32" if dtype == torch.float32 else "half"
    for row_phase, row_kind, widest, row_arch, config in CONFIGS:
        if (row_phase == phase and row_kind in (None, kind) and (widest is None or dim <= widest)
                and row_arch in (None, arch)):
            return config
    raise LookupError(f"no multiview_infonce {phase} config for {dtype} at D={dim}")


# dS of an anchor-row chunk of the staged backward is at most STAGED_DS_BYTES, chunks a
# multiple of STAGED_CHUNK_ALIGN rows.
STAGED_DS_BYTES = 1 << 30
STAGED_CHUNK_ALIGN = 128


def _operand_dtype(dtype: torch.dtype):
    """tl.dot operand type: the input dtype, fp32 where the dot lacks the input's (bf16 under
    the interpreter)."""
    return tl.float32 if lacks_bf16_dot(dtype) else TL_DTYPE[dtype]


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
    arch = arch_class(anchor.device)
    cfg = _config("norms", anchor.dtype, arch=arch)
    _inverse_norms_kernel[(triton.cdiv(n, cfg.block_m), num_views + 1)](
        anchor, views, rnorm, n, dim, num_views, anchor.stride(0), views.stride(0),
        views.stride(1), EPS=NORM_EPS.value, BLOCK_R=cfg.block_m, BLOCK_D=cfg.block_k,
        **cfg.options(arch))
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
        arch = arch_class(device)
        cfg = _config("lse", anchor.dtype, dim, arch)
        # Non-symmetric: the column outputs are never written; the row ones stand in.
        _lse_kernel[_lse_grid(cfg, num_rows, num_views, symmetric)](
            anchor, views, rnorm, lse_rows, lse_cols if symmetric else lse_rows, row_terms,
            col_terms if symmetric else row_terms, n, row_start, num_rows, dim, num_views,
            anchor.stride(0), views.stride(0), views.stride(1), 1.0 / tau,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_k,
            D_CHUNKED=cfg.d_chunked(dim), OPERAND=_operand_dtype(anchor.dtype),
            PRECISION=fp32_dot_precision(anchor.dtype), **cfg.options(arch))
        count = num_views * num_rows
        loss_cfg = _config("loss", anchor.dtype, arch=arch)
        _loss_kernel[(1,)](row_terms, col_terms, loss, count, (0.5 if symmetric else 1.0) / count,
                           SYMMETRIC=symmetric, BLOCK=loss_cfg.block_m, **loss_cfg.options(arch))
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
    arch = arch_class(anchor.device)
    cfg = _config("grad", anchor.dtype, padded_dim, arch)
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
                SYMMETRIC=symmetric, OWN_IN_R=own_in_r, EPS=NORM_EPS.value,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_k,
                BLOCK_DO=cfg.block_do, BLOCK_DO_TAIL=cfg.block_do_tail,
                D_CHUNKED=cfg.d_chunked(padded_dim),
                OPERAND=_operand_dtype(anchor.dtype), PRECISION=fp32_dot_precision(anchor.dtype),
                **cfg.options(arch))
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
    arch = arch_class(anchor.device)
    ds_cfg = _config("staged_ds", anchor.dtype, arch=arch)
    grad_cfg = _config("staged_grad", anchor.dtype, arch=arch)
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
    operand, precision = _operand_dtype(anchor.dtype), fp32_dot_precision(anchor.dtype)
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
            BLOCK_D=ds_cfg.block_k, OPERAND=operand, PRECISION=precision, **ds_cfg.options(arch))
        _staged_grad_kernel[grad_grid](
            anchor, views, rnorm, ds, row_proj, col_proj, view_acc, view_proj, grad_loss,
            d_anchor, d_views, n, dim, num_views, start, rows, chunk, num_chunks, anchor_tiles,
            view_tiles, col_tiles, row_tiles, ds.stride(0), ds.stride(1), row_proj.stride(1),
            anchor.stride(0), views.stride(0), views.stride(1), 1.0 / tau,
            (0.5 if symmetric else 1.0) / (num_views * n), EPS=NORM_EPS.value,
            BLOCK_M=grad_cfg.block_m, BLOCK_K=grad_cfg.block_k, BLOCK_DO=grad_cfg.block_do,
            OPERAND=operand, PRECISION=precision, **grad_cfg.options(arch))
