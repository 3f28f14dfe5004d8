"""What every kernel file of mvcl_fast.kernels shares: constants, dtype maps, the dot policy,
the device's SM count and arch class, the autotune switch and the launch config every config
table holds."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton.language as tl

from mvcl_fast import reference
from mvcl_fast.backend import cuda_index, triton_interpreter_enabled

# F.normalize's eps (the reference's), as a constant @triton.jit code reads; launchers pass
# NORM_EPS.value where a kernel takes it as an argument.
NORM_EPS = tl.constexpr(reference.NORM_EPS)
LOG2E = tl.constexpr(1.4426950408889634)  # natural-log scores -> base 2
LN2 = tl.constexpr(0.6931471805599453)

# The input dtypes the kernels take: Triton's element type and its name in kernel signatures.
TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# SMs of the GPU that CPU runs (Triton's interpreter, the structure counts) model: an H100's.
# The AOT compile report sets it to its target's count while it captures launches.
MODELLED_SM_COUNT = 132

# MVCL_FAST_AUTOTUNE=1: daf_attention searches its config space at each launch and prints the
# choice to pin. The prototype and multi-view kernels have no config space to search: their
# configs are fixed per dtype and size, so the switch leaves them as they are.
AUTOTUNE_ENV = "MVCL_FAST_AUTOTUNE"


@dataclass(frozen=True)
class LaunchConfig:
    """One launch's tiles and compile options: a row of a kernel file's config table.

    block_m x block_n is a program's tile (rows by columns), block_k the depth of its dot
    products or reductions; 0 where a kernel has no such tile. num_stages None: Triton's
    default. Each kernel file subclasses it with the tiles only its kernels take and says what
    each tile is there.
    """
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int | None

    def options(self, arch: str) -> dict:
        """The compile options a launch for the arch class `arch` passes: num_warps, num_stages
        unless Triton's, and maxnreg where MAX_REGISTERS caps the class."""
        stages = {} if self.num_stages is None else {"num_stages": self.num_stages}
        cap = {} if MAX_REGISTERS[arch] is None else {"maxnreg": MAX_REGISTERS[arch]}
        return {"num_warps": self.num_warps, **stages, **cap}


def autotune_requested() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def fp32_dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of this dtype: fp32 dots are exact ("ieee") unless
    torch allows TF32 matmuls right now; half dtypes are exact on the tensor cores either way."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def lacks_bf16_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot must not take this dtype's operands as they are: bf16 under Triton's
    interpreter, whose bf16 dot is wrong (the kernels then dot fp32 operands holding the
    bf16 values)."""
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The arch classes the config tables key their rows on: "sm_90" (Hopper: warpgroup MMA, 227 KiB
# of shared memory a block) and "sm_80" (sm_80, sm_86, sm_89: mma.sync, whose ptxas register
# allocation spills some of sm_90's tiles). mvcl_fast.backend.KERNEL_CAPABILITIES lists the
# capabilities the kernels run on.
ARCH_CLASSES = ("sm_90", "sm_80")

# The registers per thread ptxas may give a launch of each arch class (Triton's maxnreg, PTX's
# .maxnreg); None: no cap passed. Uncapped, sm_86's and sm_89's ptxas held 4-warp kernels to
# 80-168 registers and spilled 11 specialisations each under triton 3.9 (prototype forward and
# class gradient, multi-view fp32-tf32 gradient at D = 128, DAF backward at head dim 64), and
# sm_80's 3 under triton 3.6; at 255 none spills on sm_80, sm_86 or sm_89 under either
# (python -m mvcl_fast.tools.report). sm_90 passes none: its rows are tuned without one.
MAX_REGISTERS = {"sm_90": None, "sm_80": 255}


def arch_class(device: torch.device | None) -> str:
    """The arch class whose config rows a launch on `device` takes: a CUDA device's capability
    answers (None: the current one; off CUDA, the AOT report's capture answers its target's);
    Triton's interpreter models sm_90a, as MODELLED_SM_COUNT does."""
    if triton_interpreter_enabled():
        return "sm_90"
    on_cuda = device is not None and device.type == "cuda"
    major, _ = torch.cuda.get_device_capability(device if on_cuda else None)
    return "sm_90" if major >= 9 else "sm_80"


def sm_count(device: torch.device) -> int:
    """SMs of the GPU a launch on `device` runs on; MODELLED_SM_COUNT off CUDA."""
    if device.type != "cuda":
        return MODELLED_SM_COUNT
    return _cuda_sm_count(cuda_index(device))
