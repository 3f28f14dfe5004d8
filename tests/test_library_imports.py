"""The op library (``import mvcl_fast``: the ops and the drop-in losses) needs torch alone: it
imports and runs in a process where transformers, scikit-learn and matplotlib cannot be
imported, and it imports nothing from the application (mvcl_fast.intent)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import importlib.util
    import sys

    # As if not installed: importing them raises ModuleNotFoundError, and find_spec (which
    # torch.compile's setup asks about optional packages) returns None.
    BLOCKED = ("transformers", "sklearn", "matplotlib")
    for name in BLOCKED:
        sys.modules[name] = None
    for name in BLOCKED:
        assert importlib.util.find_spec(name) is None
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError(f"{name} imported")

    import torch
    import mvcl_fast

    torch.manual_seed(0)
    z = torch.randn(6, 8, requires_grad=True)
    views = torch.randn(2, 6, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 1])
    prototypes, counts = mvcl_fast.batch_prototypes(z, y, 3)
    q, k = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 7, 8)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    losses = [
        prototypes.sum(),
        mvcl_fast.prototype_infonce(z, y, 3),
        mvcl_fast.prototype_infonce(views, y, 3, prototypes=prototypes.detach()),
        mvcl_fast.multiview_infonce(z, views, symmetric=True),
        mvcl_fast.daf_attention(q, k, k, q, q, 2, key_padding_mask=mask).sum(),
        mvcl_fast.PrototypeInfoNCELoss(3)(z, y),
        mvcl_fast.MultiViewInfoNCELoss(symmetric=True)(z, views),
    ]
    total = sum(losses)
    total.backward()
    assert torch.isfinite(total) and counts.tolist() == [2, 3, 1]
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (z, views, q))
    imported = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m])
    assert not imported, imported
    application = sorted(m for m in sys.modules if m.startswith("mvcl_fast.intent"))
    assert not application, application
    print("ops and losses ran")
""")


def test_the_op_library_needs_neither_transformers_nor_sklearn_nor_matplotlib():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ops and losses ran" in proc.stdout
