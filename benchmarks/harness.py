"""Shared benchmark harness: one timed forward+backward per (op, shape, provider).

How a case is measured (``run_case``):

- The step is the forward and the backward of the op (``loss.backward()``,
  or ``out.backward(grad_out)`` with a fixed random grad_out); input
  gradients are cleared in pytest-benchmark's setup, outside the timed region.
- On CUDA the timed region ends with ``torch.cuda.synchronize()`` and the setup
  synchronises before it, so each round is the step's wall time, launches and
  GPU work included; the median of the rounds is reported.
- Two warm-up calls run first, outside timing (torch.compile compiles and
  Triton autotunes there); the number of rounds is then sized to
  ~MVCL_BENCH_SECONDS of timing (default 0.4 s on CUDA, 0.25 s on CPU), at
  least 5 (3 on CPU), at most 200. In gpu_check.sh's dry run (MVCL_BENCH_DRY_RUN=1)
  one warm-up call and one round; under --warm-only one untimed call and nothing else.
- torch.compile baselines: ``torch.compile(reference_fn, dynamic=True)``, one
  per function (see COMPILE_DYNAMIC).
- Peak memory: one untimed step after ``reset_peak_memory_stats``;
  ``max_memory_allocated`` minus what was allocated before it (the inputs and
  grad_out), so it counts the op's intermediates and the input gradients.
- Floors on the card (H100 / H200 detected from the device name): the fewest
  bytes a forward + backward pair must move (the forward reads its inputs once
  and writes its outputs and the O(N) statistics it keeps; the backward reads
  those and the incoming gradient once and writes the input gradients) over
  the HBM bandwidth, and the matrix FLOPs (forward and backward, without
  recomputation) over the dense bf16 tensor-core rate. The larger is the floor;
  ``floor_fraction`` = floor / median.
- Ratios ("x vs eager", "x vs compile", "x vs peer") and the issues' targets
  are computed at session end (``finalize``) from the medians collected in the
  same run, and written into each case's extra_info in the JSON.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

from targets import COMPILE, EAGER, FUSED, PEERS, ratio, targets_for

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _dry_run() -> bool:
    value = os.environ.get("MVCL_BENCH_DRY_RUN", "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"MVCL_BENCH_DRY_RUN={value!r}: expected 0 or 1")
    return value == "1"


# gpu_check.sh's CPU dry run (GPU_CHECK_ALLOW_CPU=1): each suite runs its headline shapes and
# one other at tiny sizes, the fused kernels through Triton's interpreter, one round each.
DRY_RUN = _dry_run()
# --warm-only (benchmarks/conftest.py): one untimed step per case, to fill the Triton and
# inductor caches on disk before the timed runs (gpu_check.sh runs it under xdist).
WARM_ONLY = False


def set_cpu_threads():
    """On CPU, one thread unless MVCL_BENCH_THREADS says otherwise: on a 2-core machine shared
    with other work, OpenMP threads waiting on each other turned a 3 ms step into 300 ms."""
    threads = int(os.environ.get("MVCL_BENCH_THREADS", "0" if CUDA else "1"))
    if threads > 0:
        torch.set_num_threads(threads)
DTYPE = torch.bfloat16 if CUDA else torch.float32
GIB = 1024 ** 3
MIB = 1024 ** 2

CUDA_ONLY_FUSED = ("CUDA only: the fused Triton kernels run on a GPU (on CPU only through Triton's "
                   "interpreter, which is a correctness tool, not a speed path)")
CUDA_ONLY_SHAPE = "CUDA only: this shape takes too long on CPU (the CPU run times small shapes)"
DRY_RUN_NO_COMPILE = ("dry run: torch.compile is left to the GPU (an inductor C++ build takes "
                      "minutes on a CPU runner)")


def skip_off_gpu(provider: str, small_shape: bool = True, fused: Optional[bool] = None,
                 compiles: Optional[bool] = None):
    """Skip a case this CPU machine does not run: the fused kernels and large shapes; in the
    dry run (tiny shapes, fused kernels through the interpreter) whatever torch.compile builds.
    fused / compiles: whether the provider runs the Triton kernels / torch.compile
    (default: it is FUSED / COMPILE)."""
    if CUDA:
        return
    if DRY_RUN:
        if provider == COMPILE if compiles is None else compiles:
            pytest.skip(DRY_RUN_NO_COMPILE)
        return
    if provider == FUSED if fused is None else fused:
        pytest.skip(CUDA_ONLY_FUSED)
    if not small_shape:
        pytest.skip(CUDA_ONLY_SHAPE)


def shape_params(shapes, make_id: Callable, dry: dict, headline: Optional[dict] = None) -> list:
    """pytest params for a suite's shapes (tuples, or single values).

    headline: {shape: name} of the issue's headline cases, marked `headline` (gpu_check.sh
    times them first); dry: {shape: tiny shape}: in the dry run only these shapes run, at
    their tiny sizes (a headline keeps its name).
    """
    headline = headline or {}
    params = []
    for shape in shapes:
        if DRY_RUN and shape not in dry:
            continue
        values = dry[shape] if DRY_RUN else shape
        values = values if isinstance(values, tuple) else (values,)
        marks = [pytest.mark.headline(headline[shape])] if shape in headline else []
        params.append(pytest.param(*values, id=make_id(*values), marks=marks))
    return params


# ------------------------------------------------------------------ the card
@dataclass(frozen=True)
class Card:
    name: str
    bandwidth: float    # bytes/s: achievable HBM copy bandwidth where measured, else datasheet
    bf16_flops: float   # FLOP/s, dense bf16 tensor cores: measured where known, else datasheet


# Matched against torch.cuda.get_device_name(). The H200's are the figures measured on this
# workplace's lent H200s (a device-to-device copy moved ~4.3 TB/s counting reads and writes;
# an 8192^3 bf16 GEMM ran at ~788 TFLOP/s), against which docs/design.md judges "within 2x of the
# floor"; the others are datasheet leads, not measurements.
CARDS = (
    ("H200", Card("H200", 4.3e12, 788e12)),
    ("H100 PCIe", Card("H100 PCIe", 2.0e12, 756e12)),
    ("H100 NVL", Card("H100 NVL", 3.9e12, 835e12)),
    ("H100", Card("H100 SXM", 3.35e12, 989e12)),
    ("A100", Card("A100", 2.0e12, 312e12)),
)


def card() -> Optional[Card]:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    for key, known in CARDS:
        if key in name:
            return known
    return None


def device_name() -> str:
    """The card with its SM count and compute capability (what sizes the kernels' grids and picks
    their config rows), or the CPU."""
    if CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{props.name} ({props.multi_processor_count} SMs, sm_{props.major}{props.minor})"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return "cpu"


def memory_limit_bytes() -> float:
    """Largest estimated footprint a baseline may have before it is skipped."""
    env = os.environ.get("MVCL_BENCH_MEM_LIMIT_GIB")
    if env:
        return float(env) * GIB
    if CUDA:
        return 0.5 * torch.cuda.get_device_properties(0).total_memory
    return 4 * GIB


def element_size(dtype=DTYPE) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ a case
@dataclass
class Case:
    """One (op, shape, provider) measurement.

    step_inputs: tensors whose .grad is cleared before each round.
    forward: () -> loss scalar or output tensor; grad_out is used for the latter.
    whole_step: instead of forward, backward and update, one call that does all (the training
    step, which may be a replayed CUDA graph).
    bytes_floor / flops_floor: both 0 where no floor is computed.
    x / x_label / series: where the case sits on the render plot (e.g. N, "N", "C=20").
    """
    op: str
    shape: str
    provider: str
    forward: Optional[Callable[[], torch.Tensor]]
    step_inputs: list
    params: dict
    bytes_floor: float
    flops_floor: float
    x: float
    x_label: str
    series: str = ""
    grad_out: Optional[torch.Tensor] = None
    update: Optional[Callable[[], None]] = None   # after the backward, e.g. optimizer.step
    peer: bool = False   # a public peer: if it cannot run here, the case is skipped with the reason
    extra: dict = field(default_factory=dict)
    whole_step: Optional[Callable[[], None]] = None


def sync():
    if CUDA:
        torch.cuda.synchronize()


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def _step(case: Case):
    if case.whole_step is not None:
        case.whole_step()
        sync()
        return
    out = case.forward()
    if case.grad_out is None:
        out.backward()
    else:
        out.backward(case.grad_out)
    if case.update is not None:
        case.update()
    sync()


def floors(bytes_floor: float, flops_floor: float) -> dict:
    if not bytes_floor and not flops_floor:
        return {}
    info = {"bytes_floor": int(bytes_floor), "flops_floor": int(flops_floor)}
    target = card()
    if target is None:
        return info
    bytes_ms = bytes_floor / target.bandwidth * 1e3
    flops_ms = flops_floor / target.bf16_flops * 1e3
    info.update(card=target.name, bandwidth_floor_ms=bytes_ms, flops_floor_ms=flops_ms,
                floor_ms=max(bytes_ms, flops_ms),
                floor_kind="bandwidth" if bytes_ms >= flops_ms else "compute")
    return info


# Every measured case, for the session-end ratios: (op, shape) -> provider -> extra_info.
RESULTS: dict[tuple[str, str], dict[str, dict]] = {}
# Cases skipped with a reason worth keeping in the results (memory limits, missing peers).
SKIPPED: list[dict] = []


def skip_case(op: str, shape: str, provider: str, reason: str):
    SKIPPED.append({"op": op, "shape": shape, "provider": provider, "reason": reason})
    pytest.skip(reason)


def _rounds(case: Case) -> int:
    """Enough rounds for ~MVCL_BENCH_SECONDS of timing, from one timed step."""
    _clear_grads(case.step_inputs)
    sync()
    start = time.perf_counter()
    _step(case)
    once = time.perf_counter() - start
    seconds = float(os.environ.get("MVCL_BENCH_SECONDS", "0.4" if CUDA else "0.25"))
    min_rounds = 5 if CUDA else 3
    return int(min(200, max(min_rounds, math.ceil(seconds / max(once, 1e-6)))))


def run_case(benchmark, case: Case, warmup: int = 2):
    """Warm up, measure peak memory, time the step; fill benchmark.extra_info."""
    benchmark.group = f"{case.op} {case.shape}"
    for i in range(1 if WARM_ONLY or DRY_RUN else warmup):
        _clear_grads(case.step_inputs)
        try:
            _step(case)
        except Exception as exc:
            if not case.peer or i:
                raise
            message = " ".join(str(exc).split())[:300]
            skip_case(case.op, case.shape, case.provider,
                      f"{case.provider} cannot run here: {type(exc).__name__}: {message}")

    if WARM_ONLY:
        return

    peak_mib = None
    _clear_grads(case.step_inputs)
    if CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(case)
        peak_mib = (torch.cuda.max_memory_allocated() - before) / MIB

    rounds = 1 if DRY_RUN else _rounds(case)

    def setup():
        _clear_grads(case.step_inputs)
        sync()

    info = benchmark.extra_info
    info.update(op=case.op, shape=case.shape, provider=case.provider, device=device_name(),
                cpu_threads=torch.get_num_threads(), compile_dynamic=COMPILE_DYNAMIC,
                dtype=str(case.step_inputs[0].dtype).replace("torch.", ""), params=case.params,
                x=case.x, x_label=case.x_label, series=case.series, rounds=rounds,
                peak_mib=peak_mib, **floors(case.bytes_floor, case.flops_floor), **case.extra)
    benchmark.pedantic(lambda: _step(case), setup=setup, rounds=rounds, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        median = stats.stats.median
        info["median_ms"] = median * 1e3
        if "floor_ms" in info:
            info["floor_fraction"] = info["floor_ms"] / info["median_ms"]
    RESULTS.setdefault((case.op, case.shape), {})[case.provider] = info


# ------------------------------------------------------------------ baselines
_COMPILED: dict = {}
# dynamic=True: one compile per function serves every shape, and every shape runs the same kind
# of kernels (by default the first shape would get static kernels, the rest dynamic ones after a
# recompile). MVCL_BENCH_COMPILE_DYNAMIC=0 compiles each shape statically: fairer to the
# baseline, several times the compile time.
COMPILE_DYNAMIC = os.environ.get("MVCL_BENCH_COMPILE_DYNAMIC", "1") != "0"


def compiled(fn):
    """torch.compile(fn), one wrapper per function (its cache is shared by the shapes)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=COMPILE_DYNAMIC)
    return _COMPILED[fn]


