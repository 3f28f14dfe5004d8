"""The DAF attention kernels' launches the compile report compiles (mvcl_fast.tools.aot)."""
from __future__ import annotations

import torch

from mvcl_fast.kernels.daf_attention import daf_attention_backward, daf_attention_forward
from mvcl_fast.tools.aot import DTYPE_MODES, matmul_tf32, mode_name


def aot_launches() -> list:
    """(name, zero-argument callable): forward + backward through the public launchers, keys
    padded, at the benchmark's DAF shapes (benchmarks/bench_daf.py: Lq = 80, D = 768, 12 heads,
    Lk = 80, 310, 710, 8192; B = 2, since the batch changes only the grid), the structure
    budget's shape and a long query sequence (many row tiles), in every dtype mode."""
    shapes = {f"bench,Lk={len_k}": (2, 80, len_k, 768, 12) for len_k in (80, 310, 710, 8192)}
    shapes.update(budget=(2, 48, 96, 128, 4), long_q=(2, 300, 96, 768, 12))

    def run(shape, dtype, tf32):
        batch, len_q, len_k, dim, heads = shape

        def launch():
            q, gate, residual, grad = (torch.empty(batch, len_q, dim, dtype=dtype) for _ in range(4))
            k, v = (torch.empty(batch, len_k, dim, dtype=dtype) for _ in range(2))
            mask = torch.arange(len_k)[None, :] >= torch.tensor([len_k, len_k * 3 // 4])[:, None]
            with matmul_tf32(tf32):
                _, attn, lse = daf_attention_forward(q, k, v, gate, residual, mask, heads)
                daf_attention_backward(grad, q, k, v, gate, mask, attn, lse, heads)
        return launch

    return [(f"daf_attention[{name},{mode_name(dtype, tf32)}]", run(shape, dtype, tf32))
            for name, shape in shapes.items() for dtype, tf32 in DTYPE_MODES]
