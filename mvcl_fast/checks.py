"""Input validation shared by the public ops: clear errors that name the argument.

Shape, dtype and device checks are static (free, and traceable by
torch.compile). Value checks need to read the data: label ranges are checked
inside the custom ops' implementations (which run eagerly even under
torch.compile, so a bad label can never reach a kernel); NaN/Inf checks cost a
device sync on CUDA, so they run by default only on CPU tensors, or wherever
``check_finite=True`` asks for them.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def check_tau(tau):
    if isinstance(tau, torch.Tensor) or isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a Python float, got {type(tau).__name__}")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return float(tau)


def check_positive_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_labels(name: str, y, n: int, num_classes: int, device):
    """Static label checks: integer dtype, shape [n], same device."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must hold integer class indices (int64), got {y.dtype}")
    check_shape(name, y, (n,))
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the embeddings are on {device}")


def check_label_range(name: str, y: torch.Tensor, num_classes: int):
    """Value check: every label in [0, num_classes). Called inside op implementations."""
    if y.numel() == 0:
        return
    low, high = torch.aminmax(y)
    low, high = int(low), int(high)
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name} has label {bad} outside [0, num_classes={num_classes})")


def wants_finite_check(check_finite, *tensors) -> bool:
    if torch.compiler.is_compiling():
        return False
    if check_finite is None:
        return all(t.device.type == "cpu" for t in tensors if t is not None)
    return bool(check_finite)


def check_finite_values(names, tensors, group=None):
    """Raise naming the first argument holding NaN/Inf.

    With a process group the verdict is all-reduced first: every rank raises
    together, instead of one rank raising while the others wait in the op's
    collectives.
    """
    bad = [x is not None and not bool(torch.isfinite(x).all()) for x in tensors]
    where = ""
    if group is not None:
        import torch.distributed as dist

        flags = torch.tensor(bad, dtype=torch.float32, device=tensors[0].device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        bad = [bool(f) for f in flags.tolist()]
        where = " on at least one rank"
    for name, is_bad in zip(names, bad):
        if is_bad:
            raise ValueError(f"{name} contains NaN or Inf{where}")
