"""What an op does on the device, counted on a CPU machine: launches, host syncs, bytes, multiply-adds.

    from mvcl_fast.tools.structure import count_structure
    s = count_structure(lambda: op(z, y).backward())
    s.launches, s.syncs, s.kernels[0].bytes_loaded, s.macs

Speed targets on a GPU follow from structure that a CPU can see: a forward +
backward that makes 22 launches and 4 host syncs cannot be 5x faster than
eager, whatever its tiles. ``count_structure`` runs ``fn`` once on CPU tensors
with the Triton kernels executed by Triton's interpreter (``TRITON_INTERPRET=1``
must be set before Triton is imported; ``MVCL_FAST_BACKEND=triton`` sends CPU
tensors to the kernels) and records:

- **Triton launches**, with their programs (grid size), the bytes each one
  loads and stores counted as *distinct addresses per launch* (a tile read
  twice by one program, or by two programs, counts once: what HBM would move
  with a perfect cache, the floor a kernel's design is judged against), and the
  multiply-adds of its ``tl.dot`` calls (M x N x K each), and the most ``tl.dot``
  calls one program made: its serial tile steps (a program's GEMM loop makes one
  dot per step in fp32; the half dtypes split operands into two or three).
- **aten launches**: every aten op that runs a device kernel. Views, ``empty``
  allocations, ``detach`` and other metadata-only ops launch nothing and are
  not counted; the aten ops Triton's interpreter itself runs to stage a launch
  on the host are not counted either.
- **Host syncs**: the aten ops that make the host wait for the device on CUDA
  (``item`` / ``_local_scalar_dense``, ``nonzero``, ``equal``, ``unique`` ...) and
  ``Tensor.tolist`` / ``Tensor.numpy`` (which read CPU data without an aten op).

The ops of ``torch.library`` custom ops (namespace ``mvcl_fast``) are entered,
so what a custom op launches inside counts, not the op itself. Each aten op
counts as one launch (a few, such as ``sort``, launch several kernels on CUDA:
the count is a lower bound for those).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

CUSTOM_NAMESPACES = ("mvcl_fast",)

# aten ops that launch no device kernel: allocation, views, metadata.
NO_KERNEL = {
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "alias",
    "lift_fresh", "set_", "resize_", "_reshape_alias", "as_strided", "view", "_unsafe_view",
    "reshape", "t", "transpose", "permute", "expand", "squeeze", "unsqueeze", "select", "slice",
    "split", "unbind", "chunk", "narrow", "diagonal", "unfold", "view_as_real", "view_as_complex",
    "_conj", "_neg_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim",
    "is_contiguous", "is_same_size", "record_stream", "_has_compatible_shallow_copy_type",
}
# aten ops whose result the host must wait for on CUDA.
SYNCS = {
    "item", "_local_scalar_dense", "nonzero", "equal", "is_nonzero", "unique", "_unique",
    "_unique2", "unique_consecutive", "unique_dim", "masked_select", "bincount",
    "repeat_interleave", "histc", "allclose", "tolist",
}


@dataclass
class KernelLaunch:
    name: str
    programs: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0
    macs: int = 0
    dots: list = field(default_factory=list)   # (M, N, K) of each tl.dot call, per program
    max_program_dots: int = 0                    # the most tl.dot calls of one program
    _program_dots: int = field(default=0, repr=False)
    _loads: list = field(default_factory=list, repr=False)
    _stores: list = field(default_factory=list, repr=False)

    def end_program(self):
        self.max_program_dots = max(self.max_program_dots, self._program_dots)
        self._program_dots = 0

    def finish(self):
        self.end_program()
        self.bytes_loaded = _distinct_bytes(self._loads)
        self.bytes_stored = _distinct_bytes(self._stores)
        self._loads, self._stores = [], []


@dataclass
class Structure:
    kernels: list = field(default_factory=list)   # KernelLaunch, in launch order
    aten: list = field(default_factory=list)      # names of the aten ops that launch a kernel
    syncs: list = field(default_factory=list)     # names of the aten ops that sync

    @property
    def launches(self) -> int:
        return len(self.kernels) + len(self.aten)

    @property
    def bytes_loaded(self) -> int:
        return sum(k.bytes_loaded for k in self.kernels)

    @property
    def bytes_stored(self) -> int:
        return sum(k.bytes_stored for k in self.kernels)

    @property
    def bytes(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    @property
    def macs(self) -> int:
        return sum(k.macs for k in self.kernels)

    def table(self) -> str:
        """One line per launch: what `--structure` reports print."""
        lines = [f"{'launch':<40} {'programs':>8} {'loaded':>10} {'stored':>10} {'MACs':>12} "
                 f"{'dots/program':>12}"]
        for k in self.kernels:
            lines.append(f"{k.name:<40} {k.programs:>8} {k.bytes_loaded:>10} {k.bytes_stored:>10} "
                         f"{k.macs:>12} {k.max_program_dots:>12}")
        lines += [f"aten.{name}" for name in self.aten]
        lines.append(f"{self.launches} launches ({len(self.kernels)} Triton, {len(self.aten)} aten), "
                     f"{len(self.syncs)} syncs, {self.bytes} bytes, {self.macs} MACs")
        return "\n".join(lines)


def _distinct_bytes(accesses) -> int:
    """Bytes at distinct addresses: accesses is a list of (address array, element size)."""
    total = 0
    for size in {s for _, s in accesses}:
        addresses = [a for a, s in accesses if s == size and a.size]
        if addresses:
            total += np.unique(np.concatenate(addresses)).size * size
    return total


def aten_name(func) -> str:
    """'mm' for aten::mm.default."""
    return func._schema.name.split("::")[-1]


def launches_kernel(func) -> bool:
    """Whether an aten op runs a device kernel (not a view, allocation or metadata op)."""
    return aten_name(func) not in NO_KERNEL and not func.is_view


def run_custom_op(func, args, kwargs):
    """The Python implementation of a torch.library custom op: what it launches, once entered."""
    return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)


class _Recorder(TorchDispatchMode):
    def __init__(self, structure: Structure):
        super().__init__()
        self.structure = structure
        self.in_triton = False

    def kernel_launched(self, launch: KernelLaunch):
        self.structure.kernels.append(launch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_triton:  # the interpreter staging a launch on the host
            return func(*args, **kwargs)
        if func.namespace in CUSTOM_NAMESPACES:
            with self:
                return run_custom_op(func, args, kwargs)
        name = aten_name(func)
        if name in SYNCS:
            self.structure.syncs.append(name)
        elif launches_kernel(func):
            self.structure.aten.append(name)
        return func(*args, **kwargs)


def _element_size(pointer_handle) -> int:
    return np.dtype(_interpreter_module()._get_np_dtype(pointer_handle.get_element_ty())).itemsize


def _interpreter_module():
    import triton.runtime.interpreter as interpreter
    return interpreter


@contextmanager
def triton_hooks(recorder: _Recorder, execute: bool = True):
    """Patch the interpreter: record each launch, its grid, loads, stores and dots.

    execute=False records each launch by its kernel's name alone and runs nothing (its outputs
    stay unwritten): what a caller computing the values another way counts."""
    interp = _interpreter_module()
    builder = interp.InterpreterBuilder
    saved = {name: getattr(builder, name) for name in
             ("create_masked_load", "create_masked_store", "create_dot", "create_atomic_rmw",
              "create_atomic_cas", "set_grid_dim", "set_grid_idx")}
    saved_call = interp.GridExecutor.__call__
    current: list[KernelLaunch] = []

    def accesses(ptrs, mask):
        data = ptrs.data
        if mask is not None:
            data = data[np.broadcast_to(mask.data, data.shape)]
        return data.ravel().copy(), _element_size(ptrs)

    def masked_load(self, ptrs, mask, other, *args):
        if current:
            current[-1]._loads.append(accesses(ptrs, mask))
        return saved["create_masked_load"](self, ptrs, mask, other, *args)

    def masked_store(self, ptrs, value, mask, *args):
        if current:
            current[-1]._stores.append(accesses(ptrs, mask))
        return saved["create_masked_store"](self, ptrs, value, mask, *args)

    def atomic_rmw(self, op, ptr, val, mask, *args):
        if current:
            access = accesses(ptr, mask)
            current[-1]._loads.append(access)
            current[-1]._stores.append(access)
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *args)

    def atomic_cas(self, ptr, cmp, val, *args):
        if current:
            access = accesses(ptr, None)
            current[-1]._loads.append(access)
            current[-1]._stores.append(access)
        return saved["create_atomic_cas"](self, ptr, cmp, val, *args)

    def dot(self, a, b, d, *args):
        if current:
            m, k = a.data.shape[-2:]
            n = b.data.shape[-1]
            batch = int(np.prod(a.data.shape[:-2], dtype=np.int64))
            current[-1].macs += batch * m * n * k
            current[-1]._program_dots += 1
            if len(current[-1].dots) < 64:
                current[-1].dots.append((m, n, k))
        return saved["create_dot"](self, a, b, d, *args)

    def set_grid_dim(self, x, y, z):
        if current:
            current[-1].programs = x * y * z
        return saved["set_grid_dim"](self, x, y, z)

    def set_grid_idx(self, x, y, z):  # a new program starts
        if current:
            current[-1].end_program()
        return saved["set_grid_idx"](self, x, y, z)

    def launch(executor, *args, **kwargs):
        record = KernelLaunch(getattr(executor.fn, "__name__", str(executor.fn)))
        if not execute:
            recorder.kernel_launched(record)
            return None
        current.append(record)
        recorder.in_triton = True
        try:
            return saved_call(executor, *args, **kwargs)
        finally:
            recorder.in_triton = False
            current.pop()
            record.finish()
            record.dots = sorted(set(record.dots))
            recorder.kernel_launched(record)

    patches = dict(create_masked_load=masked_load, create_masked_store=masked_store,
                   create_dot=dot, create_atomic_rmw=atomic_rmw, create_atomic_cas=atomic_cas,
                   set_grid_dim=set_grid_dim, set_grid_idx=set_grid_idx)
    for name, fn in patches.items():
        setattr(builder, name, fn)
    interp.GridExecutor.__call__ = launch
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        interp.GridExecutor.__call__ = saved_call


@contextmanager
def _host_reads(recorder: _Recorder):
    """Tensor.tolist / numpy read the data on the host without an aten op: count them too."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counted(name):
        def read(self, *args, **kwargs):
            if not recorder.in_triton:
                recorder.structure.syncs.append(name)
            return saved[name](self, *args, **kwargs)
        return read

    for name in saved:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def count_structure(fn: Callable[[], object]) -> Structure:
    """Run fn() once and return what it launched, synced, loaded, stored and multiplied."""
    structure = Structure()
    recorder = _Recorder(structure)
    with triton_hooks(recorder), _host_reads(recorder), recorder:
        fn()
    return structure
