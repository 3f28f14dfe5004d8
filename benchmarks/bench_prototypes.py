"""Prototype InfoNCE (batch prototypes + loss, fwd+bwd) and the scatter-mean alone.

Providers: fused (mvcl_fast public op, Triton on CUDA), eager (mvcl_fast.reference),
compile (torch.compile of the reference); for the scatter-mean also the plain
torch forms a user would write: index_add_ + bincount and scatter_reduce("mean"),
both in the input dtype. D = 768; bf16 on CUDA, fp32 on CPU. Headline cases:
prototype_infonce at N = 1024 and 65,536 with C = 20 (MIntRec's classes).
"""
import pytest
import torch

import mvcl_fast
from harness import (COMPILE, DRY_RUN, EAGER, FUSED, Case, compiled, element_size, labels, randn,
                     run_case, shape_params, skip_off_gpu)
from mvcl_fast import reference

D = 32 if DRY_RUN else 768
TAU = 0.1
N_VALUES = (32, 1024, 65536)
C_VALUES = (20, 30, 1024)
CPU_SHAPES = {(32, 20), (1024, 20), (1024, 1024)}
FULL_SHAPES = [(n, c) for n in N_VALUES for c in C_VALUES]
HEADLINE = {(1024, 20): "prototype_infonce N=1024", (65536, 20): "prototype_infonce N=65536"}
DRY_SHAPES = {(32, 20): (16, 4), (1024, 20): (64, 4), (65536, 20): (256, 4)}


def shape_id(n, c):
    return f"N={n}-C={c}"


# ------------------------------------------------------------ combined op
def prototype_infonce_floors(n, c):
    e = element_size()
    forward = n * D * e + 8 * n + c * D * e + 8 * c + 4 * n + 4
    backward = n * D * e + 8 * n + c * D * e + 8 * c + 4 * n + n * D * e
    return forward + backward, 6 * n * c * D


PROTOTYPE_INFONCE = {
    FUSED: lambda z, y, c: mvcl_fast.prototype_infonce(z, y, c, TAU),
    EAGER: lambda z, y, c: reference.prototype_infonce(z, y, c, TAU),
    COMPILE: lambda z, y, c: compiled(reference.prototype_infonce)(z, y, c, TAU),
}


@pytest.mark.parametrize("provider", list(PROTOTYPE_INFONCE))
@pytest.mark.parametrize("n, c", shape_params(FULL_SHAPES, shape_id, DRY_SHAPES, HEADLINE))
def test_prototype_infonce(benchmark, n, c, provider):
    skip_off_gpu(provider, small_shape=(n, c) in CPU_SHAPES)
    z, y = randn(n, D), labels(n, c)
    fn = PROTOTYPE_INFONCE[provider]
    bytes_floor, flops_floor = prototype_infonce_floors(n, c)
    run_case(benchmark, Case(
        op="prototype_infonce", shape=f"N={n} C={c} D={D}", provider=provider,
        forward=lambda: fn(z, y, c), step_inputs=[z], params={"N": n, "C": c, "D": D},
        bytes_floor=bytes_floor, flops_floor=flops_floor, x=n, x_label="N", series=f"C={c}"))


# ------------------------------------------------------------ scatter-mean
def index_add_mean(z, y, num_classes):
    counts = torch.bincount(y, minlength=num_classes)
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, y, z)
    return sums / counts.clamp_min(1).unsqueeze(1).to(z.dtype), counts


def scatter_reduce_mean(z, y, num_classes):
    index = y.unsqueeze(1).expand(-1, z.shape[1])
    return z.new_zeros(num_classes, z.shape[1]).scatter_reduce(0, index, z, "mean", include_self=False)


BATCH_PROTOTYPES = {
    FUSED: lambda z, y, c: mvcl_fast.batch_prototypes(z, y, c)[0],
    EAGER: lambda z, y, c: reference.batch_prototypes(z, y, c)[0],
    COMPILE: lambda z, y, c: compiled(reference.batch_prototypes)(z, y, c)[0],
    "torch.index_add_": lambda z, y, c: index_add_mean(z, y, c)[0],
    "torch.scatter_reduce": scatter_reduce_mean,
}


@pytest.mark.parametrize("provider", list(BATCH_PROTOTYPES))
@pytest.mark.parametrize("n, c", shape_params(FULL_SHAPES, shape_id, {(32, 20): (16, 4)}))
def test_batch_prototypes(benchmark, n, c, provider):
    skip_off_gpu(provider, small_shape=(n, c) in CPU_SHAPES)
    z, y = randn(n, D), labels(n, c)
    grad_prototypes = randn(c, D, requires_grad=False, seed=2)
    fn = BATCH_PROTOTYPES[provider]
    e = element_size()
    bytes_floor = (n * D * e + 8 * n + c * D * e + 8 * c) + (c * D * e + 8 * n + 8 * c + n * D * e)
    run_case(benchmark, Case(
        op="batch_prototypes", shape=f"N={n} C={c} D={D}", provider=provider,
        forward=lambda: fn(z, y, c), step_inputs=[z], grad_out=grad_prototypes,
        peer=provider.startswith("torch."), params={"N": n, "C": c, "D": D},
        bytes_floor=bytes_floor, flops_floor=0,
        x=n, x_label="N", series=f"C={c}"))
