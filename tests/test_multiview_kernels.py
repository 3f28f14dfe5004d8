"""The fused multi-view InfoNCE kernels (kernels/multiview_infonce.py) vs the reference.

Every case runs the public ``mvcl_fast.multiview_infonce`` with the Triton
backend forced (Triton's interpreter on CPU, the GPU when there is one) and
compares the loss and both gradients with the reference in float64 (the
truth) and in the same dtype: the kernels must be no worse than the
reference's own error plus a small tolerance. Outputs are poisoned (NaN) as
they are allocated, so an element a kernel forgets to write fails.

The interpreter is slow, so on CPU a subset of the shape grid runs (chosen to
cover every N, D, V, symmetric and dtype value); the whole grid and the big
shapes run on CUDA.
"""
import itertools

import pytest
import torch

import mvcl_fast
from helpers import assert_no_worse_than_reference, poisoned_allocations, rel_err
from mvcl_fast import reference
from mvcl_fast.kernels import multiview_infonce as kernels
from mvcl_fast.ops import multiview

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="large shape: too slow for Triton's interpreter")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRID = list(itertools.product((1, 2, 63, 257), (16, 384, 700, 1000), (1, 4), (False, True), DTYPES))
# (N, D, V, symmetric, dtype) run by the interpreter: every value of every axis at least once,
# N=257 with D <= 384, D=700 (a gradient chunk of 512 + a tail of 256, partly padding) and
# D=1000 (padded rows; fp16/bf16 in one 512 + 512 chunk of 16 rows, fp32 wider than its
# 768-column chunk: the staged backward) with N <= 63.
INTERPRETER_GRID = {
    (1, 16, 1, False, "fp32"), (1, 384, 4, True, "fp16"),
    (2, 16, 4, True, "fp16"), (2, 1000, 1, True, "fp32"), (2, 384, 1, False, "bf16"),
    (63, 384, 4, True, "fp32"), (63, 384, 1, False, "fp16"), (63, 16, 4, True, "bf16"),
    (63, 1000, 1, False, "fp16"), (63, 1000, 4, True, "fp32"), (63, 1000, 4, False, "bf16"),
    (2, 700, 1, False, "fp32"), (63, 700, 4, True, "bf16"), (63, 700, 1, True, "fp16"),
    (257, 16, 4, False, "fp32"), (257, 16, 1, True, "fp16"), (257, 384, 1, True, "fp16"),
}


def _inputs(n, dim, num_views, dtype, device, seed=0, view_noise=None):
    """Fresh Gaussian rows; view_noise=s makes views = anchor + s * noise (aligned pairs)."""
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(n, dim, generator=gen)
    views = torch.randn(num_views, n, dim, generator=gen)
    if view_noise is not None:
        views = anchor + view_noise * views
    return anchor.to(device=device, dtype=dtype), views.to(device=device, dtype=dtype)


def _loss_and_grads(fn, anchor, views, grad_out):
    anchor = anchor.detach().clone().requires_grad_()
    views = views.detach().clone().requires_grad_()
    loss = fn(anchor, views)
    grad_anchor, grad_views = torch.autograd.grad(loss, (anchor, views), grad_out.to(loss.dtype))
    return loss.detach(), grad_anchor, grad_views


def _check_against_reference(anchor, views, tau, symmetric, layout=None):
    """Kernel (poisoned outputs) vs reference in the same dtype and in float64.

    layout(anchor, views) -> (anchor, views) hands the kernels the same values
    in another form (a list, strided, misaligned), inside autograd.
    """
    dtype = anchor.dtype
    grad_out = torch.tensor(1.7, dtype=dtype, device=anchor.device)  # a non-unit upstream grad

    def kernel_fn(a, k):
        return mvcl_fast.multiview_infonce(*(layout(a, k) if layout else (a, k)), tau, symmetric)

    with poisoned_allocations():
        got = _loss_and_grads(kernel_fn, anchor, views, grad_out)
    ref = _loss_and_grads(lambda a, k: reference.multiview_infonce(a, k, tau, symmetric),
                          anchor, views, grad_out)
    truth = _loss_and_grads(lambda a, k: reference.multiview_infonce(a, k, tau, symmetric),
                            anchor.double(), views.double(), grad_out.double())
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    assert got[1].shape == anchor.shape and got[2].shape == views.shape
    for name, g, r, t in zip(("loss", "d_anchor", "d_views"), got, ref, truth):
        assert_no_worse_than_reference(name, g, r, t, dtype)


