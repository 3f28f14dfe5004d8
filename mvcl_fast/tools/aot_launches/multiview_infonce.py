"""The multi-view InfoNCE kernels' launches the compile report compiles (mvcl_fast.tools.aot)."""
from __future__ import annotations

import torch

from mvcl_fast.kernels.multiview_infonce import multiview_infonce_backward, multiview_infonce_forward
from mvcl_fast.tools.aot import DTYPE_MODES, matmul_tf32, mode_name


def aot_launches():
    """Forward + backward at the benchmark shapes (N = 32, 4096, 65536; V = 4; D = 768), the
    structure test's (N = 256, D = 128), the widest one-chunk D (N = 4096, D = 1024) and the
    staged backward in one chunk and in many (D = 2048, N = 4096 and 65536) in every dtype
    mode, one- and two-directional, and the row share of DDP rank 1 of 2 at N = 4096."""
    def step(n, dim, dtype, tf32, symmetric, ranks=1):
        def launch():
            anchor = torch.empty(n, dim, dtype=dtype)
            views = torch.empty(4, n, dim, dtype=dtype)
            row_start = n - n // ranks
            with matmul_tf32(tf32):
                loss, *stats = multiview_infonce_forward(anchor, views, 0.1, symmetric, row_start,
                                                         n // ranks)
                # The gradient of the loss comes in the loss's dtype (the input's).
                multiview_infonce_backward(torch.ones_like(loss), anchor, views, 0.1, symmetric,
                                           *stats, row_start=row_start)
        return launch

    launches = []
    for dtype, tf32 in DTYPE_MODES:
        for symmetric in (False, True):
            tag = f"{mode_name(dtype, tf32)}{',symmetric' if symmetric else ''}"
            launches += [(f"multiview[N={n},D={dim},{tag}]", step(n, dim, dtype, tf32, symmetric))
                         for n, dim in ((32, 768), (4096, 768), (65536, 768), (256, 128),
                                        (4096, 1024), (4096, 2048), (65536, 2048))]
            launches.append((f"multiview[N=4096,D=768,rank 1 of 2,{tag}]",
                             step(4096, 768, dtype, tf32, symmetric, ranks=2)))
    return launches
