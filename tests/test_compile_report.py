"""The AOT compile report: every kernel config compiles for sm_90a with 0 spills.

The report runs in a subprocess with TRITON_INTERPRET removed from its
environment: this suite sets it on CPU, and @triton.jit functions created
under the interpreter cannot be compiled.
"""
import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import mvcl_fast.kernels

pytest.importorskip("triton")

# sm_90a only here: a cold compile of every spec takes minutes per target on 2 cores (the
# Triton cache makes reruns fast). `python -m mvcl_fast.kernels.report` compiles sm_90a and sm_80.
ARCHS = ["sm_90a"]
SHARED_LIMIT_KIB = {"sm_90a": 227, "sm_80": 163}  # per-block opt-in maximum of each target
NOT_KERNEL_FILES = {"aot", "report"}


def run_report(tmp_path, *args, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mvcl_fast.kernels.report", "--jobs", str(os.cpu_count() or 1),
         "--json", str(out), *args],
        env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"the report wrote no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def kernel_files():
    return sorted(m.name for m in pkgutil.iter_modules(mvcl_fast.kernels.__path__)
                  if m.name not in NOT_KERNEL_FILES and not m.name.startswith("_"))


def test_every_kernel_config_compiles_without_spills(tmp_path):
    files = kernel_files()
    if not files:
        pytest.skip("no kernel files in kernels/ yet")
    proc, report = run_report(tmp_path, "--arch", *ARCHS)
    table = proc.stdout
    assert sorted(m.rsplit(".", 1)[-1] for m in report["modules"]) == files, (
        f"kernel files without aot_specs(): {sorted(set(files) - {m.rsplit('.', 1)[-1] for m in report['modules']})}")
    rows = report["results"]
    for module in report["modules"]:
        specs = {r["spec"] for r in rows if r["module"] == module and r["spec"] != "-"}
        assert specs, f"{module}.aot_specs() declares no kernel:\n{table}"
        for arch in ARCHS:
            compiled = {r["spec"] for r in rows if r["module"] == module and r["arch"] == arch}
            assert compiled == specs, f"{module}: not every spec was compiled for {arch}"
    problems = []
    for r in rows:
        where = f"{r['spec']} ({r['module']}, {r['arch']})"
        if r["error"]:
            problems.append(f"{where} failed to compile: {r['error']}")
        elif r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{where} spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                            f"({r['registers']} registers)")
        elif not 0 <= r["shared"] <= SHARED_LIMIT_KIB[r["arch"]] * 1024:
            problems.append(f"{where} needs {r['shared']} B of shared memory > "
                            f"{SHARED_LIMIT_KIB[r['arch']]} KiB")
    assert not problems, f"{len(problems)} of {len(rows)} compiles fail:\n" + "\n".join(problems)
    assert proc.returncode == 0, table + proc.stderr


PROBE_KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl
    from mvcl_fast.kernels.aot import KernelSpec

    @triton.jit
    def tile_product(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.arange(0, BM)
        rn = tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)

    SIG = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32"}

    def aot_specs():
        return [
            KernelSpec("fits", tile_product, SIG, {"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=2),
            # a 128x128 fp32 accumulator over one warp needs 512 registers per thread
            KernelSpec("spills", tile_product, SIG, {"BM": 128, "BN": 128, "BK": 32}, num_warps=1,
                       num_stages=2),
            # two 128x256 fp16 tiles per stage, two stages buffered: 256 KiB
            KernelSpec("too_much_smem", tile_product, SIG, {"BM": 128, "BN": 128, "BK": 256},
                       num_warps=8, num_stages=3),
        ]
''')


def test_report_flags_spills_shared_memory_and_empty_modules(tmp_path):
    (tmp_path / "probe_kernels.py").write_text(PROBE_KERNELS)
    (tmp_path / "probe_empty.py").write_text("def aot_specs():\n    return []\n")
    proc, report = run_report(tmp_path, "--arch", "sm_90a", "--module", "probe_kernels", "probe_empty",
                              pythonpath=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {(r["module"], r["spec"]): r for r in report["results"]}
    fits = rows["probe_kernels", "fits"]
    assert fits["ok"] and fits["registers"] > 0 and fits["shared"] > 0, fits
    spills = rows["probe_kernels", "spills"]
    assert not spills["ok"] and spills["spill_stores"] > 0, spills
    smem = rows["probe_kernels", "too_much_smem"]
    assert not smem["ok"] and smem["shared"] > smem["shared_limit"] == 227 * 1024, smem
    empty = rows["probe_empty", "-"]
    assert not empty["ok"] and "no KernelSpec" in empty["error"], empty
    assert "SPILLS" in proc.stdout and "SMEM>LIMIT" in proc.stdout
