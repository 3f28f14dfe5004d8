"""Structure of the fused ops on the CPU: what a GPU would be asked to do.

Counted through Triton's interpreter (mvcl_fast.tools.structure) for one forward +
backward in bf16: device launches (Triton + aten), host syncs, the bytes each Triton
kernel loads and stores (distinct addresses per launch) against the floor (every input
read once, every gradient and output written once), and the tl.dot multiply-adds; the
eager reference's launches beside them. The timed part is the counting run itself (interpreter time,
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
from mvcl_fast.tools.structure import count_structure  # noqa: E402

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
    _record(benchmark, "prototype_infonce", f"V={views} N={n} D={dim} C={num_classes} bf16", s,
            floor, eager)
    assert s.syncs == [] and s.launches <= 6


def _record(benchmark, op, shape, s, floor, eager):
    benchmark.extra_info.update(
        op=op, shape=shape, launches=s.launches, triton_launches=len(s.kernels),
        syncs=len(s.syncs), bytes=s.bytes, bytes_floor=floor,
        bytes_over_floor=round(s.bytes / floor, 3), macs=s.macs, eager_launches=eager.launches,
        eager_syncs=len(eager.syncs),
        kernels=[dict(name=k.name, programs=k.programs, loaded=k.bytes_loaded,
                      stored=k.bytes_stored, macs=k.macs, max_program_dots=k.max_program_dots)
                 for k in s.kernels])


MULTIVIEW_SHAPES = [(256, 4, 128), (64, 4, 768), (32, 4, 1024), (128, 4, 2048)]
# The backward's kernels: one recompute pass, or (D past one output chunk) dS staged, then GEMMs.
MULTIVIEW_BACKWARD = ("_grad_kernel", "_staged_ds_kernel", "_staged_grad_kernel")


@pytest.mark.parametrize("n,num_views,dim", MULTIVIEW_SHAPES,
                         ids=[f"N={n}-V={v}-D={d}" for n, v, d in MULTIVIEW_SHAPES])
def test_multiview_infonce_structure(benchmark, monkeypatch, n, num_views, dim):
    monkeypatch.setenv("MVCL_FAST_BACKEND", "triton")
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(n, dim, generator=g).to(torch.bfloat16).requires_grad_()
    views = torch.randn(num_views, n, dim, generator=g).to(torch.bfloat16).requires_grad_()

    def step():
        return count_structure(lambda: mvcl_fast.multiview_infonce(
            anchor, views, 0.1, symmetric=True, validate=False).backward())

    s = benchmark.pedantic(step, rounds=1, iterations=1)
    eager = count_structure(
        lambda: reference.multiview_infonce(anchor, views, 0.1, symmetric=True).backward())
    _record(benchmark, "multiview_infonce", f"N={n} V={num_views} D={dim} symmetric bf16", s,
            2 * (anchor.numel() + views.numel()) * anchor.element_size(), eager)
    benchmark.extra_info["backward_units"] = sum(
        k.macs for k in s.kernels if k.name in MULTIVIEW_BACKWARD) / (num_views * n * n * dim)
    assert s.syncs == [] and s.launches <= 8


DAF_SHAPES = [(48, 96, 128, 4), (80, 96, 768, 12)]  # the shape; MIntRec's


@pytest.mark.parametrize("len_q,len_k,dim,heads", DAF_SHAPES,
                         ids=[f"Lq={q}-Lk={k}-D={d}-H={h}" for q, k, d, h in DAF_SHAPES])
def test_daf_attention_structure(benchmark, monkeypatch, len_q, len_k, dim, heads):
    from mvcl_fast.kernels import daf_attention as kernels

    monkeypatch.setenv("MVCL_FAST_BACKEND", "triton")
    monkeypatch.setattr(kernels, "_config_target", lambda: "gpu")  # the GPU's tiles
    g = torch.Generator().manual_seed(0)
    batch = 2
    q, gate, residual = (torch.randn(batch, len_q, dim, generator=g).to(torch.bfloat16)
                         .requires_grad_() for _ in range(3))
    k, v = (torch.randn(batch, len_k, dim, generator=g).to(torch.bfloat16).requires_grad_()
            for _ in range(2))
    mask = torch.arange(len_k)[None, :] >= torch.tensor([len_k * 3 // 4, len_k * 5 // 8])[:, None]
    grad = torch.randn(batch, len_q, dim, generator=g).to(torch.bfloat16)
    inputs = [q, k, v, gate, residual]

    def run(fn):
        return count_structure(lambda: torch.autograd.grad(fn(), inputs, grad))

    s = benchmark.pedantic(lambda: run(lambda: mvcl_fast.daf_attention(
        q, k, v, gate, residual, heads, mask, validate=False)), rounds=1, iterations=1)
    eager = run(lambda: reference.daf_attention(q, k, v, gate, residual, heads, mask))
    element = q.element_size()
    floor = (7 * q.numel() + 4 * k.numel()) * element + mask.numel()
    _record(benchmark, "daf_attention", f"B={batch} Lq={len_q} Lk={len_k} D={dim} H={heads} "
            "padded keys bf16", s, floor, eager)
    assert s.syncs == [] and s.launches <= 4
