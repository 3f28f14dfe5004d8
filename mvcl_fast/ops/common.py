"""Helpers shared by the custom-op files."""
from __future__ import annotations

import torch


def reference_vjp(fn, inputs, grad_output):
    """Gradients of fn(*inputs) against grad_output by recomputing fn under autograd.

    The reference path's backward: recompute the reference forward and let
    autograd differentiate it, so reference gradients are exact by construction.
    """
    _, pullback = torch.func.vjp(fn, *inputs)
    return pullback(grad_output)
