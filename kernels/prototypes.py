"""Fused Triton kernels for batch prototypes (scatter-mean) and the prototype InfoNCE.

Notation: z [V, N, D] (V views of N rows sharing the labels y [N]; row r = v N + n,
R = V N rows), C classes, tau. Everything is deterministic: no float atomics, every
sum in a fixed order.

Scatter-mean (docs/design.md, op 1), `_class_sums_kernel`: the class sums are a GEMM with a
one-hot matrix, S^T [D, C] = z^T [D, R] @ onehot(y) [R, C], on the tensor cores
(bf16/fp16 operands are exact, the one-hot is exact, fp32 accumulation). A program
owns (class tile, D chunk, row split) and walks the row tiles of its split; when a
large batch needs row splits to fill the GPU, `_class_sums_reduce_kernel` adds the
splits in order. The counts come from the same one-hot tiles. Backward
(`_gather_mean_grad_kernel`): dz_i = dP_{y_i} / count_{y_i}.

Prototype InfoNCE (docs/design.md, op 2) as one op, forward and backward:

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

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from mvcl_fast.kernels.prototypes_class_split import _infonce_class_grad_kernel, _infonce_lse_kernel
from mvcl_fast.kernels.prototypes_rows import (_infonce_bwd_kernel, _infonce_finalize_kernel,
                                               _infonce_fwd_kernel)
from mvcl_fast.kernels.prototypes_sums import (_class_sums_kernel, _class_sums_reduce_kernel,
                                               _gather_mean_grad_kernel)
from mvcl_fast.kernels.shared import LaunchConfig, arch_class, lacks_bf16_dot, sm_count


@dataclass(frozen=True)
class _Config(LaunchConfig):
    """A launch of this file's kernels: block_m rows x block_n classes of the logits, block_k
    deep (the D chunk of the logits dots)."""
    block_do: int    # D chunk of the gradient GEMMs and of the sums
    loss_block: int  # loss partials the finalize kernel adds a step
    dp_block: int    # elements of dP one backward program scales


# Rows of (arch class (shared.ARCH_CLASSES; None: any), kernel phase, most classes (None: any),
# _Config(block_m, block_n, block_k, num_warps, num_stages, ...)); a launch takes the first row
# that matches it. The class tile (block_n) is the same in every arch class: splits_classes
# (which sizes the ops' saved statistics without a device) reads it.
# sm_90: row tile of every kernel 64 rows, one wgmma M for one warp group (4 warps); the
# class-side GEMMs (sums, dS) take their M from the 64-wide D chunks. No software pipelining:
# with it, or 8 warps, or 64-wide logits chunks, kernels spilled under triton 3.6 (python -m
# mvcl_fast.tools.report). Class tile: 16 or 32 (the K of the dz GEMM must be a multiple of
# 16; 64 spills).
CONFIGS = (
    # sm_80, sm_86, sm_89 (mma.sync, no warpgroup M to fill): 32-row tiles, launched with
    # shared.MAX_REGISTERS' cap of 255 (without it ptxas held the forward, the class gradient
    # and the fp16/bf16 backward to 80-168 registers on sm_86 and sm_89 and spilled up to 32 B,
    # and the fp16 forward on sm_80 under triton 3.6). At sm_90's 64 x 32
    # ptxas spilled up to 216 B (the fp32 backward at 255 registers, the fp16/bf16 forward, the
    # class sums) under triton 3.9; 8 warps at 64 rows left 4 spilling and at 32 rows capped
    # the forward at 128 registers (236 B); 32-wide D chunks spilled the forward again.
    ("sm_80", "rows", 16, _Config(32, 16, 32, 4, 1, block_do=64, loss_block=256, dp_block=1024)),
    ("sm_80", "rows", None, _Config(32, 32, 32, 4, 1, block_do=64, loss_block=256, dp_block=1024)),
    # The forward that writes the class sums itself: 16-deep logits chunks (32 spilled 24 B in
    # fp32 at 168 registers under triton 3.9).
    ("sm_80", "fused_sums", 16,
     _Config(32, 16, 16, 4, 1, block_do=64, loss_block=256, dp_block=1024)),
    ("sm_80", "fused_sums", None,
     _Config(32, 32, 16, 4, 1, block_do=64, loss_block=256, dp_block=1024)),
    ("sm_80", "staged_bwd", None,
     _Config(32, 32, 32, 8, 1, block_do=64, loss_block=256, dp_block=1024)),
    (None, "rows", 16, _Config(64, 16, 32, 4, 1, block_do=64, loss_block=256, dp_block=1024)),
    (None, "rows", None, _Config(64, 32, 32, 4, 1, block_do=64, loss_block=256, dp_block=1024)),
    (None, "fused_sums", 16, _Config(64, 16, 32, 4, 1, block_do=64, loss_block=256, dp_block=1024)),
    (None, "fused_sums", None,
     _Config(64, 32, 32, 4, 1, block_do=64, loss_block=256, dp_block=1024)),
    # The backward reading staged logits (the class split: more than 32 classes): 8 warps (4
    # spilled 32 B in fp32 under triton 3.9).
    (None, "staged_bwd", None, _Config(64, 32, 32, 8, 1, block_do=64, loss_block=256, dp_block=1024)),
)


def _config(num_classes: int, phase: str = "rows", arch: str = "sm_90") -> _Config:
    """The config of a `phase` launch over `num_classes` classes compiled for the arch class
    `arch` (shared.arch_class): the first matching row of CONFIGS."""
    for row_arch, row_phase, most_classes, config in CONFIGS:
        if (row_arch in (None, arch) and row_phase == phase
                and (most_classes is None or num_classes <= most_classes)):
            return config
    raise LookupError(f"no prototypes {phase} config for {num_classes} classes on {arch}")


# A program walks at most about this many serial tile steps while the GPU has SMs to spare.
MAX_SERIAL_STEPS = 64
# Programs that fill the GPU: two per SM.
PROGRAMS_PER_SM = 2
# The class split stages the logits (fp32) of at most this many (row, class) pairs, 1 GiB: no
# more than eager PyTorch's own fp32 logits. Beyond it the row programs recompute them.
STAGED_LOGITS_LIMIT = 1 << 28

# Dot modes: fp32 (tf32x3), a half dtype on the tensor cores, or the interpreter's fp32 stand-in.
DOT_FP32, DOT_HALF, DOT_EMULATED = 0, 1, 2

# The half dtype the fp32 operands are split into (hi + lo) in each input dtype's dot mode.
TRITON_HALF = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.bfloat16}


def _dot_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return DOT_FP32
    if lacks_bf16_dot(dtype):
        return DOT_EMULATED
    return DOT_HALF


def target_programs(device: torch.device) -> int:
    """Programs that fill the GPU of `device`."""
    return PROGRAMS_PER_SM * sm_count(device)


# --------------------------------------------------------------- launchers
def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (the kernels take any other stride), else a copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _dot_meta(dtype: torch.dtype) -> dict:
    return dict(MODE=_dot_mode(dtype), HALF=TRITON_HALF[dtype])


def _sum_splits(rows: int, dim: int, num_classes: int, device: torch.device) -> int:
    """Row splits of a (class tile, D chunk) grid, the sums' or the class split's dS_hat: one
    unless a program would walk too many row tiles on an idle GPU."""
    cfg = _config(num_classes, arch=arch_class(device))
    row_tiles = triton.cdiv(rows, cfg.block_m)
    programs = triton.cdiv(num_classes, cfg.block_n) * triton.cdiv(dim, cfg.block_do)
    fill = target_programs(device)
    if row_tiles <= MAX_SERIAL_STEPS or 2 * programs >= fill:
        return 1
    return min(triton.cdiv(row_tiles, MAX_SERIAL_STEPS), triton.cdiv(fill, programs))


def class_sums(z: torch.Tensor, y: torch.Tensor, num_classes: int, mean: bool):
    """(per-class sums in fp32, or means in z.dtype; counts [C] int64) of the rows of z [V, N, D].

    Rows of every view count (label y[n] for z[v, n]); a label outside [0, C) counts nowhere.
    One launch, or two when the rows are split (added in split order: deterministic).
    """
    views, n, dim = z.shape
    rows = views * n
    arch = arch_class(z.device)
    cfg = _config(num_classes, arch=arch)
    out_dtype = z.dtype if mean else torch.float32
    out = torch.empty((num_classes, dim), dtype=out_dtype, device=z.device)
    counts = torch.empty(num_classes, dtype=torch.int64, device=z.device)
    splits = _sum_splits(rows, dim, num_classes, z.device)
    grid = triton.cdiv(num_classes, cfg.block_n) * triton.cdiv(dim, cfg.block_do)
    args = dict(R=rows, N=n, D=dim, C=num_classes, stride_zv=z.stride(0), stride_zn=z.stride(1),
                num_splits=splits, MEAN=mean, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_n,
                BLOCK_D=cfg.block_do, MODE=_dot_mode(z.dtype), **cfg.options(arch))
    if splits == 1:
        _class_sums_kernel[(grid,)](z, y, out, counts, FINAL=True, **args)
        return out, counts
    part = torch.empty((splits, num_classes, dim), dtype=torch.float32, device=z.device)
    part_counts = torch.empty((splits, num_classes), dtype=torch.int32, device=z.device)
    _class_sums_kernel[(grid * splits,)](z, y, part, part_counts, FINAL=False, **args)
    _class_sums_reduce_kernel[(grid,)](part, part_counts, out, counts, num_classes, dim, splits,
                                       MEAN=mean, BLOCK_C=cfg.block_n, BLOCK_D=cfg.block_do,
                                       **cfg.options(arch))
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
    arch = arch_class(grad_prototypes.device)
    cfg = _config(num_classes, arch=arch)
    _gather_mean_grad_kernel[(triton.cdiv(n, cfg.block_m), triton.cdiv(dim, cfg.block_do))](
        grad_prototypes, y.contiguous(), counts, dz, n, dim, num_classes,
        grad_prototypes.stride(0), BLOCK_N=cfg.block_m, BLOCK_D=cfg.block_do, **cfg.options(arch))
    return dz


def _forward_plan(rows: int, dim: int, num_classes: int, need_ds: bool,
                  device: torch.device) -> tuple[int, int]:
    """(programs, row tiles per program) of the forward kernel.

    A program takes as many row tiles as fit in MAX_SERIAL_STEPS tile steps (fewer
    programs: fewer dS partials to write and add), but never so few programs that a
    large batch leaves SMs idle.
    """
    cfg = _config(num_classes, arch=arch_class(device))
    row_tiles = triton.cdiv(rows, cfg.block_m)
    class_tiles = triton.cdiv(num_classes, cfg.block_n)
    logit_steps = triton.cdiv(dim, cfg.block_k) * class_tiles
    steps = logit_steps
    if need_ds:
        steps += (triton.cdiv(dim, cfg.block_do) * class_tiles
                  + (logit_steps if class_tiles > 1 else 0))
    per_program = max(1, MAX_SERIAL_STEPS // steps, triton.cdiv(row_tiles, target_programs(device)))
    per_program = min(per_program, row_tiles)
    return triton.cdiv(row_tiles, per_program), per_program


def splits_classes(rows: int, num_classes: int) -> bool:
    """Whether the loss takes the class split: several class tiles (one tile's logits stay in
    registers, and the row programs are the better plan), and logits small enough to stage."""
    return num_classes > _config(num_classes).block_n and rows * num_classes <= STAGED_LOGITS_LIMIT


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
    programs, per_program = _forward_plan(rows, dim, num_classes, need_ds, device)
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
    # The fused forward's own config: its tiles are the plan's (block_m, block_n, block_do).
    arch = arch_class(device)
    cfg = _config(num_classes, "fused_sums" if fused_sums else "rows", arch)
    lse = torch.empty((views, n), dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=z.dtype, device=device)
    loss_out = loss if single else torch.empty(programs, dtype=torch.float32, device=device)
    part = torch.empty((programs if need_ds else 0, num_classes, dim), dtype=torch.float32,
                       device=device)
    flags = dict(SUMS=sums, HAS_COUNTS=has_counts, NEED_DS=need_ds)
    _infonce_fwd_kernel[(programs,)](
        z, y, s, counts, lse, loss_out, part, rows, n, dim, num_classes, z.stride(0), z.stride(1),
        s.stride(0), 1.0 / tau, 1.0 / rows, per_program, SINGLE=single,
        ONE_TILE=num_classes <= cfg.block_n, FUSED_SUMS=fused_sums, BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_DO=cfg.block_do, **cfg.options(arch),
        **flags, **_dot_meta(z.dtype))
    if single:
        ds = part[0] if need_ds else torch.empty(0, dtype=torch.float32, device=device)
    else:
        ds = torch.empty((num_classes, dim) if need_ds else 0, dtype=torch.float32, device=device)
        finalize_programs = 1 + (triton.cdiv(num_classes, cfg.block_n) if need_ds else 0)
        _infonce_finalize_kernel[(finalize_programs,)](
            part, programs, s, counts, ds, loss_out, loss, num_classes, dim, s.stride(0),
            BLOCK_C=cfg.block_n, BLOCK_D=cfg.block_do, LOSS_BLOCK=cfg.loss_block,
            **cfg.options(arch), **flags)
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
    arch = arch_class(device)
    cfg = _config(num_classes, arch=arch)
    class_tiles, row_tiles = triton.cdiv(num_classes, cfg.block_n), triton.cdiv(rows, cfg.block_m)
    # One class tile is a step per K chunk of the logits and per D chunk of its norms.
    tile_steps = triton.cdiv(dim, cfg.block_k) + triton.cdiv(dim, cfg.block_do)
    tiles_per_chunk = max(1, MAX_SERIAL_STEPS // tile_steps)
    chunks = triton.cdiv(class_tiles, tiles_per_chunk)
    stats = torch.empty(staged_size(rows, num_classes), dtype=torch.float32, device=device)
    lse_part = torch.empty((2, chunks, rows), dtype=torch.float32, device=device)
    dot = _dot_meta(z.dtype)
    _infonce_lse_kernel[(row_tiles * chunks,)](
        z, y, s, counts, stats, lse_part, rows, n, dim, num_classes, z.stride(0), z.stride(1),
        s.stride(0), 1.0 / tau, tiles_per_chunk, SUMS=sums, HAS_COUNTS=has_counts,
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_DO=cfg.block_do,
        **cfg.options(arch), **dot)
    if need_ds:  # the same (class tile, D chunk) grid as the sums
        splits = _sum_splits(rows, dim, num_classes, device)
    else:  # the loss alone: one program per split, so split the rows as finely as the steps ask
        splits = min(triton.cdiv(row_tiles, MAX_SERIAL_STEPS), target_programs(device))
    lse = torch.empty((views, n), dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=z.dtype, device=device)
    loss_part = torch.empty(splits, dtype=torch.float32, device=device)
    part = torch.empty((splits if need_ds else 0, num_classes, dim), dtype=torch.float32,
                       device=device)
    programs = class_tiles * triton.cdiv(dim, cfg.block_do) if need_ds else 1
    _infonce_class_grad_kernel[(programs * splits,)](
        z, y, stats, lse_part, lse, loss_part, part, rows, n, dim, num_classes, z.stride(0),
        z.stride(1), 1.0 / tau, 1.0 / rows, chunks, splits, NEED_DS=need_ds, BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_n, BLOCK_DO=cfg.block_do, **cfg.options(arch), **dot)
    # One split: dS is finalised in place in its part (each element read before it is written).
    ds = part[0] if need_ds and splits == 1 else torch.empty(
        (num_classes, dim) if need_ds else 0, dtype=torch.float32, device=device)
    _infonce_finalize_kernel[(1 + (class_tiles if need_ds else 0),)](
        part, splits, s, counts, ds, loss_part, loss, num_classes, dim, s.stride(0),
        SUMS=sums, HAS_COUNTS=has_counts, NEED_DS=need_ds, BLOCK_C=cfg.block_n,
        BLOCK_D=cfg.block_do, LOSS_BLOCK=cfg.loss_block, **cfg.options(arch))
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
    staged = stats.numel() > 0
    arch = arch_class(z.device)
    cfg = _config(num_classes, "staged_bwd" if staged else "rows", arch)
    row_tiles = triton.cdiv(rows, cfg.block_m)
    d_chunks = triton.cdiv(dim, cfg.block_do)
    # A program walks its row tile's logits and then its D chunks of dz; several programs share
    # the D chunks (each recomputing, or loading when staged, the logits) only where one would
    # walk too many steps.
    class_tiles = triton.cdiv(num_classes, cfg.block_n)
    logit_steps = class_tiles * (1 if staged else triton.cdiv(dim, cfg.block_k))
    steps = logit_steps + d_chunks * (class_tiles + (logit_steps if class_tiles > 1 else 0))
    d_split = max(1, min(d_chunks, triton.cdiv(steps, MAX_SERIAL_STEPS)))
    dz = torch.empty((views, n, dim), dtype=z.dtype, device=z.device)
    dp = torch.empty((num_classes, dim) if need_dp else 0, dtype=s.dtype, device=z.device)
    dp_programs = triton.cdiv(num_classes * dim, cfg.dp_block) if need_dp else 0
    _infonce_bwd_kernel[(row_tiles * d_split + dp_programs,)](
        grad_loss, z, y, s, counts, lse, ds, stats, dz, dp, rows, n, dim, num_classes,
        z.stride(0), z.stride(1), s.stride(0), 1.0 / tau, 1.0 / rows, d_split, SUMS=sums,
        HAS_COUNTS=counts.numel() > 0, THROUGH=through, NEED_DP=need_dp,
        ONE_TILE=num_classes <= cfg.block_n, STAGED=staged, BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_DO=cfg.block_do, DP_BLOCK=cfg.dp_block,
        **cfg.options(arch), **_dot_meta(z.dtype))
    return dz, dp
