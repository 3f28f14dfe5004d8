"""Ahead-of-time compile report: registers, spills and shared memory of every kernel config.

    python -m mvcl_fast.kernels.report [--arch sm_90a sm_80] [--json PATH] [--jobs N]

Every module of mvcl_fast.kernels that has ``aot_specs()`` is imported and each
KernelSpec is compiled with ``triton.compile`` for a ``GPUTarget`` of the given
architecture: no GPU is needed. Registers and the stack frame are read off the
cubin (with the cuobjdump that ships with Triton); where the stack frame is not
empty, the bundled ptxas is run with ``-v`` on Triton's PTX (with Triton's own
flags) for the exact spill bytes. Shared memory is Triton's own figure (the dynamic
shared memory the launch asks for). Exit status 1 when a spec fails to
compile, spills, or asks for more shared memory than one block may use.

Triton's interpreter (TRITON_INTERPRET=1, which the CPU test suite sets) turns
@triton.jit functions into interpreted ones that cannot be compiled, so this
module removes the variable before Triton is imported; the kernel modules must
be imported in a process where it was never set (the CLI and its worker
processes are).
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

KERNEL_PACKAGE = "mvcl_fast.kernels"
NOT_KERNEL_MODULES = {"aot", "report"}
DEFAULT_ARCHS = ("sm_90a", "sm_80")
# Largest dynamic shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# the SM has 228 KiB (sm_90) / 164 KiB (sm_80), of which 1 KiB per block is reserved by the system.
SHARED_LIMIT_BYTES = {90: 227 * 1024, 80: 163 * 1024}


@dataclass
class CompileResult:
    module: str
    kernel: str             # the @triton.jit function's name
    spec: str               # KernelSpec.name
    arch: str               # "sm_90a" / "sm_80"
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_stores: int = -1  # bytes
    spill_loads: int = -1   # bytes
    stack_frame: int = -1   # bytes
    shared: int = -1        # bytes of dynamic shared memory
    shared_limit: int = 0
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
        raise ValueError(f"unsupported arch {arch!r}: use one of sm_90a, sm_80")
    return int(match.group(1))


def kernel_modules() -> list[str]:
    """Names of the modules of mvcl_fast.kernels that declare aot_specs()."""
    package = importlib.import_module(KERNEL_PACKAGE)
    names = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in NOT_KERNEL_MODULES or info.name.startswith("_"):
            continue
        name = f"{KERNEL_PACKAGE}.{info.name}"
        if hasattr(importlib.import_module(name), "aot_specs"):
            names.append(name)
    return names


def module_specs(module_name: str) -> list:
    return list(importlib.import_module(module_name).aot_specs())


def full_signature(spec) -> tuple[dict, dict]:
    """(signature over every argument in order, attrs) for triton.compiler.ASTSource.

    Constexpr arguments are typed "constexpr"; pointer arguments get the
    16-byte divisibility hint Triton's launcher gives aligned tensors (every
    fresh torch allocation). Integer arguments get no hint: this is the
    specialization a launch gets for sizes and strides that are not multiples
    of 16 (multiples of 16 compile another one, with wider loads).
    """
    fn = spec.fn
    arg_names = list(fn.arg_names)
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(arg_names)
    if unknown:
        raise ValueError(f"{spec.name}: {sorted(unknown)} are not arguments of {fn.__name__}")
    missing = [a for a in arg_names if a not in spec.signature and a not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.name}: arguments {missing} are neither in signature nor constexprs")
    signature = {a: ("constexpr" if a in spec.constexprs else spec.signature[a]) for a in arg_names}
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, a in enumerate(arg_names) if signature[a].startswith("*")}
    return signature, attrs


RESOURCE_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes) of the kernel in a cubin, by the bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    match = RESOURCE_USAGE.search(out)
    if match is None:
        raise RuntimeError(f"could not read cuobjdump --dump-resource-usage output:\n{out}")
    return int(match.group(1)), int(match.group(2))


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


def compile_spec(spec, module_name: str, arch: str) -> CompileResult:
    """Compile one KernelSpec for one architecture and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cap = capability(arch)
    result = CompileResult(module=module_name, kernel=getattr(spec.fn, "__name__", "?"),
                           spec=spec.name, arch=arch, num_warps=spec.num_warps,
                           num_stages=spec.num_stages, shared_limit=SHARED_LIMIT_BYTES[cap])
    start = time.perf_counter()
    try:
        if not isinstance(spec.fn, triton.runtime.JITFunction):
            raise TypeError(
                f"{spec.name}: fn is {type(spec.fn).__name__}, not a @triton.jit function (was the "
                "module imported with TRITON_INTERPRET=1? run the report in a fresh process)")
        signature, attrs = full_signature(spec)
        source = ASTSource(fn=spec.fn, signature=signature, constexprs=dict(spec.constexprs),
                           attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", cap, 32),
                                  options={"num_warps": spec.num_warps,
                                           "num_stages": spec.num_stages})
        result.shared = int(compiled.metadata.shared)
        result.registers, result.stack_frame = cubin_resources(compiled.asm["cubin"])
        result.spill_stores = result.spill_loads = 0
        if result.stack_frame:
            # Spills live in the stack frame: only then is ptxas run again, for the exact bytes.
            fp_fusion = bool(getattr(compiled.metadata, "enable_fp_fusion", True))
            (result.registers, result.stack_frame, result.spill_stores,
             result.spill_loads) = ptxas_resources(compiled.asm["ptx"], cap, fp_fusion)
    except Exception as exc:  # reported per spec; the exit status says it failed
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _compile_task(task: tuple[str, int, str]) -> CompileResult:
    module_name, index, arch = task
    spec = module_specs(module_name)[index]
    return compile_spec(spec, module_name, arch)


