"""Triton kernels of batch_prototypes and prototype_infonce against the reference.

The public ops run with the kernel backend forced (kernel_device fixture: the
Triton interpreter on CPU, the GPU when there is one). Every forward value and
gradient is compared with mvcl_fast.reference evaluated in float64 (the truth)
and must be no worse than the reference evaluated in the same dtype, plus a
small tolerance. Kernel outputs are allocated inside poisoned_allocations(),
so an element a kernel forgets to write fails the test.
"""
import contextlib

import pytest
import torch

import mvcl_fast
from helpers import assert_no_worse_than_reference, poisoned_allocations
from mvcl_fast import reference

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="large shape: too slow for the Triton interpreter")
TAU = 0.1
UPSTREAM = 0.75  # the loss gradient fed to backward, so its scaling is exercised


def _labels(n, num_classes, kind, generator):
    """Labels of n rows: 'random', 'absent' (only every third class used), or 'one' class."""
    if kind == "one":
        return torch.full((n,), num_classes - 1, dtype=torch.int64)
    if kind == "absent":
        used = torch.arange(0, num_classes, 3)
        return used[torch.randint(0, len(used), (n,), generator=generator)]
    return torch.randint(0, num_classes, (n,), generator=generator)


# Layouts of z: the kernels take any row strides ("rows", "transposed"); "columns" is copied.
LAYOUTS = {
    "contiguous": (lambda shape: shape, lambda x: x),
    "rows": (lambda shape: (*shape[:-2], 2 * shape[-2], shape[-1]), lambda x: x[..., ::2, :]),
    "transposed": (lambda shape: (shape[1], shape[0], shape[2]), lambda x: x.transpose(0, 1)),
    "columns": (lambda shape: (*shape[:-1], 2 * shape[-1]), lambda x: x[..., ::2]),
}


def _leaf(shape, dtype, device, generator, layout="contiguous"):
    """A float64 master leaf, its (dtype, device) copy, and the view giving shape in that layout."""
    storage_shape, view = LAYOUTS[layout]
    master = torch.randn(*storage_shape(shape), generator=generator, dtype=torch.float64)
    return master, master.to(device=device, dtype=dtype), view


# ------------------------------------------------------------ batch prototypes
def _check_batch_prototypes(device, dtype, n, dim, num_classes, labels="random",
                            layout="contiguous", deterministic=False):
    g = torch.Generator().manual_seed(n * 7919 + dim * 31 + num_classes)
    y = _labels(n, num_classes, labels, g)
    master, z, view = _leaf((n, dim), dtype, device, g, layout)
    upstream = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)

    def run(z_leaf, y_, w, kernel):
        z_leaf = z_leaf.detach().requires_grad_()
        if kernel:
            with poisoned_allocations():
                protos, counts = mvcl_fast.batch_prototypes(
                    view(z_leaf), y_, num_classes, deterministic=deterministic)
                (protos * w).sum().backward()
        else:
            protos, counts = reference.batch_prototypes(view(z_leaf), y_, num_classes)
            (protos * w).sum().backward()
        return protos.detach(), counts, z_leaf.grad

    got = run(z, y.to(device), upstream.to(device, dtype), kernel=True)
    same = run(master.to(dtype), y, upstream.to(dtype), kernel=False)
    truth = run(master, y, upstream, kernel=False)
    assert got[0].dtype == dtype and got[1].dtype == torch.int64 and got[2].dtype == dtype
    assert torch.equal(got[1].cpu(), truth[1]), "counts differ"
    for name, i in (("prototypes", 0), ("dz", 2)):
        assert_no_worse_than_reference(f"batch_prototypes {name}", got[i].cpu(), same[i], truth[i],
                                       dtype)
    absent = truth[1] == 0
    assert torch.all(got[0].cpu()[absent] == 0), "absent classes must have prototype 0"
    return got


