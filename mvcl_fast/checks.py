"""Input validation shared by the public ops: clear errors that name the argument.

Shape, dtype, device and tau checks are static (free, and traceable by
torch.compile): they always run, at the public entry. Value checks (label range,
NaN/Inf) read the data, which on CUDA costs a host sync: the ``validate``
keyword decides (None: CPU tensors only; True: always, one sync; False: never).
Unchecked labels never reach an address: the kernels mask them (a NaN loss).

Under torch.compile both kinds raise what they raise in eager, when the compiled
code runs: Dynamo cannot let an exception escape the graph it captures (with
fullgraph=True it reports ``torch._dynamo.exc.Unsupported`` instead), so a
static check that fails while Dynamo traces becomes the graph node
``mvcl_fast::argument_error`` (``argument_errors_when_run``), and the value checks
are the graph node ``mvcl_fast::check_values``; dead-code elimination keeps both.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from mvcl_fast import reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ARGUMENT_ERRORS = {"TypeError": TypeError, "ValueError": ValueError}
# |logits| <= 1/tau; a loss term reaches 2/tau, the symmetric multi-view sum and the
# gradients 4/tau, the kernels' base-2 logits 1.44/tau: TAU_HEADROOM/tau must be finite
# in the accumulation dtype.
TAU_HEADROOM = 8.0


def check_tensor(name: str, x, dims, *, floating: bool = True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}")


def check_nonempty(name: str, x: torch.Tensor):
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): the batch needs at least one row")


def check_same(names, tensors, *, dtype: bool = True):
    first_name, first = names[0], tensors[0]
    for name, x in zip(names[1:], tensors[1:]):
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}")
        if dtype and x.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}")


def check_shape(name: str, x: torch.Tensor, expected):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def smallest_tau(dtype: torch.dtype) -> float:
    """The smallest tau whose logits and gradients stay finite for inputs of dtype
    (computed in reference.compute_dtype(dtype): fp32 for half inputs)."""
    return TAU_HEADROOM / torch.finfo(reference.compute_dtype(dtype)).max


def check_tau(tau, dtype: torch.dtype) -> float:
    """tau as a float: a finite Python number > 0 whose 1/tau scale of the logits does not
    overflow the accumulation dtype of inputs of dtype (a Python float: no sync).

    torch.compile may trace a tau that varies between calls as a symbol: the checks are
    comparisons, which it traces as guards, and the messages show tau without a format spec.
    """
    if isinstance(tau, torch.Tensor) or isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a Python float, got {type(tau).__name__}")
    tau = float(tau)
    if not 0 < tau < math.inf:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    if tau < smallest_tau(dtype):
        raise ValueError(
            f"tau={tau} is too small for {dtype} inputs: the logits (up to 1/tau) and their "
            f"gradients overflow {reference.compute_dtype(dtype)}; tau must be at least "
            f"{smallest_tau(dtype):.3g}")
    return tau


def check_positive_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_labels(name: str, y, n: int, device):
    """Static label checks: integer dtype, shape [n], same device."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must hold integer class indices (int64), got {y.dtype}")
    check_shape(name, y, (n,))
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the embeddings are on {device}")


def wants_value_checks(validate, *tensors) -> bool:
    """The ``validate`` keyword: None checks values of CPU tensors only (on CUDA a check is a
    host sync), True everywhere, False nowhere; the same under torch.compile."""
    if validate is None:
        return all(t.device.type == "cpu" for t in tensors if t is not None)
    return bool(validate)


def check_values(names, tensors, labels=None, group=None):
    """Raise naming the first argument holding NaN/Inf, or (labels = (name, y, num_classes)) a
    label outside [0, num_classes).

    Every verdict is computed on the device and read back at once: one host sync. With a
    process group the verdicts are all-reduced first, so every rank raises together instead
    of one rank raising while the others wait in the op's collectives. While torch.compile
    traces, the check is the graph node mvcl_fast::check_values: it runs, and raises, each
    time the compiled code runs.
    """
    if torch.compiler.is_compiling():
        label_name, y, num_classes = labels if labels is not None else ("", None, 0)
        present = [(name, x) for name, x in zip(names, tensors) if x is not None]
        _check_values_op([x.detach() for _, x in present], ",".join(name for name, _ in present),
                         label_name, y, num_classes,
                         None if group is None else group.group_name)
        return
    _check_values_now(names, tensors, labels, group)


