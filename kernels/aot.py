"""What each kernel module declares for ahead-of-time compilation.

``python -m mvcl_fast.kernels.report`` compiles every kernel for sm_90a and
sm_80 without a GPU and prints registers, spills, shared memory and the MMA
instruction. A kernel file declares what to compile in one of two ways:

* ``aot_launches() -> list[tuple[str, Callable[[], None]]]`` (preferred):
  named zero-argument callables that run the module's public launchers
  (forward and backward) on CPU tensors at the benchmark shapes and dtypes.
  The report runs each with Triton's launches intercepted (nothing compiles or
  executes, so inputs may be ``torch.empty`` and large shapes only cost the
  allocation) and compiles exactly the specialisations the JIT would: the
  signature, constexprs and 16-divisibility / ==1 attributes the installed
  Triton derives from the real arguments, and every config an autotuner would
  try. While a launch is captured, ``torch.cuda.get_device_capability()`` and
  ``triton.runtime.driver.active.get_current_target()`` answer the target being
  compiled for, so configs pinned per architecture are the target's.
* ``aot_specs() -> list[KernelSpec]`` (fallback for modules without
  aot_launches): one entry per @triton.jit kernel and config, compiled with
  pointers 16-byte aligned and integers without divisibility hints.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

# (input dtype, TF32 dots) of every GPU launch mode: fp32 dots are IEEE unless torch allows TF32.
DTYPE_MODES = ((torch.float32, False), (torch.float32, True), (torch.float16, False),
               (torch.bfloat16, False))


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    """torch.backends.cuda.matmul.allow_tf32 = enabled inside the block (launchers read it)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def mode_name(dtype: torch.dtype, tf32: bool) -> str:
    """'fp32', 'fp32-tf32', 'fp16', 'bf16'."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype] + (
        "-tf32" if tf32 else "")


@dataclass(frozen=True)
class KernelSpec:
    name: str                 # readable, e.g. "prototype_infonce_fwd[fp16,BLOCK_N=64]"
    fn: object                # the @triton.jit function
    signature: dict           # every non-constexpr argument -> Triton type: "*fp32", "*bf16", "i32", "i64", "fp32", "*i64", "*i1"
    constexprs: dict = field(default_factory=dict)  # constexpr argument -> value
    num_warps: int = 4
    num_stages: int = 3
