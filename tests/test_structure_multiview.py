"""Structure budgets of multiview_infonce: what one forward + backward does on the device.

Counted on the CPU through Triton's interpreter (mvcl_fast.tools.structure)
at N=256, V=4, D=128 in bf16 without finiteness checks, as on CUDA:

- at most 8 device launches (Triton and aten: casts, fills and memsets count)
  and no host sync;
- the inverse norms computed once, in the forward (the backward reuses them);
- Triton traffic within 2.5x the floor: read the anchor and the views once,
  write their gradients once (bytes at distinct addresses per launch);
- multiply-adds of the tl.dot calls, in units of V N^2 D: the forward's
  log-sum-exps 1 per direction, the backward at most 4 at every D: one
  recompute and one gradient GEMM for each side up to MAX_BLOCK_DO +
  MAX_BLOCK_DO_TAIL = 768 (fp16/bf16 on sm_90: WIDE_D = 1024), where the
  backward's accumulators span D; past it 3 (the logits once, dS staged,
  then the two gradient GEMMs from it);
- at N=4096 every kernel's grid has at least one program per SM of a
  132-SM card.
"""
import pytest
import torch

import mvcl_fast
from mvcl_fast.kernels import multiview_infonce as kernels
from mvcl_fast.tools.structure import count_structure

N, V, D = 256, 4, 128
UNIT = V * N * N * D                     # multiply-adds of one pass over the logits
FLOOR_BYTES = 2 * (V + 1) * N * D * 2    # bf16 anchor + views read once, gradients written once
MAX_LAUNCHES = 8
MAX_TRAFFIC = 2.5
BACKWARD_UNITS = 4
SMS = 132


def _structure(symmetric, n=N, num_views=V, dim=D):
    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(n, dim, generator=gen).bfloat16().requires_grad_()
    views = torch.randn(num_views, n, dim, generator=gen).bfloat16().requires_grad_()

    def step():
        mvcl_fast.multiview_infonce(anchor, views, 0.1, symmetric, validate=False).backward()

    return count_structure(step)


@pytest.fixture(scope="module", params=[False, True], ids=["rows", "symmetric"])
def structure(request):
    mp = pytest.MonkeyPatch()
    mp.setenv("MVCL_FAST_BACKEND", "triton")
    try:
        yield request.param, _structure(request.param)
    finally:
        mp.undo()


def test_launches_and_syncs(structure):
    symmetric, s = structure
    assert s.launches <= MAX_LAUNCHES, s.table()
    assert s.syncs == [], s.table()
    # Forward: norms, both directions' log-sum-exps, the loss; backward: one gradient launch.
    assert [k.name for k in s.kernels] == ["_inverse_norms_kernel", "_lse_kernel", "_loss_kernel",
                                           "_grad_kernel"], s.table()
    assert s.aten == ["ones_like"], s.table()   # autograd's seed gradient of the scalar loss


def test_traffic_within_budget(structure):
    _, s = structure
    assert s.bytes <= MAX_TRAFFIC * FLOOR_BYTES, (s.bytes / FLOOR_BYTES, s.table())


def test_multiply_adds_within_budget(structure):
    symmetric, s = structure
    units = {k.name: k.macs / UNIT for k in s.kernels}
    assert units["_lse_kernel"] == (2 if symmetric else 1), s.table()
    assert units["_grad_kernel"] <= BACKWARD_UNITS, s.table()
    assert s.macs <= (units["_lse_kernel"] + BACKWARD_UNITS) * UNIT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", [16, 64, 128, 384, kernels.MAX_BLOCK_DO, 640,
                                 kernels.MAX_BLOCK_DO + kernels.MAX_BLOCK_DO_TAIL])
def test_backward_in_one_d_chunk(dtype, dim):
    """The backward's accumulators span D, so no D-chunk recomputes the logits."""
    assert kernels._grad_grid(kernels._config("grad", dtype, dim), dim, 4096, V)[1] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("dim", [800, 1000, kernels.WIDE_D])
def test_half_backward_in_one_d_chunk_up_to_1024_on_sm90(dtype, dim):
    assert kernels._grad_grid(kernels._config("grad", dtype, dim), dim, 4096, V)[1] == 1
    assert kernels._grad_grid(kernels._config("grad", dtype, dim, arch="sm_80"), dim, 4096, V)[1] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_backward_chunks_are_1024_wide_past_1024_on_sm90(dtype):
    assert kernels._grad_grid(kernels._config("grad", dtype, 4096), 4096, 4096, V)[1] == 4


BACKWARD_KERNELS = ("_grad_kernel", "_staged_ds_kernel", "_staged_grad_kernel")
# (N, D, units, backward kernels) counted in bf16 with sm_90's configs (the interpreter takes
# them).
WIDE_CASES = [
    (64, 768, 4, ["_grad_kernel"]),     # 512 + 256 columns: one chunk (512-wide ones: 6.7 units)
    (32, 1024, 4, ["_grad_kernel"]),    # 512 + 512 in 16-row tiles (512-wide chunks: 6)
    # dS staged: the logits once, then both GEMMs, at any D (1024-wide chunks recomputing them:
    # 6 units, 10 at D = 4096); N = 128 is one of its tiles (the counts are of whole tiles).
    (128, 2048, 3, ["_staged_ds_kernel", "_staged_grad_kernel"]),
]


@pytest.mark.parametrize("n,dim,units,backward", WIDE_CASES,
                         ids=[f"D={d}" for _, d, _, _ in WIDE_CASES])
def test_backward_units_at_wide_d(n, dim, units, backward):
    """The backward's multiply-adds at wide D, counted: 4 units of V N^2 D while one program's
    accumulators span D, 3 with dS staged past that."""
    num_views = 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MVCL_FAST_BACKEND", "triton")
        s = _structure(True, n, num_views, dim)
    assert [k.name for k in s.kernels if k.name in BACKWARD_KERNELS] == backward, s.table()
    assert sum(k.macs for k in s.kernels if k.name in BACKWARD_KERNELS) == (
        units * num_views * n * n * dim), s.table()
    assert s.launches <= MAX_LAUNCHES and s.syncs == [], s.table()


@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", [128, 768, 1024])
def test_grids_fill_the_card_at_4096(dtype, dim, symmetric):
    lse = kernels._lse_grid(kernels._config("lse", dtype, dim), 4096, V, symmetric)
    grad = kernels._grad_grid(kernels._config("grad", dtype, dim), dim, 4096, V)
    assert lse[0] * lse[1] * lse[2] >= SMS
    assert grad[0] * grad[1] >= SMS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", [2048, 4096])
def test_staged_grids_fill_the_card_at_4096(dtype, dim):
    rows = kernels.staged_chunk_rows(4096, V, dtype.itemsize)
    assert rows == 4096                     # one chunk: 2 backward launches
    ds_grid, grad_grid = kernels._staged_grids(kernels._config("staged_ds", dtype),
                                               kernels._config("staged_grad", dtype), 4096, rows,
                                               dim, V)
    assert ds_grid[0] * ds_grid[1] * ds_grid[2] >= SMS
    assert grad_grid[0] * grad_grid[1] >= SMS
