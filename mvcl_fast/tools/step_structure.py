"""A whole training step as it would run on CUDA, counted on a CPU machine.

    from mvcl_fast.tools.step_structure import count_train_step
    step = count_train_step(trainer, batch)      # one trainer.train_step(batch), counted
    print(step.table())                          # launches, syncs, FLOPs, bytes, predicted ms per part
    step.syncs                                   # each with the file:line that made it

``count_step(fn, parts=..., host_tensors=...)`` counts any step; ``model_parts`` names the parts
of an MVCL-DAF++ step. The step runs once, on CPU tensors, and what CUDA would be asked to do
is recorded:

- **Launches**: every aten op that runs a kernel (``mvcl_fast.tools.structure``'s NO_KERNEL and
  SYNCS say which do not), each in a part. In the forward, the innermost part module being run
  (forward pre/post hooks). In the backward, the part that was running when the autograd node
  being executed was created: each new node is tagged in the forward (its ``metadata``), and
  ``torch._C._current_autograd_node()`` names the node in the backward; a parameter's
  gradient accumulation belongs to the part holding the parameter. The optimizer part is what
  ``torch.optim`` (step, zero_grad, LR schedulers), ``clip_grad_norm_`` and the GradScaler
  run; "other" is the rest (the trainer's own ops, autograd's seed of the backward).
- **Library calls CUDA runs as one kernel** but the CPU decomposes (FUSED_CALLS: an LSTM call,
  whose recurrence cuDNN runs itself; scaled dot-product attention, which on the CPU takes the
  math path under dropout; dropout, ``native_dropout`` on CUDA): one launch in the forward,
  one for the whole backward. What runs around them (packing, gathers) counts as usual.
- **The fused ops** (the ``mvcl_fast`` custom ops): their Triton launches at the step's own
  shapes, captured through Triton's interpreter without running them (``TRITON_INTERPRET=1``
  must be set before Triton is imported, as for ``count_structure``), and the aten ops their
  launchers run on the host side; the reference computes their values, since the interpreter
  takes minutes per DAF call at MIntRec shapes. Their FLOPs are the GEMMs their kernels run
  (FUSED_OP_GEMMS), their bytes their inputs and outputs (each op's own floor:
  ``count_structure`` measures the kernels' traffic).
- **Host and device "as on CUDA"**: ``host_tensors`` (the DataLoader batch, token tables) and
  every tensor computed only from host tensors, or made by a factory given no device, live on
  the host: their ops launch nothing and reading them syncs nothing. A host tensor copied to
  the device (``Tensor.to``/``cuda`` naming a torch.device or a device tensor, ``copy_``) is a
  launch, and a sync unless ``non_blocking=True`` (a pageable copy waits for the stream; the
  trainer pins its batches on CUDA). Here host and device are both the CPU, so the call says
  where a tensor goes: a torch.device object names the step's device, the string "cpu" and
  ``Tensor.cpu`` the host.
- **Host syncs**: the SYNCS aten ops, ``Tensor.tolist``/``numpy``, and copies to the host, of
  device tensors, each with the innermost frame outside torch (the caller's file:line) and
  the innermost torch frame under it.
- **The shape signature**: each launch's name with its inputs' shapes and dtypes, in order:
  two batches whose signatures are equal run the same kernels on the same shapes, what
  capturing the step as one CUDA graph needs (``first_difference`` says where two differ).
- **FLOPs and bytes** per launch (``torch.utils.flop_counter``'s formulas for the matrix ops;
  bytes: the tensors each launch reads and writes) and a **predicted** time per part from a
  roofline model of an H100 (PEAK_FLOPS, BANDWIDTH, LAUNCH_SECONDS): each launch takes
  max(FLOPs / peak, bytes / bandwidth) plus a fixed launch cost.

Each aten op counts as one launch; a few (``_fused_adamw_``, ``_foreach_norm``, ``sort``) run
several kernels on CUDA, so the count is a lower bound for those. The CPU's autocast casts
what its own op lists say, which differ from CUDA's in a few ops.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

from mvcl_fast.backend import triton_interpreter_enabled
from mvcl_fast.tools import structure
from mvcl_fast.tools.structure import (CUSTOM_NAMESPACES, SYNCS, KernelLaunch, aten_name,
                                       launches_kernel, run_custom_op, triton_hooks)

# The roofline behind the predicted times: a model of an H100 SXM running bf16, not a
# measurement (the dense bf16 rate a large GEMM reaches, the HBM bandwidth a streaming kernel
# reaches, and what each launch costs beyond its work: its latency and a small grid's tail).
PEAK_FLOPS = 790e12
BANDWIDTH = 3.0e12
LAUNCH_SECONDS = 4e-6

PARTS = ("text encoder", "anchor encoder", "video", "audio", "alignment", "coarse", "DAF",
         "head/other model", "losses", "optimizer", "other")
OPTIMIZER, OTHER = "optimizer", "other"

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
# What runs in these files is the optimizer part.
_OPTIMIZER_FILES = tuple(_TORCH_DIR + path for path in (
    "optim" + os.sep, os.path.join("nn", "utils", "clip_grad.py"),
    os.path.join("amp", "grad_scaler.py")))
# The counter's own frames and the mode machinery's (dynamo's wrapper around every
# __torch_dispatch__ included): never a call site.
_COUNTER_FILES = frozenset({os.path.abspath(__file__), os.path.abspath(structure.__file__),
                            *(_TORCH_DIR + path for path in (
                                "overrides.py", "_compile.py",
                                os.path.join("utils", "_python_dispatch.py"),
                                os.path.join("_dynamo", "eval_frame.py")))})
# Outputs of device ops that CUDA leaves on the host: the packed sequences' batch sizes and lengths.
HOST_OUTPUTS = {"_pack_padded_sequence": 1, "_pad_packed_sequence": 1}
_TAG = "mvcl_fast.step_part"   # the key of an autograd node's metadata holding its _Tag


@dataclass(frozen=True)
class Launch:
    part: str
    name: str          # aten op, Triton kernel, fused library call, or "copy H2D"
    backward: bool
    flops: int = 0
    bytes: int = 0

    @property
    def predicted_seconds(self) -> float:
        return max(self.flops / PEAK_FLOPS, self.bytes / BANDWIDTH) + LAUNCH_SECONDS


@dataclass(frozen=True)
class Sync:
    part: str
    what: str          # "aten._local_scalar_dense", "Tensor.tolist", "blocking H2D copy" ...
    site: str          # file:line of the innermost frame outside torch
    via: str = ""      # file:line of the innermost torch frame under it, if any

    def __str__(self) -> str:
        via = f", via {self.via}" if self.via else ""
        return f"{self.site}: {self.what} ({self.part}{via})"


@dataclass(frozen=True)
class PartTotals:
    forward: int = 0
    backward: int = 0
    syncs: int = 0
    flops: int = 0
    bytes: int = 0
    predicted_seconds: float = 0.0

    @property
    def launches(self) -> int:
        return self.forward + self.backward


@dataclass
class StepStructure:
    launches: list = field(default_factory=list)    # Launch, in launch order
    syncs: list = field(default_factory=list)       # Sync, in order
    signature: list = field(default_factory=list)   # (launch name, ((shape, dtype), ...)) per launch

    @property
    def predicted_ms(self) -> float:
        return 1e3 * sum(launch.predicted_seconds for launch in self.launches)

    def parts(self) -> dict[str, PartTotals]:
        """Totals per part, in PARTS order, parts of other names before the optimizer (parts
        nothing ran in left out)."""
        totals: dict[str, PartTotals] = {}
        for launch in self.launches:
            t = totals.get(launch.part, PartTotals())
            totals[launch.part] = replace(
                t, forward=t.forward + (not launch.backward), backward=t.backward + launch.backward,
                flops=t.flops + launch.flops, bytes=t.bytes + launch.bytes,
                predicted_seconds=t.predicted_seconds + launch.predicted_seconds)
        for sync in self.syncs:
            t = totals.get(sync.part, PartTotals())
            totals[sync.part] = replace(t, syncs=t.syncs + 1)
        order = {name: i for i, name in enumerate(PARTS)}
        return dict(sorted(totals.items(), key=lambda item: order.get(item[0], order[OPTIMIZER] - 0.5)))

    def table(self, markdown: bool = False) -> str:
        """Launches (forward + backward), syncs, GFLOP, MB and predicted ms per part, then the
        sync sites."""
        header = ("part", "launches (fwd + bwd)", "syncs", "GFLOP", "MB", "predicted ms")
        rows = [(name, f"{t.launches} ({t.forward} + {t.backward})", str(t.syncs),
                 f"{t.flops / 1e9:.1f}", f"{t.bytes / 1e6:.1f}", f"{1e3 * t.predicted_seconds:.3f}")
                for name, t in self.parts().items()]
        forward = sum(not launch.backward for launch in self.launches)
        rows.append(("total", f"{len(self.launches)} ({forward} + {len(self.launches) - forward})",
                     str(len(self.syncs)), f"{sum(l.flops for l in self.launches) / 1e9:.1f}",
                     f"{sum(l.bytes for l in self.launches) / 1e6:.1f}", f"{self.predicted_ms:.3f}"))
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")   # a table ends at a blank line
        else:
            widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
            lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in (header, *rows)]
        lines.append(f"predicted: a roofline model of an H100 ({PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16, "
                     f"{BANDWIDTH / 1e12:.1f} TB/s, {LAUNCH_SECONDS * 1e6:.0f} us a launch), "
                     "not a measurement")
        lines.append(f"host syncs: {len(self.syncs)}")
        lines += [("- " if markdown else "  ") + str(sync) for sync in self.syncs]
        return "\n".join(lines)


def first_difference(a: StepStructure, b: StepStructure) -> Optional[str]:
    """Where two steps' shape signatures first differ (None: the same launches on the same
    shapes, so one captured CUDA graph would serve both)."""
    for i, (x, y) in enumerate(zip(a.signature, b.signature)):
        if x != y:
            return f"launch {i}: {x} vs {y}"
    if len(a.signature) != len(b.signature):
        return f"{len(a.signature)} launches vs {len(b.signature)}"
    return None


def model_parts(model: nn.Module, criterion: nn.Module) -> dict[str, list[nn.Module]]:
    """The parts of an MVCL-DAF++ step (mvcl_fast.intent.model's MVCLDAFPlusPlus and MVCLLoss):
    the alignment modules inside the video and audio streams are a part of their own, and
    "head/other model" is what the model runs outside its other parts (pooler, classifier,
    label-slot views)."""
    streams = model.streams
    parts = {"text encoder": [model.text_encoder], "anchor encoder": [model.anchor_encoder],
             **{name: [streams[name]] for name in ("video", "audio") if name in streams},
             "alignment": [stream.align for stream in streams.values()],
             "coarse": [model.coarse], "DAF": list(model.daf), "head/other model": [model],
             "losses": [criterion]}
    return {name: [m for m in modules if m is not None] for name, modules in parts.items()}


def count_step(step: Callable[[], object], *, parts: Mapping[str, Sequence[nn.Module]],
               host_tensors: Iterable[Tensor] = ()) -> StepStructure:
    """Run step() once and return what it would launch and sync on CUDA (the module docstring).
    parts: part name -> the modules whose forward is that part (the innermost wins);
    host_tensors: the tensors that would be on the host (a DataLoader batch, token tables)."""
    counter = _StepCounter(parts, host_tensors)
    with counter.part_hooks(), counter.fused_calls(), _HostAndNodes(counter), counter:
        step()
    return counter.result


def count_train_step(trainer, batch: dict) -> StepStructure:
    """One ``trainer.train_step(batch)`` of a mvcl_fast.intent Trainer, counted: the batch and the
    training split's token tables are the host tensors. Count a step after the first, which
    also creates AdamW's state (zero-fills the later steps do not launch)."""
    tokens = trainer.splits["train"].tokens
    host = [t for t in (*batch.values(), *tokens.values()) if isinstance(t, Tensor)]
    return count_step(lambda: trainer.train_step(batch),
                      parts=model_parts(trainer.model, trainer.criterion), host_tensors=host)


# ------------------------------------------------------------------ the counter
@dataclass(frozen=True, eq=False)   # each call is its own, whatever its shapes
class _Call:
    """A fused library call, counted once forward, once backward."""
    name: str
    backward_flops: int
    bytes: int
    shapes: tuple


@dataclass(frozen=True)
class _Tag:
    part: str
    call: Optional[_Call] = None   # set on the nodes a fused call created


def _tensors(tree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _shapes(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


def _flops(func, args, kwargs, out) -> int:
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


def _written(func, args, kwargs, out) -> list[Tensor]:
    """What an op writes: its outputs, or the arguments it mutates (foreach and fused ops
    return nothing)."""
    outputs = _tensors(out)
    if outputs:
        return outputs
    mutated = [a.name for a in func._schema.arguments
               if a.alias_info is not None and a.alias_info.is_write]
    named = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
    return _tensors([named[name] for name in mutated if name in named])


def _short(path: str) -> str:
    if path.startswith(_REPO_ROOT):
        return path[len(_REPO_ROOT):]
    return path.split("site-packages" + os.sep, 1)[-1]


def _call_site() -> tuple[str, str]:
    """(file:line of the innermost frame outside torch, file:line of the innermost torch frame
    under it or '')."""
    via = ""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path not in _COUNTER_FILES:
            where = f"{_short(path)}:{frame.f_lineno}"
            if not path.startswith(_TORCH_DIR):
                return where, via
            via = via or where
        frame = frame.f_back
    return "?", via


def _in_optimizer() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_OPTIMIZER_FILES):
            return True
        frame = frame.f_back
    return False


# The fused ops' GEMMs over [B, Lq, D] queries and [B, Lk, D] keys, as the kernels run them:
# DAF forward QK^T and PV; its backward QK^T again, dP, dV, dK, dQ (docs/benchmarks.md), with the
# index of q among the op's arguments. The contrastive losses' GEMMs (N x C x D and V N^2 D
# multiply-adds, N the batch) stay under a GFLOP at these batch sizes and are left out.
FUSED_OP_GEMMS = {"daf_attention": (2, 0), "daf_attention_backward": (5, 1)}


def _fused_op_flops(func, args) -> int:
    gemms, q_index = FUSED_OP_GEMMS.get(aten_name(func), (0, 0))
    if not gemms:
        return 0
    (batch, len_q, dim), len_k = args[q_index].shape, args[q_index + 1].shape[1]
    return 2 * gemms * batch * len_q * len_k * dim


def _lstm_flops(args, kwargs, out) -> tuple[int, int]:
    """Each of the LSTM's weight matrices multiplies every (frame, batch) row once forward and
    twice backward (dX and dW). Packed: lstm(data, batch_sizes, hx, weights, ...); padded:
    lstm(input, hx, weights, ...)."""
    packed = isinstance(args[1], Tensor)
    data, weights = args[0], args[3] if packed else args[2]
    rows = data.shape[0] if packed else data.shape[0] * data.shape[1]
    forward = 2 * rows * sum(w.numel() for w in weights if w.dim() == 2)
    return forward, 2 * forward


def _attention_flops(args, kwargs, out) -> tuple[int, int]:
    def four_d(t):
        return (1,) * (4 - t.dim()) + tuple(t.shape)
    q, k, v = (four_d(t) for t in args[:3])
    return sdpa_flop_count(q, k, v), sdpa_backward_flop_count(four_d(out), q, k, v)


def _no_flops(args, kwargs, out) -> tuple[int, int]:
    return 0, 0


def _dropout_runs(args, kwargs) -> bool:
    """Whether dropout(input, p, train) launches anything: a no-op unless training with 0 < p < 1."""
    x, p, train = args
    return bool(train) and 0 < p < 1 and x.numel() > 0


# (owner, attribute, FLOPs (forward, backward) of a call, whether a call launches anything).
# Patched where callers look them up rather than seen by a TorchFunctionMode, since
# F.multi_head_attention_forward calls attention from inside a torch function, where modes are off.
FUSED_CALLS = (
    (torch._VF, "lstm", _lstm_flops, None),
    (torch, "lstm", _lstm_flops, None),
    (torch.nn.functional, "scaled_dot_product_attention", _attention_flops, None),
    (torch._VF, "dropout", _no_flops, _dropout_runs),
)


@contextlib.contextmanager
def _backend(name: str):
    """MVCL_FAST_BACKEND=name inside the block (the ops read it at every call)."""
    saved = os.environ.get("MVCL_FAST_BACKEND")
    os.environ["MVCL_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MVCL_FAST_BACKEND"]
        else:
            os.environ["MVCL_FAST_BACKEND"] = saved


def _outside_dispatch():
    """The dispatch keys as outside any __torch_dispatch__ (below autocast, as a kernel runs):
    inside one, autograd and functorch are excluded, which the fused ops' reference backward
    (torch.func.vjp) needs."""
    keys = torch._C.DispatchKey
    excluded = torch._C.DispatchKeySet(keys.Python)
    for key in (keys.PythonTLSSnapshot, keys.AutocastCPU, keys.AutocastCUDA):
        excluded = excluded | torch._C.DispatchKeySet(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


class _StepCounter(TorchDispatchMode):
    """The aten ops: launches, syncs, host tensors, backward attribution."""

    def __init__(self, parts: Mapping[str, Sequence[nn.Module]], host_tensors: Iterable[Tensor]):
        super().__init__()
        self.result = StepStructure()
        self.parts = {name: list(modules) for name, modules in parts.items()}
        self.host = WeakIdKeyDictionary()
        for t in host_tensors:
            self.host[t] = True
        self.stack: list[str] = []             # the part modules being run, innermost last
        self.pinned: Optional[tuple] = None     # (part, backward) of the fused op being counted
        self.silent = False                     # in a fused library call or a fused op's reference
        self.making_on_host = False             # a factory given no device is running
        self.backward_counted: set = set()      # the fused calls whose backward was counted
        self.captured: list[int] = []           # indices of the Triton launches being captured
        # A parameter's gradient accumulation: the innermost part holding it.
        self.param_parts = {}
        by_size = sorted(((sum(p.numel() for p in m.parameters()), name, m)
                          for name, modules in self.parts.items() for m in modules),
                         key=lambda item: -item[0])
        for _, name, module in by_size:
            self.param_parts.update((id(p), name) for p in module.parameters())

    @contextlib.contextmanager
    def unseen(self):
        """Run a block that no mode sees (a fused call, a fused op's reference)."""
        self.silent = True
        try:
            with _disable_current_modes(), torch._C.DisableTorchFunction():
                yield
        finally:
            self.silent = False

    # -------------------------------------------------------------- where we are
    def where(self) -> tuple[str, bool]:
        """(the part now running, whether in the backward)."""
        if self.pinned is not None:
            return self.pinned
        node = torch._C._current_autograd_node()
        if node is not None:
            tag = node.metadata.get(_TAG)
            if tag is not None:
                return tag.part, True
            variable = getattr(node, "variable", None)   # AccumulateGrad
            return self.param_parts.get(id(variable), OTHER), True
        if self.stack:
            return self.stack[-1], False
        return (OPTIMIZER if _in_optimizer() else OTHER), False

    def tag(self, outputs, call: Optional[_Call] = None, part: Optional[str] = None) -> None:
        """Tag the autograd nodes behind outputs that are not tagged yet, those just created,
        with the part now running (or part) and the fused call that made them, if any."""
        stack = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
        if not stack:
            return
        tag = _Tag(part or self.where()[0], call)
        while stack:
            node = stack.pop()
            if node is None or isinstance(node, torch._C._functions.AccumulateGrad):
                continue
            metadata = node.metadata
            if _TAG not in metadata:
                metadata[_TAG] = tag
                stack.extend(next_node for next_node, _ in node.next_functions)

    # -------------------------------------------------------------- records
    def launch(self, name: str, inputs, written, flops: int = 0, where=None) -> Launch:
        part, backward = where or self.where()
        record = Launch(part, name, backward, flops, _nbytes(inputs) + _nbytes(written))
        self.result.launches.append(record)
        self.result.signature.append((name, _shapes(inputs)))
        return record

    def sync(self, what: str, part: Optional[str] = None) -> None:
        site, via = _call_site()
        self.result.syncs.append(Sync(part or self.where()[0], what, site, via))

    def mark_host(self, out) -> None:
        for t in _tensors(out):
            self.host[t] = True

    def is_host(self, t: Tensor) -> bool:
        return t in self.host

    # -------------------------------------------------------------- aten ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in CUSTOM_NAMESPACES:
            return self.fused_op(func, args, kwargs)
        node = torch._C._current_autograd_node()
        tag = node.metadata.get(_TAG) if node is not None else None
        if tag is not None and tag.call is not None:
            if tag.call not in self.backward_counted:
                self.backward_counted.add(tag.call)
                record = Launch(tag.part, tag.call.name, True, tag.call.backward_flops, tag.call.bytes)
                self.result.launches.append(record)
                self.result.signature.append((tag.call.name + " backward", tag.call.shapes))
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        if all(map(self.is_host, inputs)) if inputs else self.making_on_host:
            self.mark_host(out)
            return out
        name = aten_name(func)
        if name in HOST_OUTPUTS:
            self.mark_host(out[HOST_OUTPUTS[name]])
        if name == "copy_" and self.is_host(args[1]):   # into a device tensor from the host
            self.launch("copy H2D", [args[1]], [])
            if not kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
                self.sync("blocking H2D copy (copy_)")
        elif name == "copy_" and self.is_host(args[0]):
            self.sync("D2H copy (copy_)")
        elif name in SYNCS:
            self.sync(f"aten.{name}")
        elif launches_kernel(func):
            self.launch(name, inputs, _written(func, args, kwargs, out), _flops(func, args, kwargs, out))
        return out

    def kernel_launched(self, launch: KernelLaunch) -> None:
        self.captured.append(len(self.result.launches))
        self.launch(launch.name, [], [])

    def fused_op(self, func, args, kwargs):
        """A mvcl_fast custom op: its launches on the Triton path, not run; its value from the
        reference; its GEMMs' FLOPs and its bytes charged to its first Triton launch."""
        if not triton_interpreter_enabled():
            raise RuntimeError("count_step captures the fused ops' Triton launches through Triton's "
                               "interpreter: set TRITON_INTERPRET=1 before Triton is imported")
        self.captured, self.pinned = [], self.where()
        try:
            with _backend("triton"), triton_hooks(self, execute=False), self:
                run_custom_op(func, args, kwargs)
        finally:
            self.pinned = None
        with _backend("reference"), self.unseen(), _outside_dispatch():
            out = run_custom_op(func, args, kwargs)
        flops = _fused_op_flops(func, args)
        inputs = _tensors((args, kwargs))
        launches, signature = self.result.launches, self.result.signature
        for i in self.captured:
            signature[i] = (signature[i][0], _shapes(inputs))
        if self.captured:
            first = self.captured[0]
            launches[first] = replace(launches[first], flops=flops,
                                      bytes=_nbytes(inputs) + _nbytes(_tensors(out)))
        return out

    # -------------------------------------------------------------- fused library calls
    def fused_call(self, name, original, flop_formula, launches, args, kwargs):
        if self.silent or torch._C._current_autograd_node() is not None or (
                launches is not None and not launches(args, kwargs)):
            return original(*args, **kwargs)
        part, _ = self.where()
        inputs = _tensors((args, kwargs))
        self.tag(inputs, part=part)   # what came before the call is not the call's
        with self.unseen():
            out = original(*args, **kwargs)
        forward_flops, backward_flops = flop_formula(args, kwargs, out)
        outputs = _tensors(out)
        record = self.launch(name, inputs, outputs, forward_flops, (part, False))
        self.tag(outputs, _Call(name, backward_flops, record.bytes, _shapes(inputs)), part)
        return out

    @contextlib.contextmanager
    def fused_calls(self):
        saved = [(owner, attribute, vars(owner).get(attribute))
                 for owner, attribute, _, _ in FUSED_CALLS]
        for owner, attribute, flop_formula, launches in FUSED_CALLS:
            original = getattr(owner, attribute)

            def call(*args, name=attribute, original=original, flop_formula=flop_formula,
                     launches=launches, **kwargs):
                return self.fused_call(name, original, flop_formula, launches, args, kwargs)
            setattr(owner, attribute, call)
        try:
            yield
        finally:
            for owner, attribute, value in saved:
                if value is None:
                    delattr(owner, attribute)
                else:
                    setattr(owner, attribute, value)

    @contextlib.contextmanager
    def part_hooks(self):
        def enter(part):
            return lambda module, args: self.stack.append(part)

        def leave(module, args, output):
            self.stack.pop()

        handles = [hook for part, modules in self.parts.items() for m in modules
                   for hook in (m.register_forward_pre_hook(enter(part)),
                                m.register_forward_hook(leave, always_call=True))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class _HostAndNodes(TorchFunctionMode):
    """The torch functions: copies between host and device, host reads without an aten op,
    factories, and the tagging of each new autograd node with the part that made it."""

    def __init__(self, counter: _StepCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if counter.silent:
            return func(*args, **kwargs)
        if func in (Tensor.to, Tensor.cuda, Tensor.cpu):
            return self.move(func, args, kwargs)
        if func in (Tensor.tolist, Tensor.numpy) and not counter.is_host(args[0]):
            counter.sync(f"Tensor.{func.__name__}")
        on_host = kwargs.get("device") is None and not _tensors((args, kwargs))
        outer, counter.making_on_host = counter.making_on_host, on_host
        try:
            out = func(*args, **kwargs)
        finally:
            counter.making_on_host = outer
        if on_host:
            counter.mark_host(out)
        counter.tag(out)
        return out

    def move(self, func, args, kwargs):
        """Tensor.to / cuda / cpu: between host and device, a copy; to the host, a sync; to the
        device, a launch and, unless non_blocking, a sync."""
        counter, tensor = self.counter, args[0]
        from_host = counter.is_host(tensor)
        if func is Tensor.cpu:
            to_host, non_blocking = True, False
        elif func is Tensor.cuda:
            to_host = False
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        else:
            target = kwargs.get("device", next(
                (a for a in args[1:] if isinstance(a, (str, torch.device, Tensor))), None))
            to_host = (None if target is None
                       else counter.is_host(target) if isinstance(target, Tensor)
                       else isinstance(target, str) and torch.device(target).type == "cpu")
            non_blocking = torch._C._nn._parse_to(*args[1:], **kwargs)[2]
        out = func(*args, **kwargs)
        if to_host is not None and to_host != from_host:
            if out is tensor:   # the CPU's no-op: a tensor of its own, on the other side
                out = tensor.view_as(tensor)
            if from_host:
                counter.host.pop(out, None)
                counter.launch("copy H2D", [tensor], [])
                if not non_blocking:
                    counter.sync(f"blocking H2D copy (Tensor.{func.__name__})")
            else:
                counter.mark_host(out)
                counter.sync(f"D2H copy (Tensor.{func.__name__})")
        counter.tag(out)
        return out
