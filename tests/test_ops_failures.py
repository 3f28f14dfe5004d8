"""The ops where a caller's gradient or arguments go astray: undefined and zero incoming
gradients, gradcheck, argument and value errors under torch.compile, a tau too small to compute.
"""
import pytest
import torch

import mvcl_fast
from mvcl_fast import checks, reference

Y = torch.tensor([0, 1, 1, 2, 0, 1])


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("MVCL_FAST_BACKEND", "reference")


class DropGradient(torch.autograd.Function):
    """Identity whose backward returns None: the gradient reaching the op before it is undefined."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def _inputs(dtype, device="cpu"):
    torch.manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)

    return {"z": leaf(6, 8), "views": leaf(2, 6, 8), "prototypes": leaf(3, 8), "q": leaf(2, 3, 8),
            "kv": leaf(2, 5, 8)}


# name -> (the public call, the reference's, the inputs it differentiates); each returns one tensor
OPS = {
    "prototype_infonce": (lambda x: mvcl_fast.prototype_infonce(x["z"], Y, 4, 0.2),
                          lambda x: reference.prototype_infonce(x["z"], Y, 4, 0.2), ["z"]),
    "prototype_infonce_views": (
        lambda x: mvcl_fast.prototype_infonce(x["views"], Y, 3, 0.3),
        lambda x: reference.prototype_infonce(x["views"], Y, 3, 0.3), ["views"]),
    "prototype_infonce_detached": (
        lambda x: mvcl_fast.prototype_infonce(x["z"], Y, 3, detach_prototypes=True),
        lambda x: reference.prototype_infonce(x["z"], Y, 3, detach_prototypes=True), ["z"]),
    "prototype_infonce_explicit": (
        lambda x: mvcl_fast.prototype_infonce(x["z"], Y, 3, prototypes=x["prototypes"]),
        lambda x: reference.prototype_infonce(x["z"], Y, 3, prototypes=x["prototypes"]),
        ["z", "prototypes"]),
    "PrototypeInfoNCELoss": (lambda x: mvcl_fast.PrototypeInfoNCELoss(3)(x["z"], Y),
                             lambda x: reference.prototype_infonce(x["z"], Y, 3), ["z"]),
    "batch_prototypes": (lambda x: mvcl_fast.batch_prototypes(x["z"], Y, 4)[0],
                         lambda x: reference.batch_prototypes(x["z"], Y, 4)[0], ["z"]),
    "multiview_infonce": (lambda x: mvcl_fast.multiview_infonce(x["z"], x["views"]),
                          lambda x: reference.multiview_infonce(x["z"], x["views"]),
                          ["z", "views"]),
    "MultiViewInfoNCELoss": (
        lambda x: mvcl_fast.MultiViewInfoNCELoss(0.2, symmetric=True)(x["z"], x["views"]),
        lambda x: reference.multiview_infonce(x["z"], x["views"], 0.2, symmetric=True),
        ["z", "views"]),
    "daf_attention": (
        lambda x: mvcl_fast.daf_attention(x["q"], x["kv"], x["kv"], x["q"], x["q"], 2),
        lambda x: reference.daf_attention(x["q"], x["kv"], x["kv"], x["q"], x["q"], 2),
        ["q", "kv"]),
}


def _gradients(call, inputs, names, incoming):
    """The gradients of the inputs `names` when the op's output gets the incoming gradient
    "undefined" (DropGradient after the op; 0 * each input is added to the total, so every
    input gets a gradient tensor) or "zero" (zeros; an input autograd leaves out gets zeros)."""
    tensors = [inputs[name] for name in names]
    out = call(inputs)
    if incoming == "undefined":
        total = DropGradient.apply(out).sum() + sum(t.sum() * 0 for t in tensors)
        grads = torch.autograd.grad(total, tensors)
    else:
        grads = torch.autograd.grad(out, tensors, torch.zeros_like(out), allow_unused=True,
                                    materialize_grads=True)
    return grads


@pytest.mark.parametrize("incoming", ["undefined", "zero"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_undefined_or_zero_incoming_gradient_gives_zero(name, incoming, reference_backend):
    """The reference gives 0: so must the op (an undefined gradient is no gradient)."""
    call, reference_call, names = OPS[name]
    inputs = _inputs(torch.float64)
    ours = _gradients(call, inputs, names, incoming)
    expected = _gradients(reference_call, inputs, names, incoming)
    for got, want in zip(ours, expected):
        assert not want.any()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("incoming", ["undefined", "zero"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_kernels_take_undefined_or_zero_incoming_gradient(name, incoming, kernel_device):
    call, _, names = OPS[name]
    inputs = _inputs(torch.float32, kernel_device)
    for grad in _gradients(call, inputs, names, incoming):
        assert not grad.any()


# Detached prototypes are a gradient that is not the function's derivative, by request.
@pytest.mark.parametrize("name", sorted(set(OPS) - {"prototype_infonce_detached"}))
def test_gradcheck_with_default_settings(name, reference_backend):
    """torch.autograd.gradcheck as it comes (float64, its undefined-gradient check included)."""
    call, _, names = OPS[name]
    inputs = _inputs(torch.float64)

    def op(*tensors):
        return call({**inputs, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(op, [inputs[n] for n in names])


@pytest.mark.parametrize("name", ["prototype_infonce", "prototype_infonce_explicit",
                                  "batch_prototypes", "MultiViewInfoNCELoss"])
def test_gradcheck_on_the_kernels(name, kernel_device):
    """The kernels take fp32 at most, where gradcheck's default step (1e-6) and tolerances
    (1e-5, 1e-3) sit below the rounding: the same check with a step and tolerances for fp32,
    its undefined-gradient check included, at small shapes (Triton's interpreter on the CPU)."""
    call, _, names = OPS[name]
    inputs = _inputs(torch.float32, kernel_device)

    def op(*tensors):
        return call({**inputs, **dict(zip(names, tensors))})

    with pytest.warns(UserWarning, match="not a double precision"):
        assert torch.autograd.gradcheck(op, [inputs[n] for n in names], eps=1e-3, atol=1e-2,
                                        rtol=1e-2, fast_mode=True)


# ------------------------------------------------------------ errors under torch.compile
Z = torch.randn(6, 8)
NAN_Z = Z.clone()
NAN_Z[2, 3] = float("nan")
Q, KV = torch.randn(2, 3, 8), torch.randn(2, 5, 8)

ERROR_CASES = {
    "tau zero": lambda: mvcl_fast.prototype_infonce(Z, Y, 3, tau=0.0),
    "tau too small": lambda: mvcl_fast.multiview_infonce(Z, Z[None], tau=1e-39),
    "tau a tensor": lambda: mvcl_fast.multiview_infonce(Z, Z[None], tau=torch.tensor(0.1)),
    "int64 z": lambda: mvcl_fast.prototype_infonce(Z.long(), Y, 3),
    "y of the wrong length": lambda: mvcl_fast.prototype_infonce(Z, Y[:4], 3),
    "1-D z": lambda: mvcl_fast.prototype_infonce(Z[0], Y, 3),
    "float labels": lambda: mvcl_fast.batch_prototypes(Z, Y.float(), 3),
    "num_classes zero": lambda: mvcl_fast.batch_prototypes(Z, Y, 0),
    "prototype shape": lambda: mvcl_fast.prototype_infonce(Z, Y, 3, prototypes=torch.randn(3, 5)),
    "views list shape": lambda: mvcl_fast.multiview_infonce(Z, [Z, Z[:3]]),
    "views dtype": lambda: mvcl_fast.multiview_infonce(Z, Z[None].double()),
    "heads not dividing": lambda: mvcl_fast.daf_attention(Q, KV, KV, Q, Q, 3),
    "mask dtype": lambda: mvcl_fast.daf_attention(Q, KV, KV, Q, Q, 2, torch.zeros(2, 5)),
    "loss module tau": lambda: mvcl_fast.PrototypeInfoNCELoss(3, tau=-1.0)(Z, Y),
    "NaN z, validate=True": lambda: mvcl_fast.prototype_infonce(NAN_Z, Y, 3, validate=True),
    "NaN z, validate=None on the CPU": lambda: mvcl_fast.batch_prototypes(NAN_Z, Y, 3),
    "label out of range, validate=True": lambda: mvcl_fast.prototype_infonce(
        Z, torch.tensor([0, 1, 2, 3, 9, 0]), 4, validate=True),
    "NaN views, validate=True": lambda: mvcl_fast.multiview_infonce(Z, NAN_Z[None], validate=True),
    "NaN gate, validate=True": lambda: mvcl_fast.daf_attention(
        Q, KV, KV, torch.full_like(Q, float("nan")), Q, 2, validate=True),
}


def _eager_error(call):
    with pytest.raises((TypeError, ValueError)) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_under_torch_compile_are_the_eager_ones(case):
    """Under torch.compile(fullgraph=True) the exception is eager's: its exact type and
    message, raised when the compiled code runs, not torch._dynamo.exc.Unsupported."""
    call = ERROR_CASES[case]
    expected = _eager_error(call)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as caught:
        compiled()
    assert type(caught.value) is type(expected)
    assert str(caught.value) == str(expected)


def test_tau_that_varies_between_compiled_calls():
    """A tau schedule: torch.compile traces a tau that changes between calls as a symbol; the
    losses are eager's and a tau out of range raises eager's error."""
    def step(z, tau):
        return (mvcl_fast.multiview_infonce(z, z[None] * 2, tau)
                + mvcl_fast.prototype_infonce(z, Y, 3, tau))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for tau in (0.1, 0.2, 0.0, 0.3, 1e-39, float("nan")):
        if tau == 0.0 or tau == 1e-39 or tau != tau:
            expected = _eager_error(lambda: step(Z, tau))
            with pytest.raises(type(expected)) as caught:
                compiled(Z, tau)
            assert str(caught.value) == str(expected)
        else:
            torch.testing.assert_close(compiled(Z, tau), step(Z, tau))


def test_validate_false_checks_nothing_under_torch_compile():
    torch._dynamo.reset()
    loss = torch.compile(lambda z: mvcl_fast.prototype_infonce(z, Y, 3, validate=False),
                         fullgraph=True, backend="aot_eager")(NAN_Z)
    assert torch.isnan(loss)


def test_errors_of_discarded_results_are_raised_by_inductor():
    """Inductor drops what nothing reads unless the node has side effects: the value check and
    the argument error are kept even where the op's result goes unused; a clean call passes
    and its gradient is the eager one."""
    def step(z, tau):
        mvcl_fast.batch_prototypes(z, Y, 3, validate=True)   # result discarded
        mvcl_fast.multiview_infonce(z, z[None] * 2, tau)        # result discarded
        return z * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with pytest.raises(ValueError, match="^z contains NaN or Inf$"):
        compiled(NAN_Z, 0.1)
    with pytest.raises(ValueError, match="^tau must be a finite number > 0, got 0.0$"):
        compiled(Z, 0.0)
    torch.testing.assert_close(compiled(Z, 0.1), Z * 2)


def test_checked_compiled_step_keeps_its_gradients():
    """The value checks in the graph (validate=True) leave the losses and gradients as eager's."""
    def step(z, views):
        return (mvcl_fast.prototype_infonce(z, Y, 3, validate=True)
                + mvcl_fast.multiview_infonce(z, views, symmetric=True, validate=True))

    inputs = _inputs(torch.float32)
    z, views = inputs["z"], inputs["views"]
    eager = step(z, views)
    eager_grads = torch.autograd.grad(eager, (z, views))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(z, views)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, (z, views)), eager_grads):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------ tau's range
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_tau_below_what_the_dtype_computes_is_refused(dtype):
    smallest = checks.smallest_tau(dtype)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    assert smallest == 8.0 / torch.finfo(accumulation).max
    z = torch.randn(6, 8).to(dtype)
    for call in (lambda tau: mvcl_fast.prototype_infonce(z, Y, 3, tau),
                 lambda tau: mvcl_fast.multiview_infonce(z, z[None], tau),
                 lambda tau: mvcl_fast.PrototypeInfoNCELoss(3, tau=tau)(z, Y)):
        with pytest.raises(ValueError, match=rf"^tau={smallest / 2} is too small for {dtype}"):
            call(smallest / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smallest_tau_computes_the_worst_case(dtype, reference_backend):
    """At the smallest tau, inputs that push every quantity to its bound (the positive pair at
    cosine -1, the negatives at +1) give a finite loss and finite gradients."""
    tau = checks.smallest_tau(dtype)
    e = torch.zeros(8, dtype=dtype)
    e[0] = 1
    anchor = torch.stack([e, -e]).requires_grad_()
    views = torch.stack([-e, e])[None].repeat(2, 1, 1).requires_grad_()
    prototypes = torch.stack([-e, e]).requires_grad_()
    y = torch.tensor([0, 1])
    losses = [mvcl_fast.multiview_infonce(anchor, views, tau, symmetric=True),
              mvcl_fast.prototype_infonce(anchor, y, 2, tau, prototypes=prototypes)]
    for loss in losses:
        grads = torch.autograd.grad(loss, (anchor, views, prototypes), allow_unused=True)
        assert torch.isfinite(loss) and loss > 1 / tau
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_tau_1e_30_is_computed_in_fp32(reference_backend):
    z = torch.randn(6, 8, requires_grad=True)
    loss = (mvcl_fast.prototype_infonce(z, Y, 3, 1e-30)
            + mvcl_fast.multiview_infonce(z, z[None], 1e-30))
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