@pytest.mark.parametrize("n,dim,num_views,symmetric,dtype", GRID,
                         ids=[f"N{n}-D{d}-V{v}-{'sym' if s else 'rows'}-{t}"
                              for n, d, v, s, t in GRID])
def test_matches_reference(kernel_device, n, dim, num_views, symmetric, dtype):
    if not CUDA and (n, dim, num_views, symmetric, dtype) not in INTERPRETER_GRID:
        pytest.skip("interpreter subset: this combination runs on CUDA")
    tau = 0.1 if symmetric else 0.3
    anchor, views = _inputs(n, dim, num_views, DTYPES[dtype], kernel_device)
    _check_against_reference(anchor, views, tau, symmetric)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_staged_backward_past_1024(kernel_device, dtype):
    """D = 1500 in a half dtype, wider than any output chunk: the whole batch's backward stages
    dS and tiles both gradient GEMMs over D, the last D tile partly past D."""
    anchor, views = _inputs(33, 1500, 2, DTYPES[dtype], kernel_device)
    _check_against_reference(anchor, views, 0.1, True)


@pytest.mark.parametrize("symmetric,dtype,dim", [(True, "fp32", 800), (False, "bf16", 1100),
                                                 (True, "fp16", 1100)],
                         ids=["sym-fp32", "rows-bf16", "sym-fp16"])
def test_staged_backward_in_row_chunks(kernel_device, monkeypatch, symmetric, dtype, dim):
    """dS staged for 128 anchor rows at a time (the smallest chunk): N = 300 in 3 chunks, the
    last one short, so the view gradients accumulate across launches."""
    monkeypatch.setattr(kernels, "STAGED_DS_BYTES", 1)
    assert kernels.staged_chunk_rows(300, 2, 4) == kernels.STAGED_CHUNK_ALIGN == 128
    anchor, views = _inputs(300, dim, 2, DTYPES[dtype], kernel_device, view_noise=2.0)
    _check_against_reference(anchor, views, 0.2, symmetric)


def test_staged_chunk_rows_respect_the_limit():
    for n, num_views, size in ((4096, 4, 2), (65536, 4, 2), (100_000, 8, 4), (50, 3, 2)):
        rows = kernels.staged_chunk_rows(n, num_views, size)
        assert rows == n or (rows % kernels.STAGED_CHUNK_ALIGN == 0 and rows * num_views
                             * kernels._ds_stride(n) * size <= kernels.STAGED_DS_BYTES)
    assert kernels.staged_chunk_rows(4096, 4, 2) == 4096        # one chunk at N = 4096
    assert kernels.staged_chunk_rows(65536, 4, 2) == 2048


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,dim,num_views", [(4097, 768, 4), (1000, 4096, 2), (3000, 100, 8)])
def test_matches_reference_large(kernel_device, n, dim, num_views, dtype):
    anchor, views = _inputs(n, dim, num_views, DTYPES[dtype], kernel_device)
    _check_against_reference(anchor, views, 0.1, symmetric=True)


def test_row_and_column_statistics_match_reference(kernel_device):
    """The op's O(N) outputs (what backward reuses) are the row / column log-sum-exps."""
    anchor, views = _inputs(37, 48, 3, torch.float32, kernel_device)
    for symmetric in (False, True):
        with poisoned_allocations():
            loss, lse_rows, lse_cols, _, _, rnorm = multiview._multiview_infonce(anchor, views,
                                                                                 0.1, symmetric)
        terms, rows_truth, cols_truth, _, _ = reference.multiview_infonce_terms(
            anchor.double(), views.double(), 0.1, symmetric)
        assert loss.dtype == lse_rows.dtype == lse_cols.dtype == torch.float32
        assert lse_rows.shape == (3, 37) and lse_cols.shape == ((3, 37) if symmetric else (3, 0))
        assert rel_err(loss, terms.mean()) < 1e-5
        assert rel_err(lse_rows, rows_truth) < 1e-5
        rows = torch.cat([views, anchor[None]]).double()
        assert rel_err(rnorm, 1 / rows.norm(dim=-1)) < 1e-6
        if symmetric:
            assert rel_err(lse_cols, cols_truth) < 1e-5