def collect(archs=DEFAULT_ARCHS, modules=None, jobs: int = 1, progress=None) -> list[CompileResult]:
    """Compile every spec of every kernel module for every arch; results in a stable order.

    A module whose aot_specs() is empty (or raises) gives one failed row, so a
    kernel file that forgets to declare its kernels cannot pass unnoticed.
    """
    for arch in archs:
        capability(arch)
    modules = kernel_modules() if modules is None else list(modules)
    results, tasks = [], []
    for name in modules:
        try:
            specs = module_specs(name)
        except Exception as exc:
            specs, error = [], f"aot_specs() raised {type(exc).__name__}: {exc}"
        else:
            error = "aot_specs() returned no KernelSpec"
        if not specs:
            results.extend(CompileResult(module=name, kernel="-", spec="-", arch=a, num_warps=0,
                                         num_stages=0, error=error) for a in archs)
        tasks.extend((name, i, arch) for i in range(len(specs)) for arch in archs)
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(_compile_task(task))
            if progress:
                progress(results[-1])
    else:
        # spawn: fresh interpreters, so no worker inherits a Triton imported in interpreter mode.
        # Workers ignore SIGINT and are terminated if the parent stops early, so an interrupted
        # report leaves no compiler processes behind.
        pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_ignore_sigint)
        try:
            for result in pool.imap(_compile_task, tasks):
                results.append(result)
                if progress:
                    progress(result)
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    return results


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def problems(r: CompileResult) -> list[str]:
    if r.error:
        return [r.error]
    found = ["SPILLS"] if r.spills else []
    return found + (["SMEM>LIMIT"] if r.shared > r.shared_limit else [])


def format_table(results: list[CompileResult]) -> str:
    header = ("module", "spec", "arch", "warps", "stages", "regs", "spill B", "stack B",
              "smem KiB", "limit KiB", "s", "status")
    rows = []
    for r in results:
        status = "ok" if r.ok else " ".join(problems(r))
        rows.append((r.module.rsplit(".", 1)[-1], r.spec, r.arch, str(r.num_warps), str(r.num_stages),
                     str(r.registers), str(r.spills), str(r.stack_frame),
                     f"{r.shared / 1024:.1f}" if r.shared >= 0 else "-",
                     f"{r.shared_limit / 1024:.0f}", f"{r.seconds:.1f}", status))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvcl_fast.kernels.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS),
                        help="targets to compile for (default: sm_90a sm_80)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU)")
    parser.add_argument("--module", nargs="+", metavar="NAME",
                        help="import these modules instead of discovering mvcl_fast.kernels.*")
    args = parser.parse_args(argv)

    import triton

    modules = args.module if args.module else kernel_modules()
    print(f"triton {triton.__version__}; archs {' '.join(args.arch)}; modules: "
          f"{', '.join(modules) if modules else '(none with aot_specs)'}", flush=True)
    results = collect(args.arch, modules, jobs=args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiles, {len(failed)} failed"
          + ("" if not failed else ": " + "; ".join(f"{r.spec} {r.arch}" for r in failed)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "archs": list(args.arch), "modules": modules,
                       "results": [dict(asdict(r), spills=r.spills, ok=r.ok) for r in results]},
                      f, indent=1)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