BATCH_CASES = [  # (n, dim, num_classes, labels)
    (1, 16, 1, "random"),
    (7, 384, 20, "absent"),
    (33, 1000, 31, "random"),
    (1000, 384, 20, "random"),
    (33, 16, 20, "one"),
    (1000, 1000, 31, "absent"),
    (7, 16, 1, "random"),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("n,dim,num_classes,labels", BATCH_CASES)
def test_batch_prototypes_fp32(kernel_device, n, dim, num_classes, labels, deterministic):
    _check_batch_prototypes(kernel_device, torch.float32, n, dim, num_classes, labels,
                            deterministic=deterministic)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_batch_prototypes_half(kernel_device, dtype, deterministic):
    _check_batch_prototypes(kernel_device, dtype, 33, 384, 31, "absent",
                            deterministic=deterministic)


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_batch_prototypes_strided_z(kernel_device, layout):
    _check_batch_prototypes(kernel_device, torch.float32, 33, 100, 20, layout=layout)


def test_batch_prototypes_deterministic_is_bitwise_reproducible(kernel_device):
    first = _check_batch_prototypes(kernel_device, torch.float32, 300, 200, 5, deterministic=True)
    second = _check_batch_prototypes(kernel_device, torch.float32, 300, 200, 5, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@cuda_only
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("n,dim,num_classes", [(65536, 768, 31), (20000, 4096, 4096),
                                               (65536, 16, 1)])
def test_batch_prototypes_large(kernel_device, n, dim, num_classes, deterministic):
    _check_batch_prototypes(kernel_device, torch.float32, n, dim, num_classes,
                            deterministic=deterministic)


# ---------------------------------------------------------- prototype InfoNCE
def _check_infonce(device, dtype, views, n, dim, num_classes, labels="random", explicit=False,
                   detach=False, layout="contiguous", deterministic=False):
    """Loss, dz and (explicit, not detached) dP of the kernels vs the reference; returns them.

    views=0 means a 2-D z [N, D]; otherwise z is [views, N, D].
    """
    g = torch.Generator().manual_seed(views * 131 + n * 7919 + dim * 31 + num_classes)
    y = _labels(n, num_classes, labels, g)
    shape = (n, dim) if views == 0 else (views, n, dim)
    z_master, z, view = _leaf(shape, dtype, device, g, layout)
    p_master, p, _ = _leaf((num_classes, dim), dtype, device, g) if explicit else (None,) * 3

    def run(z_leaf, p_leaf, y_, kernel):
        z_leaf = z_leaf.detach().requires_grad_()
        p_leaf = None if p_leaf is None else p_leaf.detach().requires_grad_()
        fn = mvcl_fast.prototype_infonce if kernel else reference.prototype_infonce
        kwargs = dict(deterministic=deterministic) if kernel else {}
        with poisoned_allocations() if kernel else contextlib.nullcontext():
            loss = fn(view(z_leaf), y_, num_classes, TAU, prototypes=p_leaf,
                      detach_prototypes=detach, **kwargs)
            loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype, device=loss.device))
        grad_p = None if p_leaf is None else p_leaf.grad
        return loss.detach(), z_leaf.grad, grad_p

    got = run(z, p, y.to(device), kernel=True)
    same = run(z_master.to(dtype), None if p is None else p_master.to(dtype), y, kernel=False)
    truth = run(z_master, p_master, y, kernel=False)
    assert got[0].dtype == dtype and got[0].dim() == 0 and got[1].dtype == dtype
    names = ["loss", "dz"] + (["dP"] if explicit and not detach else [])
    for i, name in enumerate(names):
        assert_no_worse_than_reference(f"prototype_infonce {name}", got[i].cpu(), same[i],
                                       truth[i], dtype)
    if explicit and detach:
        assert got[2] is None
    return got


