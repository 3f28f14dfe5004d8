"""Which implementation an op runs: the Triton kernels or the PyTorch reference.

Default ("auto"): CUDA tensors run the Triton kernels, CPU tensors the
reference. ``MVCL_FAST_BACKEND=reference`` forces the reference everywhere;
``MVCL_FAST_BACKEND=triton`` forces the kernels and raises where they cannot
run (a CPU tensor without ``TRITON_INTERPRET=1``, or Triton not installed),
never falling back silently. float64 inputs run the reference whatever the
backend: the kernels take fp32, fp16 and bf16 only, and float64 is the
precision the reference is checked in. The variables are read at every call,
so tests and users can switch without re-importing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")


def requested_backend() -> str:
    choice = os.environ.get("MVCL_FAST_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"MVCL_FAST_BACKEND={choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(op_name: str, x: torch.Tensor) -> bool:
    """True where op_name should run its Triton kernels on inputs like x.

    The kernels take float32/float16/bfloat16; float64 (used for checking)
    always runs the reference, whatever MVCL_FAST_BACKEND says.
    """
    choice = requested_backend()
    device = x.device
    if choice == "reference" or x.dtype not in KERNEL_DTYPES:
        return False
    if choice == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError(
            f"MVCL_FAST_BACKEND=triton but Triton is not installed, so {op_name} cannot run "
            "its kernels (pip install triton, or unset MVCL_FAST_BACKEND)")
    if device.type == "cuda":
        return True
    if device.type == "cpu" and triton_interpreter_enabled():
        return True
    raise RuntimeError(
        f"MVCL_FAST_BACKEND=triton but {op_name} got {device.type} tensors: the Triton kernels "
        "run on CUDA, or on CPU only with TRITON_INTERPRET=1 set before Triton is imported")


def kernel_module(name: str):
    """Import mvcl_fast.kernels.<name> (imports Triton, so only on the kernel path)."""
    return importlib.import_module(f"mvcl_fast.kernels.{name}")
