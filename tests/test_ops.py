"""The public custom ops: registration (opcheck), torch.compile, dispatch, dtypes, modules."""
import pytest
import torch

import mvcl_fast
from mvcl_fast import checks, reference
from mvcl_fast.ops import daf, multiview, prototypes


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("MVCL_FAST_BACKEND", "reference")


def _grad(*shape):
    return torch.randn(*shape, requires_grad=True)


OPCHECK_CASES = {
    "batch_prototypes": lambda: (prototypes._batch_prototypes,
                                 (_grad(9, 8), torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1]), 4)),
    "prototype_infonce_batch": lambda: (   # batch prototypes, gradient through them
        prototypes._prototype_infonce,
        (_grad(2, 6, 8), torch.tensor([0, 1, 1, 2, 0, 1]), None, None, 4, 0.1, True, True)),
    "prototype_infonce_batch_detached": lambda: (
        prototypes._prototype_infonce,
        (_grad(1, 6, 8), torch.tensor([0, 1, 1, 2, 0, 3]), None, None, 4, 0.2, False, False)),
    "prototype_infonce_explicit_counts": lambda: (   # global prototypes under DDP: masked
        prototypes._prototype_infonce,
        (_grad(2, 6, 8), torch.tensor([0, 1, 1, 2, 0, 1]), _grad(4, 8),
         torch.tensor([2, 3, 1, 0]), 4, 0.1, False, True)),
    "prototype_infonce_explicit": lambda: (
        prototypes._prototype_infonce,
        (_grad(1, 6, 8), torch.tensor([0, 1, 1, 2, 0, 3]), _grad(4, 8), None, 4, 0.3, False,
         True)),
    "prototype_infonce_class_split": lambda: (   # 40 classes: the kernels stage the logits
        prototypes._prototype_infonce,
        (_grad(2, 6, 8), torch.tensor([0, 39, 1, 20, 0, 33]), None, None, 40, 0.1, True, True)),
    "prototype_infonce_class_split_explicit": lambda: (
        prototypes._prototype_infonce,
        (_grad(1, 6, 8), torch.tensor([0, 39, 1, 20, 0, 33]), _grad(40, 8), None, 40, 0.2, False,
         True)),
    "prototype_infonce_class_split_counts": lambda: (   # global prototypes, absent classes
        prototypes._prototype_infonce,
        (_grad(2, 6, 8), torch.tensor([0, 39, 1, 20, 0, 33]), _grad(40, 8),
         (torch.arange(40) % 4 != 2).long(), 40, 0.1, False, True)),
    "multiview_infonce": lambda: (multiview._multiview_infonce, (_grad(5, 8), _grad(3, 5, 8), 0.1, False)),
    "multiview_infonce_symmetric": lambda: (
        multiview._multiview_infonce, (_grad(5, 8), _grad(2, 5, 8), 0.2, True)),
    "multiview_infonce_rank_share": lambda: (   # rows [2, 4) of 6: one DDP rank's share
        multiview._multiview_infonce, (_grad(6, 8), _grad(2, 6, 8), 0.2, True, 2, 2)),
    "multiview_infonce_staged": lambda: (   # D past fp32's 768-column chunk: dS staged
        multiview._multiview_infonce, (_grad(5, 800), _grad(2, 5, 800), 0.2, True)),
    "daf_attention": lambda: (
        daf._daf_attention,
        (_grad(2, 3, 8), _grad(2, 5, 8), _grad(2, 5, 8), _grad(2, 3, 8), _grad(2, 3, 8),
         torch.tensor([[False, False, True, False, True], [True] * 5]), 2)),
    "check_values": lambda: (   # the value checks' graph node under torch.compile
        checks._check_values_op,
        ([_grad(3, 4), _grad(2)], "z,prototypes", "y", torch.tensor([0, 1]), 2, None)),
    "daf_attention_no_mask": lambda: (
        daf._daf_attention,
        (_grad(1, 4, 8), _grad(1, 2, 8), _grad(1, 2, 8), _grad(1, 4, 8), _grad(1, 4, 8), None, 4)),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case, reference_backend):
    op, args = OPCHECK_CASES[case]()
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", sorted(c for c in OPCHECK_CASES if c.startswith("prototype"))
                         + ["multiview_infonce_staged"])
