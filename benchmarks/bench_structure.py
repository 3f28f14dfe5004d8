"""Structure of the fused prototype path on the CPU: what a GPU would be asked to do.

Counted through Triton's interpreter (mvcl_fast.kernels.structure) for one forward +
backward in bf16: device launches (Triton + aten), host syncs, the bytes each Triton
kernel loads and stores (distinct addresses per launch) against the floor (z and the
labels read once, dz written once), and the tl.dot multiply-adds; the eager reference's
launches beside them. The timed part is the counting run itself (interpreter time,
meaningless for speed): the figures are in extra_info. CPU only (the interpreter).
"""
import os

import pytest
import torch

from harness import CUDA, DRY_RUN

if CUDA or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("CPU structure counts need Triton's interpreter (TRITON_INTERPRET=1, no GPU)",
                allow_module_level=True)
if DRY_RUN:  # gpu_check.sh's CPU dry run checks the script; tests/test_structure_* these counts
    pytest.skip("dry run: the structure counts are tests/test_structure_*.py's",
                allow_module_level=True)

import mvcl_fast  # noqa: E402
from mvcl_fast import reference  # noqa: E402
from mvcl_fast.kernels.structure import count_structure  # noqa: E402

SHAPES = [(1, 256, 128, 20), (3, 256, 128, 20), (1, 1024, 768, 20), (1, 32, 768, 1024)]


@pytest.mark.parametrize("views,n,dim,num_classes", SHAPES,
                         ids=[f"V={v}-N={n}-D={d}-C={c}" for v, n, d, c in SHAPES])
def test_prototype_infonce_structure(benchmark, monkeypatch, views, n, dim, num_classes):
    monkeypatch.setenv("MVCL_FAST_BACKEND", "triton")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(views, n, dim, generator=g).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, num_classes, (n,), generator=g)

    def step():
        return count_structure(
            lambda: mvcl_fast.prototype_infonce(z, y, num_classes, validate=False).backward())

    s = benchmark.pedantic(step, rounds=1, iterations=1)
    eager = count_structure(lambda: reference.prototype_infonce(z, y, num_classes).backward())
    floor = 2 * z.numel() * z.element_size() + y.numel() * 8
    benchmark.extra_info.update(
        op="prototype_infonce", shape=f"V={views} N={n} D={dim} C={num_classes} bf16",
        launches=s.launches, triton_launches=len(s.kernels), syncs=len(s.syncs),
        bytes=s.bytes, bytes_floor=floor, bytes_over_floor=round(s.bytes / floor, 3),
        macs=s.macs, eager_launches=eager.launches, eager_syncs=len(eager.syncs),
        kernels=[dict(name=k.name, programs=k.programs, loaded=k.bytes_loaded,
                      stored=k.bytes_stored, macs=k.macs) for k in s.kernels])
    assert s.syncs == [] and s.launches <= 6
