"""What one forward + backward of the prototype path does on a device, counted on the CPU.

Through Triton's interpreter (mvcl_fast/tools/structure.py): device launches (Triton + aten,
memsets and casts included), host syncs, and the bytes the Triton kernels load and
store (distinct addresses per launch) against the floor: read z and the labels once,
write dz (and the loss) once. Budgets: at most 6 launches, 0 syncs, at
most 2.5x the floor's bytes at N=256, D=128, C=20 in bf16.
"""
import pytest
import torch

import mvcl_fast
from mvcl_fast import reference
from mvcl_fast.tools.structure import count_structure

N, D, C = 256, 128, 20
MAX_LAUNCHES, MAX_BYTES_RATIO = 6, 2.5


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setenv("MVCL_FAST_BACKEND", "triton")


def _inputs(views, dtype=torch.bfloat16, explicit=False):
    g = torch.Generator().manual_seed(views)
    shape = (N, D) if views == 1 else (views, N, D)
    z = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, C, (N,), generator=g)
    p = torch.randn(C, D, generator=g).to(dtype).requires_grad_() if explicit else None
    return z, y, p


def floor_bytes(z, y, p=None):
    """Read z, y (and the prototypes) once; write dz (and dP) once, and the loss."""
    e = z.element_size()
    grads = z.numel() * e + (0 if p is None else p.numel() * e)
    return z.numel() * e + y.numel() * y.element_size() + grads + e + (
        0 if p is None else p.numel() * e)


@pytest.mark.parametrize("views", [1, 3])
def test_batch_prototype_path_budget(kernels, views):
    z, y, _ = _inputs(views)
    s = count_structure(lambda: mvcl_fast.prototype_infonce(z, y, C, validate=False).backward())
    ratio = s.bytes / floor_bytes(z, y)
    print(s.table(), f"\nbytes / floor = {ratio:.2f}")
    assert s.syncs == [], s.table()
    assert s.launches <= MAX_LAUNCHES, s.table()
    assert ratio <= MAX_BYTES_RATIO, s.table()
    # One forward program at this size: the sums fused into it, then the backward. No norms
    # kernel, no second dz pass, no memset.
    if views == 1:
        assert [k.name for k in s.kernels] == ["_infonce_fwd_kernel", "_infonce_bwd_kernel"]


def test_explicit_prototype_path_budget(kernels):
    z, y, p = _inputs(3, explicit=True)
    s = count_structure(lambda: mvcl_fast.prototype_infonce(z, y, C, prototypes=p,
                                                            validate=False).backward())
    assert s.syncs == [] and s.launches <= MAX_LAUNCHES, s.table()
    assert s.bytes / floor_bytes(z, y, p) <= MAX_BYTES_RATIO, s.table()


def test_every_gemm_is_on_the_tensor_core_path(kernels):
    """Each dot has M >= 32 (a wgmma M of 64 rows, or the 32-wide D chunk of the class-side
    GEMMs), and the multiply-adds are those of the five GEMMs and no more: the sums (one MMA),
    the logits (two: S_hat split hi + lo), dS (two: G split), the logits again in the backward
    (two) and dz (three: both operands split), each N x C x D with C padded to 32."""
    z, y, _ = _inputs(1)
    s = count_structure(lambda: mvcl_fast.prototype_infonce(z, y, C, validate=False).backward())
    for k in s.kernels:
        assert all(min(m, n) >= 16 and max(m, n) >= 32 for m, n, kk in k.dots), (k.name, k.dots)
    assert s.macs == (1 + 2 + 2 + 2 + 3) * N * 32 * D, s.macs


def test_many_classes_fill_the_gpu_or_stay_short(kernels):
    """The benchmark's many-class shape, N=32 D=768 C=1024, in fp32 (one tl.dot per tile step):
    the class split gives every launch a grid that fills the card or programs of at most ~64
    tile steps (the one-program forward walked 1,920), within the launch budget, 0 syncs."""
    from mvcl_fast.kernels.prototypes import MAX_SERIAL_STEPS
    from mvcl_fast.kernels.shared import sm_count

    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 768, generator=g).requires_grad_()
    y = torch.randint(0, 1024, (32,), generator=g)
    s = count_structure(lambda: mvcl_fast.prototype_infonce(z, y, 1024, validate=False).backward())
    print(s.table())
    assert s.syncs == [] and s.launches <= MAX_LAUNCHES, s.table()
    assert "_infonce_lse_kernel" in [k.name for k in s.kernels], s.table()
    for k in s.kernels:
        assert k.programs >= sm_count(z.device) or k.max_program_dots <= MAX_SERIAL_STEPS, s.table()


def test_validate_true_costs_one_sync(kernels):
    z, y, _ = _inputs(1)
    s = count_structure(lambda: mvcl_fast.prototype_infonce(z, y, C, validate=True))
    assert len(s.syncs) == 1, s.syncs


def test_eager_reference_for_comparison():
    z, y, _ = _inputs(1)
    s = count_structure(lambda: reference.prototype_infonce(z, y, C).backward())
    assert s.launches > 3 * MAX_LAUNCHES  # what the fused path replaces


def test_out_of_range_label_gives_nan_not_a_bad_access(kernels):
    z, y, _ = _inputs(1, torch.float32)
    y = y.clone()
    y[5] = C + 7
    y[9] = -3
    loss = mvcl_fast.prototype_infonce(z, y, C, validate=False)
    assert torch.isnan(loss)
    loss.backward()  # the interpreter checks every address it is given
    with pytest.raises(ValueError, match="y has label"):
        mvcl_fast.prototype_infonce(z, y, C, validate=True)