def test_opcheck_kernels(case, kernel_device):
    """The kernel path's fake, autograd and compile registration (Triton's interpreter on CPU)."""
    op, args = OPCHECK_CASES[case]()
    args = tuple(a.to(kernel_device) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_public_ops_match_reference_and_keep_dtype(dtype, reference_backend):
    z = torch.randn(3, 10, 16).to(dtype)
    y = torch.randint(0, 4, (10,))
    loss = mvcl_fast.prototype_infonce(z, y, 4)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, reference.prototype_infonce(z, y, 4))
    loss = mvcl_fast.multiview_infonce(z[0], z[1:], symmetric=True)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, reference.multiview_infonce(z[0], z[1:], symmetric=True))
    out = mvcl_fast.daf_attention(z, z, z, z, z, 4)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.daf_attention(z, z, z, z, z, 4))


def test_prototype_infonce_gradient_flows_through_batch_prototypes(reference_backend):
    z = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (12,))
    for detach in (False, True):
        mvcl_fast.prototype_infonce(z, y, 5, 0.2, detach_prototypes=detach).backward()
        ours, z.grad = z.grad, None
        reference.prototype_infonce(z, y, 5, 0.2, detach_prototypes=detach).backward()
        torch.testing.assert_close(ours, z.grad)
        z.grad = None


def test_batch_prototypes_api(reference_backend):
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 1, 0, 3, 3, 3])
    protos, counts = mvcl_fast.batch_prototypes(z, y, 5)
    assert counts.tolist() == [1, 2, 0, 3, 0]
    protos.sum().backward()
    torch.testing.assert_close(z.grad, (1.0 / counts[y].double())[:, None].expand(6, 4))


def test_views_as_list_equal_stacked(reference_backend):
    anchor, views = torch.randn(5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(mvcl_fast.multiview_infonce(anchor, list(views)),
                               mvcl_fast.multiview_infonce(anchor, views))


def test_losses_are_drop_in_modules(reference_backend):
    z = torch.randn(16, 8, requires_grad=True)
    y = torch.randint(0, 4, (16,))
    loss = mvcl_fast.PrototypeInfoNCELoss(4, tau=0.1)(z, y)
    loss = loss + mvcl_fast.MultiViewInfoNCELoss(tau=0.1, symmetric=True)(z, [z * 2, z + 1])
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert "num_classes=4" in repr(mvcl_fast.PrototypeInfoNCELoss(4))


def _all_ops(z, y, anchor, views, q, kv, mask):
    loss = mvcl_fast.prototype_infonce(z, y, 5)
    protos, _ = mvcl_fast.batch_prototypes(z, y, 5)
    loss = loss + mvcl_fast.prototype_infonce(z, y, 5, prototypes=protos.detach() + 1)
    loss = loss + mvcl_fast.multiview_infonce(anchor, views, symmetric=True)
    out = mvcl_fast.daf_attention(q, kv, kv, q, q, 2, mask)
    return loss + out.square().mean()


def test_torch_compile_fullgraph_all_ops(reference_backend):
    torch._dynamo.reset()
    inputs = [torch.randn(12, 8, requires_grad=True), torch.randint(0, 5, (12,)),
              torch.randn(6, 8, requires_grad=True), torch.randn(3, 6, 8, requires_grad=True),
              torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 4, 8, requires_grad=True),
              torch.tensor([[False, True, False, False], [True] * 4])]
    eager = _all_ops(*inputs)
    eager_grads = torch.autograd.grad(eager, [x for x in inputs if x.requires_grad])
    compiled = torch.compile(_all_ops, fullgraph=True, backend="aot_eager")(*inputs)
    compiled_grads = torch.autograd.grad(compiled, [x for x in inputs if x.requires_grad])
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_torch_compile_inductor_no_graph_break(reference_backend):
    torch._dynamo.reset()
    z = torch.randn(12, 8, requires_grad=True)
    y = torch.randint(0, 5, (12,))
    fn = torch.compile(lambda z, y: mvcl_fast.prototype_infonce(z, y, 5) * 2, fullgraph=True)
    fn(z, y).backward()
    assert torch.isfinite(z.grad).all()


def test_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("MVCL_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MVCL_FAST_BACKEND"):
        mvcl_fast.multiview_infonce(torch.randn(3, 4), torch.randn(1, 3, 4))


