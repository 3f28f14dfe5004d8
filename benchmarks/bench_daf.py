"""DAF attention, fwd+bwd: residual + sigmoid(gate) * MHA(q, k, v) with padded keys.

B = 32, Lq = 80, D = 768, 12 heads (head_dim 64), Lk in {80, 310, 710} (the
MIntRec-sized coarse context + modality tokens) and a long context Lk = 8192.
Each batch row keeps a random number of valid keys in [Lk/2, Lk] (MIntRec
features are zero-padded). Providers: fused (mvcl_fast.daf_attention), eager
and compile (the reference), and sdpa+epilogue (the public peer:
F.scaled_dot_product_attention restricted on CUDA to the flash and
memory-efficient backends, then a separate sigmoid gate and residual add).
Headline case: Lk = 710, the MIntRec-sized keys (the trainer's keys are the
text context and both modalities' tokens: 50 + 230 + 480 at the train-step shape).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mvcl_fast
from harness import (COMPILE, CUDA, DEVICE, DRY_RUN, EAGER, FUSED, GIB, Case, compiled,
                     element_size, memory_limit_bytes, randn, run_case, shape_params, skip_case,
                     skip_off_gpu)
from mvcl_fast import reference

B, LQ, D, HEADS = (2, 8, 32, 2) if DRY_RUN else (32, 80, 768, 12)
LK_VALUES = (80, 310, 710, 8192)
CPU_LK_VALUES = (80,)
HEADLINE = {710: "daf_attention MIntRec"}
DRY_LK = {80: 8, 710: 24}
SDPA = "sdpa+epilogue"
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
# Copies of the B x H x Lq x Lk fp32 scores the reference keeps alive at once.
SCORE_COPIES = {EAGER: 5, COMPILE: 3}


def sdpa_with_epilogue(q, k, v, gate, residual, num_heads, key_padding_mask):
    batch, len_q, dim = q.shape
    head_dim = dim // num_heads

    def heads(x):
        return x.view(batch, x.shape[1], num_heads, head_dim).transpose(1, 2)

    keep = ~key_padding_mask[:, None, None, :]  # SDPA's bool mask: True = attend
    if CUDA:
        with sdpa_kernel(SDPA_BACKENDS):
            attn = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=keep)
    else:
        attn = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=keep)
    attn = attn.transpose(1, 2).reshape(batch, len_q, dim)
    return residual + torch.sigmoid(gate) * attn


PROVIDERS = {
    FUSED: mvcl_fast.daf_attention,
    EAGER: reference.daf_attention,
    COMPILE: lambda *args: compiled(reference.daf_attention)(*args),
    SDPA: sdpa_with_epilogue,
}


def padding_mask(len_k, seed=3):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    valid = torch.randint((len_k + 1) // 2, len_k + 1, (B, 1), generator=g, device=DEVICE)
    return torch.arange(len_k, device=DEVICE)[None, :] >= valid


def daf_floors(len_k):
    e = element_size()
    q_side, k_side, lse = B * LQ * D * e, B * len_k * D * e, 4 * B * HEADS * LQ
    forward = 3 * q_side + 2 * k_side + B * len_k + 2 * q_side + lse
    backward = 4 * q_side + 2 * k_side + B * len_k + lse + 2 * q_side + 2 * k_side
    return forward + backward, 12 * B * LQ * len_k * D


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("len_k", shape_params(LK_VALUES, lambda n: f"Lk={n}", DRY_LK, HEADLINE))
def test_daf_attention(benchmark, len_k, provider):
    shape = f"B={B} Lq={LQ} Lk={len_k} D={D} H={HEADS}"
    skip_off_gpu(provider, small_shape=len_k in CPU_LK_VALUES)
    if provider in SCORE_COPIES:
        need = SCORE_COPIES[provider] * B * HEADS * LQ * len_k * 4
        if need > memory_limit_bytes():
            skip_case("daf_attention", shape, provider,
                      f"the reference keeps {B}x{HEADS}x{LQ}x{len_k} fp32 scores: ~{need / GIB:.0f} GiB > "
                      f"the {memory_limit_bytes() / GIB:.0f} GiB limit (MVCL_BENCH_MEM_LIMIT_GIB)")
    q, gate, residual = (randn(B, LQ, D, seed=s) for s in (0, 1, 2))
    k, v = (randn(B, len_k, D, seed=s) for s in (4, 5))
    mask = padding_mask(len_k)
    grad_out = randn(B, LQ, D, requires_grad=False, seed=6)
    fn = PROVIDERS[provider]
    bytes_floor, flops_floor = daf_floors(len_k)
    run_case(benchmark, Case(
        op="daf_attention", shape=shape, provider=provider,
        forward=lambda: fn(q, k, v, gate, residual, HEADS, mask),
        step_inputs=[q, k, v, gate, residual], grad_out=grad_out, peer=provider == SDPA,
        params={"B": B, "Lq": LQ, "Lk": len_k, "D": D, "H": HEADS},
        bytes_floor=bytes_floor, flops_floor=flops_floor, x=len_k, x_label="Lk", series=f"B={B}"))