def test_backward_keeps_only_o_n_statistics(kernel_device):
    """Autograd saves the inputs, [V, N] log-sum-exps and terms and the [V + 1, N] inverse
    norms: nothing of size N x N."""
    n, dim, num_views = 65, 16, 2  # N * N > every input's size
    anchor, views = _inputs(n, dim, num_views, torch.float32, kernel_device)
    anchor.requires_grad_()
    views.requires_grad_()
    for symmetric in (False, True):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = mvcl_fast.multiview_infonce(anchor, views, 0.1, symmetric)
        # Saved inputs are aliases of anchor / views (no copy); the rest must be O(N).
        statistics = [t for t in saved if t.data_ptr() not in (anchor.data_ptr(), views.data_ptr())]
        assert sorted(tuple(t.shape) for t in statistics) == sorted(
            [(num_views, n), (num_views, n if symmetric else 0)] * 2 + [(num_views + 1, n)])
        assert all(t.numel() < n * n for t in saved)
        loss.backward()  # the saved statistics are enough to differentiate


def test_views_as_list_and_strided_inputs(kernel_device):
    """A list of views, views stacked on dim 1 (strided, no copy), and misaligned rows (copied)."""
    n, dim, num_views = 33, 64, 3
    anchor, views = _inputs(n, dim, num_views, torch.float32, kernel_device)
    _check_against_reference(anchor, views, 0.1, True, layout=lambda a, k: (a, list(k.unbind(0))))

    def stacked_on_dim1(a, k):  # [N, V, D] seen as [V, N, D]: row stride V * D, view stride D
        k = k.transpose(0, 1).contiguous().transpose(0, 1)
        assert k.stride() == (dim, num_views * dim, 1)
        return a, k
    _check_against_reference(anchor, views, 0.1, False, layout=stacked_on_dim1)

    def misaligned(a, k):  # rows 4 bytes past 16-byte alignment; views with stride 2 along D
        a = torch.nn.functional.pad(a, (1, 0))[:, 1:]
        k = torch.repeat_interleave(k, 2, dim=-1)[..., ::2]
        assert a.data_ptr() % 16 != 0 and k.stride(-1) == 2
        return a, k
    _check_against_reference(anchor, views, 0.3, True, layout=misaligned)


def test_zero_row_and_extreme_tau(kernel_device):
    """A zero anchor row (its norm clamped at 1e-12) and a small tau (|S| up to 100)."""
    anchor, views = _inputs(20, 40, 2, torch.float32, kernel_device)
    anchor[3] = 0.0
    _check_against_reference(anchor, views, 0.2, True)
    anchor, views = _inputs(20, 40, 2, torch.float32, kernel_device, seed=1)
    _check_against_reference(anchor, views, 0.01, True)


@pytest.mark.parametrize("n,dim,num_views,noise,tau", [(2, 384, 4, 0.8, 0.07), (40, 64, 2, 0.5, 0.05)])
def test_small_loss_stays_accurate(kernel_device, n, dim, num_views, noise, tau):
    """Positives far above the negatives: loss ~ 1e-5, where lse - positive cancels in fp32.

    The kernels form each row's term from the off-diagonal mass (log1p), and
    the backward's diagonal P_ii - 1 as expm1(-term) from it, so the loss and
    the gradients keep full relative precision, where the reference's own
    fp32 error is ~1e-2 (measured on the interpreter: ~1e-6 against ~7e-3).
    """
    anchor, views = _inputs(n, dim, num_views, torch.float32, kernel_device, view_noise=noise)
    grad_out = torch.tensor(1.0, device=kernel_device)
    with poisoned_allocations():
        got = _loss_and_grads(lambda a, k: mvcl_fast.multiview_infonce(a, k, tau, True),
                              anchor, views, grad_out)
    ref = _loss_and_grads(lambda a, k: reference.multiview_infonce(a, k, tau, True),
                          anchor, views, grad_out)
    truth = _loss_and_grads(lambda a, k: reference.multiview_infonce(a, k, tau, True),
                            anchor.double(), views.double(), grad_out.double())
    assert truth[0] < 1e-4
    for name, g, r, t in zip(("loss", "d_anchor", "d_views"), got, ref, truth):
        assert rel_err(g, t) < 2e-5 < 1e-3 < rel_err(r, t), (name, rel_err(g, t), rel_err(r, t))


