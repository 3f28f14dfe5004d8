"""What the AOT launch declarations of mvcl_fast.tools.aot_launches share.

Each module of that package declares one op's ``aot_launches() -> list[tuple[str,
Callable[[], None]]]``: named zero-argument callables that run the op's public launchers
(forward and backward) on CPU tensors at the benchmark shapes and dtypes.
``python -m mvcl_fast.tools.report`` runs each with Triton's launches intercepted (nothing
compiles or executes, so inputs may be ``torch.empty`` and large shapes only cost the
allocation) and compiles exactly the specialisations the JIT would: the signature,
constexprs and 16-divisibility / ==1 attributes the installed Triton derives from the real
arguments, and every config an autotuner would try. While a launch is captured,
``torch.cuda.get_device_capability()`` and
``triton.runtime.driver.active.get_current_target()`` answer the target being compiled for,
and the kernels' modelled SM count is the target's, so configs and grids chosen per
architecture are the target's.
"""
from __future__ import annotations

import contextlib

import torch

from mvcl_fast.kernels.shared import DTYPE_NAME

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
    return DTYPE_NAME[dtype] + ("-tf32" if tf32 else "")