INFONCE_CASES = [  # (views, n, dim, num_classes, labels, explicit, detach)
    (0, 1, 16, 1, "random", False, False),       # one row, one class: loss 0
    (0, 7, 16, 20, "absent", False, False),      # most classes masked out
    (3, 7, 384, 20, "random", False, False),
    (3, 33, 384, 31, "random", False, False),
    (3, 33, 1000, 20, "absent", False, False),   # D tail, 8 D-out chunks
    (0, 1000, 384, 20, "random", False, False),  # a real batch size: row splits in dP
    (3, 33, 16, 20, "one", False, False),        # all rows in one class
    (3, 33, 384, 1, "random", False, False),     # a single class: loss 0, gradient 0
    (3, 33, 100, 100, "random", False, False),   # several class tiles
    (3, 7, 384, 20, "random", True, False),      # explicit prototypes: dP
    (0, 33, 1000, 31, "random", True, False),
    (3, 33, 100, 100, "absent", True, False),    # explicit: absent classes stay candidates
    (3, 33, 40, 130, "random", True, False),     # explicit, three class tiles
    (3, 7, 384, 20, "random", True, True),       # detached prototypes
    (3, 1, 16, 1, "random", True, False),
]


@pytest.mark.parametrize("views,n,dim,num_classes,labels,explicit,detach", INFONCE_CASES)
def test_prototype_infonce_fp32(kernel_device, views, n, dim, num_classes, labels, explicit,
                                detach):
    _check_infonce(kernel_device, torch.float32, views, n, dim, num_classes, labels, explicit,
                   detach)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("views,n,dim,num_classes,labels,explicit", [
    (3, 33, 384, 31, "absent", False),
    (0, 1000, 384, 20, "random", False),
    (3, 7, 1000, 20, "random", True),
    (0, 33, 100, 100, "random", True),
])
def test_prototype_infonce_half(kernel_device, dtype, views, n, dim, num_classes, labels,
                                explicit):
    _check_infonce(kernel_device, dtype, views, n, dim, num_classes, labels, explicit)


@pytest.mark.parametrize("explicit", [False, True], ids=["batch", "explicit"])
def test_prototype_infonce_split_work(kernel_device, monkeypatch, explicit):
    """Small work limits: the sums split their rows (and add the splits), the forward spreads
    the rows over programs (and the finalize kernel adds their partials); with 100 classes the
    class split runs one class tile per chunk and splits its class-side rows."""
    from mvcl_fast.kernels import prototypes as module, shared

    monkeypatch.setattr(module, "MAX_SERIAL_STEPS", 1)
    monkeypatch.setattr(shared, "MODELLED_SM_COUNT", 2048)  # 4096 programs fill it
    _check_infonce(kernel_device, torch.float32, 3, 70, 100, 100, explicit=explicit)
    _check_infonce(kernel_device, torch.bfloat16, 3, 70, 200, 20, explicit=explicit)


@pytest.mark.parametrize("explicit", [False, True], ids=["batch", "explicit"])
def test_prototype_infonce_many_classes_without_staging(kernel_device, monkeypatch, explicit):
    """Logits too many to stage: the row programs recompute them per class tile (also split
    over several programs, whose partials the finalize kernel adds)."""
    from mvcl_fast.kernels import prototypes as module, shared

    monkeypatch.setattr(module, "STAGED_LOGITS_LIMIT", 0)
    _check_infonce(kernel_device, torch.float32, 3, 33, 100, 100, explicit=explicit)
    _check_infonce(kernel_device, torch.bfloat16, 0, 33, 40, 130, "absent", explicit=explicit)
    monkeypatch.setattr(module, "MAX_SERIAL_STEPS", 1)
    monkeypatch.setattr(shared, "MODELLED_SM_COUNT", 2048)  # 4096 programs fill it
    _check_infonce(kernel_device, torch.float32, 3, 70, 100, 100, explicit=explicit)


