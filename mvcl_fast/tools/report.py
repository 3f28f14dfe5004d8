"""Ahead-of-time compile report: registers, spills, shared memory and the MMA instruction of
every kernel specialisation the JIT launches.

    python -m mvcl_fast.tools.report [--arch sm_75 sm_80 sm_86 sm_89 sm_90a] [--json PATH] [--jobs N]

An arch the kernels are not built for (sm_75: mvcl_fast.backend.KERNEL_CAPABILITIES) compiles
nothing: the report lists it as dispatching to the reference, which is what the ops do there.

Every module of mvcl_fast.tools.aot_launches (one per op) is imported. Its
``aot_launches()`` gives named callables that run the op's public launchers on
CPU tensors (see mvcl_fast.tools.aot); each runs once per target architecture
while Triton's launch path is intercepted, so that nothing compiles or executes:

* a stand-in driver answers the target (a ``GPUTarget``) and a device of its
  own, ``torch.cuda.get_device_capability()`` answers the target's
  capability and the kernels' modelled SM count is the target's, so launchers
  that pin configs or size grids per architecture pick the target's;
* ``triton.knobs.runtime.jit_cache_hook``, which ``JITFunction.run`` calls just
  before it would compile, records the launch's specialisation data and tells
  the JIT to skip it (the launch then returns without running). That data is
  what the installed Triton's own binder computed from the real arguments:
  signature types, constexprs, the attributes (16-byte aligned pointers,
  integers divisible by 16; integers equal to 1 become constexprs) and the
  options (num_warps, num_stages, ...);
* ``Autotuner.run`` launches every config the autotuner would benchmark (after
  its own pruning) instead of timing them.

Each distinct specialisation is compiled for the target by
``JITFunction.preload`` (the JIT's own path from specialisation data to a
kernel): no GPU is needed.

Registers and the stack frame are read off the cubin (with the cuobjdump that
ships with Triton); where the stack frame is not empty, the bundled ptxas is run
with ``-v`` on Triton's PTX (with Triton's own flags) for the exact spill
bytes. Shared memory is Triton's own figure (the dynamic shared memory the
launch asks for). The MMA instruction is read off the SASS (HGMMA: sm_90
warpgroup MMA; HMMA.16816 / HMMA.1688: mma.sync; none: no tensor-core
instruction). Compiles land in Triton's cache and the readings of each cubin
in ~/.cache/mvcl_fast/compile-report ($MVCL_FAST_REPORT_CACHE), so reruns are fast. Exit
status 1 when anything fails to compile, spills, or asks for more shared
memory than one block may use.

Triton's interpreter (TRITON_INTERPRET=1, which the CPU test suite sets) turns
@triton.jit functions into interpreted ones that cannot be compiled, so the
command removes the variable before any kernel module is imported (its worker
processes inherit the environment without it); the kernel modules must be
imported in a process where it is not set.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass

from mvcl_fast.tools.report_output import format_table, markdown_table, summary

DECLARATIONS_PACKAGE = "mvcl_fast.tools.aot_launches"
DEFAULT_ARCHS = ("sm_90a", "sm_80", "sm_86", "sm_89", "sm_75")
# Largest dynamic shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# the SM has 228 KiB (sm_90), 164 KiB (sm_80), 100 KiB (sm_86, sm_89), of which 1 KiB per block
# is reserved by the system; sm_75 (Turing) allows 64 KiB.
SHARED_LIMIT_BYTES = {90: 227 * 1024, 89: 99 * 1024, 86: 99 * 1024, 80: 163 * 1024, 75: 64 * 1024}
# One representative card per target, whose SM count launchers size their grids by.
CARDS = {90: ("H100 SXM", 132), 89: ("RTX 4090", 128), 86: ("RTX 3090", 82), 80: ("A100", 108),
         75: ("T4", 40)}
SM_COUNT = {cap: sms for cap, (_, sms) in CARDS.items()}
# Triton 3.9 warns at every compile that its fp-fusion default will change; the report compiles
# with the default the JIT uses today and says so once in its header instead.
FP_FUSION_WARNING = "TRITON_DEFAULT_FP_FUSION is unset"


@dataclass
class CompileResult:
    module: str             # the module declaring the launches (one per op)
    kernel: str             # the @triton.jit function's name
    spec: str               # kernel(pointer element types)[constexprs]
    arch: str               # "sm_90a", "sm_80", ...
    num_warps: int
    num_stages: int
    launches: str = ""      # the aot_launches() entries that launch this specialisation
    signature: str = ""     # every argument: "name: type" (+ " %16" when divisibility 16), "name=value"
    aligned: str = ""       # runtime arguments with the divisibility-16 hint / all runtime arguments
    registers: int = -1
    spill_stores: int = -1  # bytes
    spill_loads: int = -1   # bytes
    stack_frame: int = -1   # bytes
    shared: int = -1        # bytes of dynamic shared memory
    shared_limit: int = 0
    mma: str = ""           # MMA instruction(s) of the SASS, "none" without any
    seconds: float = 0.0
    error: str = ""

    @property
    def spills(self) -> int:
        return max(self.spill_stores, 0) + max(self.spill_loads, 0)

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill_stores == 0 and self.spill_loads == 0
                and 0 <= self.shared <= self.shared_limit)


def capability(arch: str) -> int:
    """'sm_90a' -> 90, 'sm_80' -> 80 (Triton adds the 'a' itself for 90 and up)."""
    match = re.fullmatch(r"sm_(\d+)a?", arch)
    if not match or int(match.group(1)) not in SHARED_LIMIT_BYTES:
        raise ValueError(f"unsupported arch {arch!r}: use one of sm_90a, sm_89, sm_86, sm_80, sm_75")
    return int(match.group(1))


def kernels_built_for(arch: str) -> bool:
    """Whether the ops run their kernels on `arch` (else they dispatch to the reference)."""
    from mvcl_fast.backend import KERNEL_CAPABILITIES

    cap = capability(arch)
    return (cap // 10, cap % 10) in KERNEL_CAPABILITIES


def describe_arch(arch: str) -> str:
    """'sm_80 (A100: 108 SMs, 163 KiB shared memory per block)'."""
    cap = capability(arch)
    card, sms = CARDS[cap]
    return f"{arch} ({card}: {sms} SMs, {SHARED_LIMIT_BYTES[cap] // 1024} KiB shared memory per block)"


def declaration(module) -> str | None:
    """'aot_launches' when the module declares what the report compiles, else None."""
    return "aot_launches" if hasattr(module, "aot_launches") else None


def declaration_modules() -> list[str]:
    """Names of the modules of mvcl_fast.tools.aot_launches, one per op."""
    package = importlib.import_module(DECLARATIONS_PACKAGE)
    return [f"{DECLARATIONS_PACKAGE}.{info.name}"
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name)]


# ----------------------------------------------------------------------------- launch capture

@dataclass(frozen=True)
class Specialisation:
    """One kernel specialisation a launch asked the JIT for, as the JIT serialised it."""
    kernel_module: str      # the @triton.jit function's module and qualified name
    kernel: str
    data: str               # JITFunction's specialisation data (JSON), what preload() takes


class _TargetDriver:
    """The part of Triton's driver the launch and preload paths ask, answering one target."""

    def __init__(self, arch: str):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability(arch), 32)
        self.device = f"aot-{arch}"  # a device of its own: the JIT keeps its caches per device

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def target_driver(arch: str):
    """Triton, torch.cuda.get_device_capability and the kernels' modelled SM count answer
    `arch` inside the block."""
    import torch
    from triton.runtime import driver

    from mvcl_fast.kernels import shared

    cap = capability(arch)
    saved_capability, saved_sm_count = torch.cuda.get_device_capability, shared.MODELLED_SM_COUNT
    # The driver in use before, None if none was chosen yet: reset_active() would create the
    # default driver, which fails on a machine without a GPU.
    saved_driver = driver._active
    driver.set_active(_TargetDriver(arch))
    torch.cuda.get_device_capability = lambda device=None: (cap // 10, cap % 10)
    shared.MODELLED_SM_COUNT = SM_COUNT[cap]
    try:
        yield
    finally:
        torch.cuda.get_device_capability = saved_capability
        shared.MODELLED_SM_COUNT = saved_sm_count
        driver.set_active(saved_driver)


def _launch_every_config(self, *args, **kwargs):
    """Autotuner.run while capturing: launch each config it would benchmark, time none."""
    self.nargs = dict(zip(self.arg_names, args))
    try:
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())
    finally:
        self.nargs = None


