"""Multi-view InfoNCE, fwd+bwd: anchor [N, D] against V = 4 views, D = 768.

Providers: fused (mvcl_fast.multiview_infonce: online log-sum-exp, no N x N
logits), eager and compile (the reference, which materialises V x N x N fp32
logits: skipped past the memory limit), and inf-cl (the public peer:
inf_cl.cal_inf_loss per view on L2-normalised inputs, anchor scaled by 1/tau;
it computes in fp32 internally). Headline case: N = 4096 against inf-cl.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import mvcl_fast
from harness import (COMPILE, CUDA, DRY_RUN, EAGER, FUSED, GIB, Case, compiled, element_size,
                     memory_limit_bytes, randn, run_case, shape_params, skip_case, skip_off_gpu)
from mvcl_fast import reference

D = 32 if DRY_RUN else 768
V = 2 if DRY_RUN else 4
TAU = 0.1
N_VALUES = (32, 4096, 65536)
CPU_N_VALUES = (32,)
HEADLINE = {4096: "multiview_infonce N=4096"}
DRY_N = {32: 16, 4096: 64}
INF_CL = "inf-cl"
# Copies of the V x N x N fp32 logits alive at once (logits, exp, softmax gradient, ...).
LOGIT_COPIES = {EAGER: 5, COMPILE: 3}


def inf_cl_multiview(anchor, views, tau):
    from inf_cl import cal_inf_loss

    queries = F.normalize(anchor, dim=-1) / tau
    losses = [cal_inf_loss(queries, F.normalize(views[v], dim=-1)) for v in range(views.shape[0])]
    return torch.stack(losses).mean()


PROVIDERS = {
    FUSED: lambda a, k: mvcl_fast.multiview_infonce(a, k, TAU),
    EAGER: lambda a, k: reference.multiview_infonce(a, k, TAU),
    COMPILE: lambda a, k: compiled(reference.multiview_infonce)(a, k, TAU),
    INF_CL: lambda a, k: inf_cl_multiview(a, k, TAU),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("n", shape_params(N_VALUES, lambda n: f"N={n}", DRY_N, HEADLINE))
def test_multiview_infonce(benchmark, n, provider):
    shape = f"N={n} V={V} D={D}"
    if not CUDA and provider == INF_CL:
        pytest.skip("CUDA only: inf-cl's kernels are Triton kernels for the GPU")
    skip_off_gpu(provider, small_shape=n in CPU_N_VALUES)
    if provider in LOGIT_COPIES:
        need = LOGIT_COPIES[provider] * V * n * n * 4
        if need > memory_limit_bytes():
            skip_case("multiview_infonce", shape, provider,
                      f"the reference materialises {V}x{n}x{n} fp32 logits: ~{need / GIB:.0f} GiB > "
                      f"the {memory_limit_bytes() / GIB:.0f} GiB limit (MVCL_BENCH_MEM_LIMIT_GIB)")
    if provider == INF_CL and importlib.util.find_spec("inf_cl") is None:
        skip_case("multiview_infonce", shape, provider,
                  "inf-cl is not installed (pip install inf-cl; on the GPU machine from .wheels/, "
                  "see benchmarks/gpu_check.sh)")
    anchor, views = randn(n, D, seed=0), randn(V, n, D, seed=1)
    fn = PROVIDERS[provider]
    e = element_size()
    rows = (V + 1) * n * D * e
    bytes_floor = (rows + 4 * V * n + 4) + (rows + 4 * V * n + rows)
    run_case(benchmark, Case(
        op="multiview_infonce", shape=shape, provider=provider,
        forward=lambda: fn(anchor, views), step_inputs=[anchor, views], peer=provider == INF_CL,
        params={"N": n, "V": V, "D": D}, bytes_floor=bytes_floor, flops_floor=6 * V * n * n * D,
        x=n, x_label="N", series=f"V={V}"))
