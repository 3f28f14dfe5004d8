"""Shared test helpers: fp64-truth error comparison, output poisoning, spawned DDP ranks."""
from __future__ import annotations

import contextlib
import os

import torch

# Allowed excess relative error over the reference's own error in the same dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """||got - truth|| / ||truth|| in float64 (absolute error where truth is 0)."""
    got, truth = got.detach().double(), truth.detach().double()
    denom = truth.norm().item()
    diff = (got - truth).norm().item()
    return diff / denom if denom > 0 else diff


def assert_no_worse_than_reference(name: str, got, reference_same_dtype, truth, dtype):
    """The kernel's error vs the fp64 truth is no worse than the reference's own in dtype + tol."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_err(got, truth)
    ref_err = rel_err(reference_same_dtype, truth)
    assert err <= ref_err + TOLERANCE[dtype], (
        f"{name}: relative error {err:.3e} > reference's {ref_err:.3e} + {TOLERANCE[dtype]:.0e} ({dtype})")


@contextlib.contextmanager
def poisoned_allocations():
    """Make torch.empty / empty_like / new_empty return NaN-filled (or -1 int) tensors.

    Kernel launchers allocate their outputs with these; an element a kernel
    forgets to write then shows up as NaN (or -1) instead of passing by luck.
    """
    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty


def exit_spawned_rank() -> None:
    """End a spawned DDP rank whose work is done and saved, skipping the interpreter's teardown.

    With torch 2.13, gloo's threads intermittently abort there ("terminate called
    without an active exception"), which mp.spawn reports as a failed rank.
    """
    os._exit(0)