@contextlib.contextmanager
def capturing(arch: str):
    """Inside the block Triton launches compile and run nothing; the list fills with the
    Specialisation of every launch, for `arch`."""
    from triton import knobs
    from triton.runtime.autotuner import Autotuner

    captured: list[Specialisation] = []

    def record(*, fn, compile, **_):
        jit_fn = fn.jit_function
        captured.append(Specialisation(jit_fn.fn.__module__, jit_fn.fn.__qualname__,
                                       compile["specialization_data"]))
        return True  # the JIT skips the compile and returns before launching

    saved_hook, saved_run = knobs.runtime.jit_cache_hook, Autotuner.run
    knobs.runtime.jit_cache_hook, Autotuner.run = record, _launch_every_config
    try:
        with target_driver(arch):
            yield captured
    finally:
        knobs.runtime.jit_cache_hook, Autotuner.run = saved_hook, saved_run


def capture_module(module_name: str, arch: str) -> tuple[dict, list[str]]:
    """({Specialisation: [launch names]} in first-launch order, errors) of a module's aot_launches()."""
    try:
        launches = list(importlib.import_module(module_name).aot_launches())
    except Exception as exc:
        return {}, [f"aot_launches() raised {type(exc).__name__}: {exc}"]
    if not launches:
        return {}, ["aot_launches() returned no launch"]
    found: dict[Specialisation, list[str]] = {}
    errors = []
    for name, launch in launches:
        with capturing(arch) as captured:
            try:
                launch()
            except Exception as exc:
                errors.append(f"launch {name!r} raised {type(exc).__name__}: {_first_line(exc)}")
                continue
        if not captured:
            errors.append(f"launch {name!r} launched no Triton kernel")
        for specialisation in captured:
            found.setdefault(specialisation, [])
            if name not in found[specialisation]:
                found[specialisation].append(name)
    return found, errors


