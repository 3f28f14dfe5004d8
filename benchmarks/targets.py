"""The issues' targets, judged from the medians of one run.

No torch here: harness.py judges a pytest session's cases with it, and render.py the
results that gpu_check.sh streams to a JSON-lines file (which has no session end).
"""
from __future__ import annotations

from typing import Optional

FUSED, EAGER, COMPILE = "fused", "eager", "compile"
PEERS = ("inf-cl", "sdpa+epilogue", "torch.index_add_", "torch.scatter_reduce")


def ratio(baseline: Optional[dict], fused: Optional[dict]):
    """baseline median / fused median, or None where either was not measured."""
    if not baseline or not fused or "median_ms" not in baseline or "median_ms" not in fused:
        return None
    return baseline["median_ms"] / fused["median_ms"]


def _target(name: str, passed, detail: str) -> dict:
    return {"target": name, "pass": passed, "detail": detail}


def targets_for(op: str, providers: dict) -> list[dict]:
    """The targets of one (op, shape), judged on the fused provider.

    providers: provider -> its case's extra_info (median_ms, params, floor_ms, peak_mib).
    """
    fused = providers.get(FUSED)
    if not fused or "median_ms" not in fused:
        return []
    params = fused.get("params", {})
    out = []
    if op == "prototype_infonce":
        n = params.get("N", 0)
        if n <= 1024:
            for base, want in ((EAGER, 5.0), (COMPILE, 1.5)):
                r = ratio(providers.get(base), fused)
                out.append(_target(f">= {want}x {base}", None if r is None else r >= want,
                                   "baseline not measured" if r is None else f"{r:.2f}x"))
        if n >= 65536:
            floor = fused.get("floor_ms")
            frac = None if floor is None else fused["median_ms"] / floor
            out.append(_target("within 2x of the floor", None if frac is None else frac <= 2.0,
                               "no floor for this card" if frac is None else f"{frac:.2f}x the floor"))
    elif op == "multiview_infonce":
        r = ratio(providers.get("inf-cl"), fused)
        out.append(_target("faster than inf-cl", None if r is None else r > 1.0,
                           "inf-cl not measured" if r is None else f"{r:.2f}x"))
        if params.get("N", 0) >= 65536:
            peak = fused.get("peak_mib")
            out.append(_target("< 1 GiB extra peak", None if peak is None else peak < 1024,
                               "no CUDA memory stats" if peak is None else f"{peak:.0f} MiB"))
    elif op == "train_step" and params.get("B") == 16:
        r = ratio(providers.get(EAGER), fused)
        out.append(_target(">= 4x the bf16 eager step", None if r is None else r >= 4.0,
                           "eager not measured" if r is None else f"{r:.2f}x"))
        floor = fused.get("floor_ms")
        frac = None if floor is None else fused["median_ms"] / floor
        out.append(_target("within 2x of the floor", None if frac is None else frac <= 2.0,
                           "no floor for this card" if frac is None else f"{frac:.2f}x the floor"))
    elif op == "daf_attention":
        r = ratio(providers.get("sdpa+epilogue"), fused)
        out.append(_target("faster than SDPA + epilogue", None if r is None else r > 1.0,
                           "SDPA not measured" if r is None else f"{r:.2f}x"))
    return out
