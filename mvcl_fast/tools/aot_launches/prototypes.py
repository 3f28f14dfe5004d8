"""The prototype kernels' launches the compile report compiles (mvcl_fast.tools.aot)."""
from __future__ import annotations

import torch

from mvcl_fast.kernels.prototypes import (batch_prototypes_backward, batch_prototypes_forward,
                                          prototype_infonce_backward, prototype_infonce_forward)
from mvcl_fast.kernels.shared import DTYPE_NAME
from mvcl_fast.tools.aot import mode_name


def aot_launches():
    """Forward + backward of the prototype InfoNCE (batch prototypes, V = 1 and 3; explicit
    prototypes) and of the scatter-mean, at the benchmark shapes (N = 32, 1024, 65536 x
    C = 20, 30, 1024; D = 768), the structure test's (N = 256, D = 128, C = 20) and one past
    the staging limit, each dtype."""
    def step(views, n, dim, num_classes, dtype, explicit):
        def launch():
            z = torch.empty(views, n, dim, dtype=dtype)
            y = torch.randint(num_classes, (n,))
            prototypes = torch.empty(num_classes, dim, dtype=dtype) if explicit else None
            _, lse, s, counts, ds, stats = prototype_infonce_forward(
                z, y, prototypes, None, num_classes, 0.1, True)
            prototype_infonce_backward(torch.ones((), dtype=dtype), z, y,
                                       s if prototypes is None else prototypes, counts, lse, ds,
                                       stats, 0.1, not explicit, not explicit, explicit)
            if views == 1 and not explicit:
                means, counts = batch_prototypes_forward(z[0], y, num_classes)
                batch_prototypes_backward(means, y, counts)
        return launch

    # C = 2048 at 3 x 65536 rows: too many logits to stage, the row programs recompute them.
    shapes = [(v, n, 768, c, e) for n in (32, 1024, 65536) for c in (20, 30, 1024)
              for v, e in ((1, False), (3, False), (1, True))] + [
        (1, 256, 128, 20, False), (3, 65536, 768, 2048, False)]
    return [(f"prototypes[V={v},N={n},D={d},C={c},{'explicit' if e else 'batch'},"
             f"{mode_name(dtype, False)}]", step(v, n, d, c, dtype, e))
            for dtype in DTYPE_NAME for v, n, d, c, e in shapes]