@pytest.mark.parametrize("steps", [64, 1], ids=["one-split", "row-splits"])
def test_prototype_infonce_class_split_loss_only(kernel_device, monkeypatch, steps):
    """No gradient (need_ds False): the class split's loss programs split the rows by
    themselves; the loss matches the reference's without a backward."""
    from mvcl_fast.kernels import prototypes as module

    monkeypatch.setattr(module, "MAX_SERIAL_STEPS", steps)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 70, 48, generator=g, dtype=torch.float64)
    y = torch.randint(0, 100, (70,), generator=g)
    with torch.no_grad(), poisoned_allocations():
        got = mvcl_fast.prototype_infonce(z.float().to(kernel_device), y.to(kernel_device), 100,
                                          TAU)
    same = reference.prototype_infonce(z.float(), y, 100, TAU)
    truth = reference.prototype_infonce(z, y, 100, TAU)
    assert_no_worse_than_reference("loss", got.cpu(), same, truth, torch.float32)


def test_prototype_infonce_class_split_detached_prototypes(kernel_device):
    """Batch prototypes detached: no dS (need_ds False), dz from the staged logits alone."""
    _check_infonce(kernel_device, torch.float32, 3, 33, 100, 100, detach=True)


def test_batch_prototypes_split_rows(kernel_device, monkeypatch):
    from mvcl_fast.kernels import prototypes as module, shared

    monkeypatch.setattr(module, "MAX_SERIAL_STEPS", 1)
    monkeypatch.setattr(shared, "MODELLED_SM_COUNT", 2048)  # 4096 programs fill it
    _check_batch_prototypes(kernel_device, torch.float32, 300, 200, 5)


@pytest.mark.parametrize("explicit", [False, True], ids=["batch", "explicit"])
@pytest.mark.parametrize("layout", ["rows", "transposed", "columns"])
def test_prototype_infonce_strided_z(kernel_device, layout, explicit):
    _check_infonce(kernel_device, torch.float32, 3, 33, 100, 20, explicit=explicit, layout=layout)


def test_prototype_infonce_deterministic_is_bitwise_reproducible(kernel_device):
    first = _check_infonce(kernel_device, torch.float32, 3, 100, 200, 20, deterministic=True)
    second = _check_infonce(kernel_device, torch.float32, 3, 100, 200, 20, deterministic=True)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


def test_prototype_infonce_rows_below_eps(kernel_device):
    """Rows and prototypes of norm 0 or below eps = 1e-12: the eps branch of the normalisation."""
    z = torch.randn(2, 9, 40, dtype=torch.float64)
    z[0, 3] = 0
    z[1, 5] *= 1e-14
    z[1, 7] *= 1e-14
    p = torch.randn(6, 40, dtype=torch.float64)
    p[2] = 0
    p[4] *= 1e-14
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    results = []
    for dtype, kernel in ((torch.float32, True), (torch.float32, False), (torch.float64, False)):
        z_leaf = z.to(dtype).to(kernel_device if kernel else "cpu").requires_grad_()
        p_leaf = p.to(dtype).to(kernel_device if kernel else "cpu").requires_grad_()
        y_ = y.to(z_leaf.device)
        fn = mvcl_fast.prototype_infonce if kernel else reference.prototype_infonce
        with poisoned_allocations() if kernel else contextlib.nullcontext():
            loss = fn(z_leaf, y_, 6, TAU, prototypes=p_leaf)
            loss.backward()
        results.append((loss.detach().cpu(), z_leaf.grad.cpu(), p_leaf.grad.cpu()))
    got, same, truth = results
    for i, name in enumerate(["loss", "dz", "dP"]):
        assert_no_worse_than_reference(name, got[i], same[i], truth[i], torch.float32)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("views,n,dim,num_classes,explicit", [
    (3, 65536, 768, 31, False),
    (1, 4096, 4096, 4096, True),
    (3, 1000, 1000, 1000, True),
])
def test_prototype_infonce_large(kernel_device, dtype, views, n, dim, num_classes, explicit):
    _check_infonce(kernel_device, dtype, views, n, dim, num_classes, explicit=explicit)
