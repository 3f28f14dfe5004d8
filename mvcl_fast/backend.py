"""Which implementation an op runs: the Triton kernels or the PyTorch reference.

Default ("auto"): CUDA tensors run the Triton kernels, CPU tensors the
reference. ``MVCL_FAST_BACKEND=reference`` forces the reference everywhere;
``MVCL_FAST_BACKEND=triton`` forces the kernels and raises where they cannot
run (a CPU tensor without ``TRITON_INTERPRET=1``, or Triton not installed),
never falling back silently. A CUDA card the kernels are not built for (one whose compute
capability is not in KERNEL_CAPABILITIES: sm_75 and older, or a newer arch the compile report
does not cover) runs the reference, with one warning per device naming the card and why;
``MVCL_FAST_BACKEND=triton`` raises there instead. float64 inputs run the reference whatever the
backend: the kernels take fp32, fp16 and bf16 only, and float64 is the
precision the reference is checked in. The variables are read at every call,
so tests and users can switch without re-importing.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

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

# Compute capabilities the kernels are built for: the compile report's targets
# (mvcl_fast.tools.report), each compiled spill-free there: sm_80 (A100), sm_86 (RTX 30, A10,
# A6000), sm_89 (RTX 40, L4, L40S), sm_90 (H100, H200).
KERNEL_CAPABILITIES = frozenset({(8, 0), (8, 6), (8, 9), (9, 0)})


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device (the current one where the device names none)."""
    return torch.cuda.current_device() if device.index is None else device.index


@functools.cache
def unsupported_card(index: int) -> str | None:
    """None where the kernels are built for CUDA device `index`, else why they do not run
    there, naming the card. The capability is read once per device (no host sync)."""
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) in KERNEL_CAPABILITIES:
        return None
    built = ", ".join(f"sm_{a}{b}" for a, b in sorted(KERNEL_CAPABILITIES))
    why = (" (before sm_80 the tensor cores have no bf16 MMA, and some of the kernels' tiles "
           "need more than the 64 KiB of shared memory a Turing block may use)" if major < 8 else "")
    return (f"cuda:{index} is {torch.cuda.get_device_name(index)}, compute capability sm_"
            f"{major}{minor}: the mvcl_fast Triton kernels are built and checked for {built} "
            f"only{why}")


@functools.cache
def _warn_reference(index: int) -> None:
    """Warns, once per device, that the ops run the reference on it."""
    warnings.warn(f"{unsupported_card(index)}; mvcl_fast runs its PyTorch reference there "
                  "(slower, same results)", RuntimeWarning)


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
        if device.type != "cuda" or not triton_available():
            return False
        index = cuda_index(device)
        if unsupported_card(index) is not None:
            _warn_reference(index)
            return False
        return True
    if not triton_available():
        raise RuntimeError(
            f"MVCL_FAST_BACKEND=triton but Triton is not installed, so {op_name} cannot run "
            "its kernels (pip install triton, or unset MVCL_FAST_BACKEND)")
    if device.type == "cuda":
        reason = unsupported_card(cuda_index(device))
        if reason is not None:
            raise RuntimeError(f"MVCL_FAST_BACKEND=triton but {op_name} cannot run its kernels: "
                               f"{reason} (unset MVCL_FAST_BACKEND to run the reference there)")
        return True
    if device.type == "cpu" and triton_interpreter_enabled():
        return True
    raise RuntimeError(
        f"MVCL_FAST_BACKEND=triton but {op_name} got {device.type} tensors: the Triton kernels "
        "run on CUDA, or on CPU only with TRITON_INTERPRET=1 set before Triton is imported")


def kernel_module(name: str):
    """Import mvcl_fast.kernels.<name> (imports Triton, so only on the kernel path)."""
    return importlib.import_module(f"mvcl_fast.kernels.{name}")