def test_forced_triton_without_a_way_to_run_it_raises(monkeypatch):
    monkeypatch.setenv("MVCL_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mvcl_fast.multiview_infonce(torch.randn(3, 4), torch.randn(1, 3, 4))


def test_float64_runs_the_reference_whatever_the_backend(monkeypatch):
    """The kernels take fp32/fp16/bf16; float64 runs the reference even with triton forced
    (and no interpreter that could run the kernels on the CPU)."""
    monkeypatch.setenv("MVCL_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 2, 0, 1])
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    results = [mvcl_fast.prototype_infonce(z, y, 3), mvcl_fast.batch_prototypes(z[0], y, 3)[0],
               mvcl_fast.multiview_infonce(z[0], z[1:], symmetric=True),
               mvcl_fast.daf_attention(q, z, z, q, q, 2)]
    expected = [reference.prototype_infonce(z, y, 3), reference.batch_prototypes(z[0], y, 3)[0],
                reference.multiview_infonce(z[0], z[1:], symmetric=True),
                reference.daf_attention(q, z, z, q, q, 2)]
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want)
        assert got.dtype == torch.float64
    grads = torch.autograd.grad(sum(r.sum() for r in results), (z, q))
    want_grads = torch.autograd.grad(sum(r.sum() for r in expected), (z, q))
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)


def test_auto_backend_runs_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("MVCL_FAST_BACKEND", raising=False)
    from mvcl_fast import backend
    assert not backend.use_triton("x", torch.randn(2))


class _OnCuda:
    """Stands in for a tensor on a CUDA device (use_triton reads only its device and dtype)."""
    def __init__(self, index, dtype=torch.float32):
        self.device, self.dtype = torch.device("cuda", index), dtype


@pytest.fixture
def cards(monkeypatch):
    """Fakes CUDA cards: {index: (name, capability)}; counts the capability queries."""
    from mvcl_fast import backend

    installed, queries = {}, []

    def capability(index=None):
        queries.append(index)
        return installed[index][1]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: installed[index][0])
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    for cached in (backend.unsupported_card, backend._warn_reference):
        cached.cache_clear()
    yield installed, queries
    for cached in (backend.unsupported_card, backend._warn_reference):
        cached.cache_clear()


def test_cards_the_kernels_are_not_built_for_run_the_reference_with_one_warning(monkeypatch, cards):
    from mvcl_fast import backend

    monkeypatch.delenv("MVCL_FAST_BACKEND", raising=False)
    installed, queries = cards
    installed.update({0: ("Tesla T4", (7, 5)), 1: ("NVIDIA A100-SXM4-80GB", (8, 0)),
                      2: ("NVIDIA B200", (10, 0)), 3: ("NVIDIA GeForce RTX 3090", (8, 6)),
                      4: ("NVIDIA L4", (8, 9)), 5: ("NVIDIA H100 80GB HBM3", (9, 0))})
    with pytest.warns(RuntimeWarning) as caught:
        for _ in range(3):
            assert not backend.use_triton("prototype_infonce", _OnCuda(0))
            assert not backend.use_triton("daf_attention", _OnCuda(0, torch.float16))
            assert not backend.use_triton("multiview_infonce", _OnCuda(2))
            for index in (1, 3, 4, 5):
                assert backend.use_triton("multiview_infonce", _OnCuda(index))
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 2, messages  # one per unsupported card, whatever the op or the call
    t4, b200 = messages
    assert "Tesla T4" in t4 and "sm_75" in t4 and "bf16 MMA" in t4 and "reference" in t4, t4
    assert "NVIDIA B200" in b200 and "sm_100" in b200 and "sm_80, sm_86, sm_89, sm_90" in b200, b200
    assert sorted(queries) == [0, 1, 2, 3, 4, 5]  # the capability is read once per device


def test_forced_triton_on_a_card_the_kernels_are_not_built_for_raises(monkeypatch, cards):
    from mvcl_fast import backend

    monkeypatch.setenv("MVCL_FAST_BACKEND", "triton")
    installed, _ = cards
    installed.update({0: ("Tesla T4", (7, 5)), 1: ("NVIDIA A10", (8, 6))})
    with pytest.raises(RuntimeError, match=r"MVCL_FAST_BACKEND=triton but prototype_infonce "
                                           r"cannot run its kernels: cuda:0 is Tesla T4.*sm_75"):
        backend.use_triton("prototype_infonce", _OnCuda(0))
    assert backend.use_triton("prototype_infonce", _OnCuda(1))
    # float64 runs the reference on any card, forced or not.
    assert not backend.use_triton("prototype_infonce", _OnCuda(0, torch.float64))