def randn(*shape, requires_grad=True, dtype=None, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(*shape, generator=g, device=DEVICE, dtype=dtype or DTYPE)
    return x.requires_grad_(requires_grad)


def labels(n: int, num_classes: int, seed=1):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randint(0, num_classes, (n,), generator=g, device=DEVICE)


# ------------------------------------------------------------------ session end
def finalize() -> list[dict]:
    """Fill ratios and targets into every collected extra_info; return the target rows."""
    rows = []
    for (op, shape), providers in RESULTS.items():
        fused = providers.get(FUSED)
        for provider, info in providers.items():
            info["x_vs_eager"] = ratio(providers.get(EAGER), info)
            info["x_vs_compile"] = ratio(providers.get(COMPILE), info)
            if provider == FUSED:
                peers = {p: ratio(providers.get(p), info) for p in PEERS if p in providers}
                if peers:
                    info["x_vs_peer"] = peers
        if fused is not None:
            fused["targets"] = targets_for(op, providers)
            rows += [dict(op=op, shape=shape, **t) for t in fused["targets"]]
    return rows


def summary_lines() -> list[str]:
    rows = finalize()
    lines = []
    for (op, shape), providers in RESULTS.items():
        for provider, info in providers.items():
            if "median_ms" not in info:
                continue
            ve, vc = info.get("x_vs_eager"), info.get("x_vs_compile")
            frac = info.get("floor_fraction")
            peak = info.get("peak_mib")
            lines.append(f"{op:18s} {shape:28s} {provider:20s} {info['median_ms']:10.3f} ms"
                         f"  x eager {'-' if ve is None else f'{ve:6.2f}':>6s}"
                         f"  x compile {'-' if vc is None else f'{vc:6.2f}':>6s}"
                         f"  peak {'-' if peak is None else f'{peak:8.1f}':>8s} MiB"
                         f"  floor {'-' if frac is None else f'{100 * frac:5.1f}%':>6s}")
    for row in rows:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row["pass"]]
        lines.append(f"target {verdict:4s} {row['op']} {row['shape']}: {row['target']} ({row['detail']})")
    for row in SKIPPED:
        lines.append(f"skipped {row['op']} {row['shape']} {row['provider']}: {row['reason']}")
    return lines