@pytest.mark.skipif(not CUDA, reason="TF32 exists on the GPU only (the interpreter computes fp32)")
def test_tf32_follows_torch_flag(kernel_device):
    """fp32 dots are exact by default and use TF32 only where torch allows it."""
    anchor, views = _inputs(1024, 256, 2, torch.float32, kernel_device)
    truth = reference.multiview_infonce(anchor.double(), views.double(), 0.1, True)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = mvcl_fast.multiview_infonce(anchor, views, 0.1, True)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = mvcl_fast.multiview_infonce(anchor, views, 0.1, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert rel_err(exact, truth) < 1e-5
    assert rel_err(tf32, truth) < 1e-2


@cuda_only
def test_memory_stays_linear_in_n(kernel_device):
    """N = 65536: the logits would take 16 GiB in fp32; fwd + bwd stay within O(N D)."""
    n, dim, num_views = 65536, 64, 1
    anchor, views = _inputs(n, dim, num_views, torch.float16, kernel_device)
    anchor.requires_grad_()
    views.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = mvcl_fast.multiview_infonce(anchor, views, 0.1, symmetric=True)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and torch.isfinite(anchor.grad).all()
    assert peak < 64 * n * dim, f"peak {peak} bytes"


@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "sym"])
@pytest.mark.parametrize("row_start,num_rows", [(0, 40), (40, 30), (5, 17), (69, 1), (3, 66)],
                         ids=["first-rank", "last-rank", "straddling-tiles", "one-row",
                              "many-tiles"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_row_range_matches_reference(kernel_device, row_start, num_rows, symmetric, dtype):
    """A DDP rank's share: the terms of rows [row_start, +num_rows) against all N keys.

    Every input row gets a gradient (those outside the range through the
    softmaxes of the rows inside it), and no row's gradient is left unwritten.
    """
    _check_row_range(70, 48, 3, row_start, num_rows, symmetric, DTYPES[dtype], kernel_device)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_row_range_past_one_output_chunk(kernel_device, dtype):
    """A rank's share at D wider than a program's output chunk: D-chunks that each recompute
    the logits (the staged backward is the whole batch's)."""
    _check_row_range(70, 1100, 2, 5, 40, True, DTYPES[dtype], kernel_device)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_range_matches_reference_large(kernel_device, dtype):
    """Rank 2 of 8 at N = 4096 global rows: R spans many tiles, keys wrap around."""
    _check_row_range(4096, 256, 2, 1024, 512, True, DTYPES[dtype], kernel_device)


def _check_row_range(n, dim, num_views, row_start, num_rows, symmetric, dtype, device):
    anchor, views = _inputs(n, dim, num_views, dtype, device, seed=3)
    grad_out = torch.tensor(0.9, dtype=torch.float32, device=device)

    def share(fn_inputs, fn):
        a, k = (x.detach().clone().requires_grad_() for x in fn_inputs)
        loss, lse_rows = fn(a, k)[:2]
        grads = torch.autograd.grad(loss, (a, k), grad_out.to(loss.dtype))
        return (loss.detach(), lse_rows, *grads)

    def op(a, k):
        return multiview._multiview_infonce(a, k, 0.2, symmetric, row_start, num_rows)

    def ref(a, k):
        terms, lse_rows = reference.multiview_infonce_terms(a, k, 0.2, symmetric, row_start,
                                                            num_rows)[:2]
        return terms.mean(), lse_rows

    with poisoned_allocations():
        got = share((anchor, views), op)
    same = share((anchor, views), ref)
    truth = share((anchor.double(), views.double()), ref)
    assert got[1].shape == (num_views, num_rows)
    for name, g, r, t in zip(("loss", "lse_rows", "d_anchor", "d_views"), got, same, truth):
        assert_no_worse_than_reference(name, g, r, t, dtype)
    outside = torch.ones(n, dtype=torch.bool)
    outside[row_start:row_start + num_rows] = False
    if outside.any():   # the keys outside the range do get gradients (the negatives' pull)
        assert got[3][:, outside.to(device)].abs().sum() > 0


def test_row_range_bounds_are_checked():
    anchor, views = _inputs(5, 16, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"rows \[3, 6\) are not inside the anchor's 5 rows"):
        multiview._multiview_infonce(anchor, views, 0.1, False, 3, 3)