def _check_values_now(names, tensors, labels, group):
    present = [(name, x) for name, x in zip(names, tensors) if x is not None]
    flags = [~torch.isfinite(x).all() for _, x in present]
    if labels is not None:
        _, y, num_classes = labels
        flags.append(((y < 0) | (y >= num_classes)).any() if y.numel() else
                     torch.zeros((), dtype=torch.bool, device=y.device))
    verdict = torch.stack(flags).to(torch.float32)
    where = ""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=group)
        where = " on at least one rank"
    bad = verdict.tolist()
    for (name, _), is_bad in zip(present, bad):
        if is_bad:
            raise ValueError(f"{name} contains NaN or Inf{where}")
    if labels is not None and bad[-1]:
        name, y, num_classes = labels
        outside = y[(y < 0) | (y >= num_classes)]
        detail = f"label {int(outside[0])}" if outside.numel() else "a label"
        raise ValueError(f"{name} has {detail} outside [0, num_classes={num_classes}){where}")


@torch.library.custom_op("mvcl_fast::check_values", mutates_args=())
def _check_values_op(tensors: list[torch.Tensor], names: str, label_name: str,
                     labels: Optional[torch.Tensor], num_classes: int,
                     group_name: Optional[str]) -> None:
    """check_values as a graph node; names are comma-separated, label_name "" without labels."""
    group = None
    if group_name is not None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group_name)
    _check_values_now(names.split(",") if names else [], tensors,
                      (label_name, labels, num_classes) if label_name else None, group)


@_check_values_op.register_fake
def _(tensors, names, label_name, labels, num_classes, group_name):
    return None


@torch.library.custom_op("mvcl_fast::argument_error", mutates_args=())
def _argument_error(kind: str, message: str, shape: list[int], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """Raise ARGUMENT_ERRORS[kind](message): the graph node of an argument error found while
    torch.compile traced a public op; its fake is a tensor of the op's result's shape."""
    raise ARGUMENT_ERRORS[kind](message)


@_argument_error.register_fake
def _(kind, message, shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


# check_values has no output, and argument_error's may go unread (a result the caller
# discards): dead-code elimination must keep both.
torch.fx.node.has_side_effect(torch.ops.mvcl_fast.check_values.default)
torch.fx.node.has_side_effect(torch.ops.mvcl_fast.argument_error.default)


def argument_errors_when_run(placeholder):
    """Decorate a public op so that, under torch.compile, its argument errors reach the user.

    In eager this changes nothing. While Dynamo traces the op, a ValueError or TypeError it
    raises would reach the user as torch._dynamo.exc.Unsupported (fullgraph=True) or leave
    a graph break; instead the op returns placeholder(fail, *args, **kwargs), built from
    ``fail(shape, like, dtype=None)``: graph nodes (mvcl_fast::argument_error) of the
    result's shapes, in dtype or like's floating dtype, on like's device, which raise the
    same exception, with the same message, when the compiled code runs.
    """
    def decorate(op):
        @functools.wraps(op)
        def checked(*args, **kwargs):
            try:
                return op(*args, **kwargs)
            except (TypeError, ValueError) as error:
                if not torch.compiler.is_compiling():
                    raise
                kind = "TypeError" if isinstance(error, TypeError) else "ValueError"
                message = str(error)

                def fail(shape, like, dtype=None):
                    is_tensor = isinstance(like, torch.Tensor)
                    if dtype is None:
                        floating = is_tensor and like.dtype in FLOAT_DTYPES
                        dtype = like.dtype if floating else torch.float32
                    device = like.device if is_tensor else torch.device("cpu")
                    return _argument_error(kind, message, list(shape), dtype, device)

                return placeholder(fail, *args, **kwargs)
        return checked
    return decorate
