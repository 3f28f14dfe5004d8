"""What each kernel module declares for ahead-of-time compilation.

Every kernel file exposes ``aot_specs() -> list[KernelSpec]``: one entry per
@triton.jit kernel and per config it can launch with (each autotune config,
each dtype). ``python -m mvcl_fast.kernels.report`` compiles them all for
sm_90a and sm_80 without a GPU and prints registers, spills and shared memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelSpec:
    name: str                 # readable, e.g. "prototype_infonce_fwd[fp16,BLOCK_N=64]"
    fn: object                # the @triton.jit function
    signature: dict           # every non-constexpr argument -> Triton type: "*fp32", "*bf16", "i32", "i64", "fp32", "*i64", "*i1"
    constexprs: dict = field(default_factory=dict)  # constexpr argument -> value
    num_warps: int = 4
    num_stages: int = 3
