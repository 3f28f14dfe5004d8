"""Helpers shared by the custom-op files."""
from __future__ import annotations

import torch


def reference_vjp(fn, inputs, grad_output):
    """Gradients of fn(*inputs) against grad_output by recomputing fn under autograd.

    The reference path's backward: recompute the reference forward and let
    autograd differentiate it, so reference gradients are exact by construction.
    grad_output must be a tensor: ``torch.func.vjp``'s pullback would take None
    for ones.
    """
    _, pullback = torch.func.vjp(fn, *inputs)
    return pullback(grad_output)


def no_gradients(ctx) -> tuple:
    """The backward's answer when the differentiated output's gradient is undefined.

    Every op registers ``ctx.set_materialize_grads(False)`` (the gradients of its saved
    statistics are never read, so autograd fills no zeros for them); the gradient of the
    output that is differentiated then arrives as None whenever nothing downstream gave it
    one (a custom Function whose backward returns None, gradcheck's undefined-gradient
    check). An undefined gradient is a zero gradient: every input's gradient is undefined.
    """
    return (None,) * len(ctx.needs_input_grad)