def _jit_function(module_name: str, qualname: str):
    """The JITFunction module_name.qualname, unwrapped from autotune / heuristics wrappers."""
    import triton

    module = importlib.import_module(module_name)
    for value in vars(module).values():
        while not isinstance(value, triton.runtime.JITFunction) and hasattr(value, "fn"):
            value = value.fn
        if isinstance(value, triton.runtime.JITFunction) and value.fn.__qualname__ == qualname:
            return value
    raise LookupError(f"no @triton.jit function {qualname} at the top level of {module_name}")


def describe(fn, data: dict) -> tuple[str, str, str]:
    """(kernel(pointer element types)[user constexprs; integers specialised as 1], full
    signature, aligned/runtime count) of specialisation data."""
    constants = {tuple(k)[0]: v for k, v in zip(data["constant_keys"], data["constant_vals"])}
    attrs = {tuple(k)[0]: v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    declared, equal_one, args = [], [], []
    runtime = aligned = 0
    for i, param in enumerate(fn.params):
        if i in constants:
            value = constants[i]["constexpr"] if isinstance(constants[i], dict) else constants[i]
            args.append(f"{param.name}={value}")
            (declared if param.is_constexpr else equal_one).append(f"{param.name}={value}")
            continue
        runtime += 1
        hinted = any(attr[0] == "tt.divisibility" and attr[1] == 16 for attr in attrs.get(i, []))
        aligned += hinted
        args.append(f"{param.name}: {data['signature'][param.name]}{' %16' if hinted else ''}")
    pointee = ",".join(dict.fromkeys(t[1:] for t in data["signature"].values() if t.startswith("*")))
    spec = (f"{fn.fn.__name__}({pointee})[{', '.join(declared)}"
            f"{'; ' if equal_one else ''}{', '.join(equal_one)}]")
    return spec, ", ".join(args), f"{aligned}/{runtime}"


# ----------------------------------------------------------------------------- resources

RESOURCE_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# HGMMA / IGMMA / QGMMA: sm_90 warpgroup MMA (the shape varies per tile: the family names it);
# HMMA / IMMA / DMMA: mma.sync, named with its shape (HMMA.16816 fp16/bf16, HMMA.1688 tf32).
SASS_MMA = re.compile(r"\b(?:([HIQ]GMMA)|([HID]MMA)\.(\w+))\.")


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_resources(cubin: bytes) -> tuple[int, int, str]:
    """(registers, stack frame bytes, MMA instructions) of the kernel in a cubin, by the
    bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage, sass = (subprocess.run([_nvidia_tool("cuobjdump"), flag, path], capture_output=True,
                                      text=True, check=True).stdout
                       for flag in ("--dump-resource-usage", "--dump-sass"))
    match = RESOURCE_USAGE.search(usage)
    if match is None:
        raise RuntimeError(f"could not read cuobjdump --dump-resource-usage output:\n{usage}")
    if "Function" not in sass:
        raise RuntimeError(f"cuobjdump --dump-sass printed no function:\n{sass[:2000]}")
    mma = sorted({family or f"{sync}.{shape}" for family, sync, shape in SASS_MMA.findall(sass)})
    return int(match.group(1)), int(match.group(2)), "+".join(mma) or "none"


def ptxas_resources(ptx: str, cap: int, fp_fusion: bool) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) from `ptxas -v` on the PTX,
    with the flags Triton itself passes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               *([] if fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(cap)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    registers = PTXAS_REGISTERS.search(log)
    spills = PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    stack, stores, loads = (int(g) for g in spills.groups())
    return int(registers.group(1)), stack, stores, loads


def resource_cache_dir() -> str:
    """Where the readings of each cubin are kept: $MVCL_FAST_REPORT_CACHE, else
    ~/.cache/mvcl_fast/compile-report."""
    return os.environ.get("MVCL_FAST_REPORT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mvcl_fast", "compile-report")


def cubin_readings(compiled, cap: int) -> dict:
    """registers, stack_frame, spill_stores, spill_loads and mma of a CompiledKernel's cubin.

    Disassembling a large kernel takes seconds even when Triton's cache
    hands back the cubin, so the readings are kept on disk keyed by the cubin's
    hash (they depend on nothing else).
    """
    cubin = compiled.asm["cubin"]
    path = os.path.join(resource_cache_dir(), hashlib.sha256(cubin).hexdigest() + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    registers, stack_frame, mma = cubin_resources(cubin)
    readings = dict(registers=registers, stack_frame=stack_frame, spill_stores=0, spill_loads=0,
                    mma=mma)
    if stack_frame:
        # Spills live in the stack frame: only then is ptxas run again, for the exact bytes.
        fp_fusion = bool(getattr(compiled.metadata, "enable_fp_fusion", True))
        (readings["registers"], readings["stack_frame"], readings["spill_stores"],
         readings["spill_loads"]) = ptxas_resources(compiled.asm["ptx"], cap, fp_fusion)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as f:
        json.dump(readings, f)
    os.replace(f.name, path)  # atomic: parallel workers never read half a file
    return readings


def read_resources(result: CompileResult, compiled, cap: int) -> None:
    """Fill result's shared memory, registers, spills and MMA from a CompiledKernel."""
    result.num_warps = int(compiled.metadata.num_warps)
    result.num_stages = int(compiled.metadata.num_stages)
    result.shared = int(compiled.metadata.shared)
    for name, value in cubin_readings(compiled, cap).items():
        setattr(result, name, value)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ----------------------------------------------------------------------------- compiling

def compile_specialisation(specialisation: Specialisation, module_name: str, arch: str,
                           launches: list[str]) -> CompileResult:
    """Compile one captured specialisation for one architecture, as the JIT would, and read
    its resources."""
    cap = capability(arch)
    data = json.loads(specialisation.data)
    result = CompileResult(module=module_name, kernel=specialisation.kernel,
                           spec=specialisation.kernel, arch=arch,
                           num_warps=data["options"]["num_warps"],
                           num_stages=data["options"]["num_stages"],
                           launches=", ".join(launches), shared_limit=SHARED_LIMIT_BYTES[cap])
    start = time.perf_counter()
    try:
        fn = _jit_function(specialisation.kernel_module, specialisation.kernel)
        result.spec, result.signature, result.aligned = describe(fn, data)
        with target_driver(arch):
            compiled = fn.preload(specialisation.data)
        read_resources(result, compiled, cap)
    except Exception as exc:  # reported per specialisation; the exit status says it failed
        result.error = f"{type(exc).__name__}: {_first_line(exc)}"
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _run_task(task: tuple) -> CompileResult:
    warnings.filterwarnings("ignore", message=FP_FUSION_WARNING)
    module_name, arch, specialisation, launches = task
    return compile_specialisation(specialisation, module_name, arch, launches)


def _failed(module: str, arch: str, error: str, launches: str = "-") -> CompileResult:
    return CompileResult(module=module, kernel="-", spec="-", arch=arch, num_warps=0, num_stages=0,
                         launches=launches, error=error)


def plan(archs, modules) -> tuple[list[tuple], list[CompileResult]]:
    """(compile tasks, failed rows) for every module and arch.

    A module without aot_launches() or whose aot_launches() is empty or raises, a
    launch that raises or launches no kernel, each gives a failed row, so an op
    cannot pass by declaring nothing.
    """
    warnings.filterwarnings("ignore", message=FP_FUSION_WARNING)
    tasks, failed = [], []
    for name in modules:
        if declaration(importlib.import_module(name)) is None:
            failed.extend(_failed(name, arch, "declares no aot_launches()") for arch in archs)
            continue
        for arch in archs:
            found, errors = capture_module(name, arch)
            failed.extend(_failed(name, arch, error) for error in errors)
            tasks.extend((name, arch, s, launches) for s, launches in found.items())
    return tasks, failed


def collect(archs=DEFAULT_ARCHS, modules=None, jobs: int = 1, progress=None) -> list[CompileResult]:
    """Compile every specialisation the modules' launches ask for (those of
    mvcl_fast.tools.aot_launches by default) for every arch; progress(result, number of
    compiles) is called after each."""
    for arch in archs:
        capability(arch)
    modules = declaration_modules() if modules is None else list(modules)
    tasks, results = plan([arch for arch in archs if kernels_built_for(arch)], modules)
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(_run_task(task))
            if progress:
                progress(results[-1], len(tasks))
    else:
        # spawn: fresh interpreters, so no worker inherits a Triton imported in interpreter mode.
        # Workers ignore SIGINT and are terminated if the parent stops early, so an interrupted
        # report leaves no compiler processes behind.
        pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_ignore_sigint)
        try:
            for result in pool.imap(_run_task, tasks):
                results.append(result)
                if progress:
                    progress(result, len(tasks))
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    return sorted(results, key=lambda r: (r.module, r.arch != archs[0], r.kernel, r.spec))


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m mvcl_fast.tools.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS),
                        help="targets to compile for (default: sm_90a sm_80 sm_86 sm_89 sm_75)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU)")
    parser.add_argument("--module", nargs="+", metavar="NAME",
                        help="import these modules, each declaring aot_launches(), instead of "
                             "those of mvcl_fast.tools.aot_launches")
    parser.add_argument("--markdown-table", nargs="+", metavar="JSON",
                        help="compile nothing: print docs/benchmarks.md's markdown summary of these --json "
                             "reports (one per Triton, the first's MMA instructions shown)")
    args = parser.parse_args(argv)
    if args.markdown_table:
        reports = []
        for path in args.markdown_table:
            try:
                with open(path) as f:
                    reports.append(json.load(f))
            except (OSError, ValueError) as exc:
                parser.error(f"--markdown-table: cannot read {path}: {exc}")
        print(markdown_table(reports, args.arch[0]))
        return 0
    for arch in args.arch:
        try:
            capability(arch)
        except ValueError as exc:
            parser.error(f"--arch: {exc}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported
    import triton

    start = time.perf_counter()
    modules = args.module if args.module else declaration_modules()
    sources = {name: declaration(importlib.import_module(name)) for name in modules}
    print(f"triton {triton.__version__}; archs {', '.join(map(describe_arch, args.arch))}; modules: "
          + (", ".join(f"{m} ({s or 'declares nothing'})" for m, s in sources.items()) or "(none)"),
          flush=True)
    done = []

    def progress(result, total):  # on stderr, so a slow cold compile shows where it is
        done.append(result)
        print(f"[{len(done)}/{total}] {result.arch} {result.spec} {result.seconds:.1f} s"
              f"{'' if result.ok else ' FAILED'}", file=sys.stderr, flush=True)

    results = collect(args.arch, modules, jobs=args.jobs, progress=progress)
    print(format_table(results))
    print(f"\n{summary(results, [a for a in args.arch if not kernels_built_for(a)])}\n{len(results)} compiles in {time.perf_counter() - start:.0f} s "
          f"({args.jobs} jobs), {sum(not r.ok for r in results)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "archs": list(args.arch),
                       "reference_archs": [a for a in args.arch if not kernels_built_for(a)],
                       "modules": modules,
                       "sources": sources,
                       "results": [dict(asdict(r), spills=r.spills, ok=r.ok) for r in results]},
                      f, indent=1)
    compiled = any(kernels_built_for(arch) for arch in args.arch)
    return 1 if any(not r.ok for r in results) or (compiled and not results) else 0


if __name__ == "__main__":
    sys.exit(main())
