"""The AOT compile report: every kernel specialisation the JIT launches compiles for sm_90a and
sm_80 with 0 spills and shared memory within the limit, under the Triton of this environment and
under the Python of every other environment named in MVCL_FAST_REPORT_PYTHONS
(os.pathsep-separated; `make test` names .venv36's, which has triton 3.6.0, the GPU machine's).

The report runs in a subprocess with TRITON_INTERPRET removed from its
environment: this suite sets it on CPU, and @triton.jit functions created
under the interpreter cannot be compiled.
"""
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

import mvcl_fast.kernels  # noqa: E402
import mvcl_fast.tools.aot_launches  # noqa: E402

# sm_90a and sm_80 here: a cold compile of every specialisation takes minutes per target on 2
# cores (Triton's cache makes reruns fast). `make report-all` gates sm_86 and sm_89 as well.
ARCHS = ["sm_90a", "sm_80"]
SHARED_LIMIT_KIB = {"sm_90a": 227, "sm_80": 163}  # per-block opt-in maximum of each target
OTHER_PYTHONS = [p for p in os.environ.get("MVCL_FAST_REPORT_PYTHONS", "").split(os.pathsep) if p]
PYTHONS = [pytest.param(sys.executable, id="this-env")] + [
    pytest.param(p, id=os.path.basename(os.path.dirname(os.path.dirname(p))) or p)
    for p in OTHER_PYTHONS]


def run_report(python, tmp_path, *args, pythonpath=None):
    if not os.access(python, os.X_OK):
        pytest.fail(f"MVCL_FAST_REPORT_PYTHONS names {python}, which is not an executable "
                    "(make install36 builds .venv36)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [python, "-m", "mvcl_fast.tools.report", "--jobs", str(os.cpu_count() or 1),
         "--json", str(out), *args],
        env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"the report wrote no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def declared_ops():
    """The modules of mvcl_fast.tools.aot_launches, one per op."""
    return sorted(m.name for m in pkgutil.iter_modules(mvcl_fast.tools.aot_launches.__path__))


def kernels_of_every_file():
    """{kernel file: names of its @triton.jit kernels}: every @triton.jit function of
    mvcl_fast.kernels that no other one calls (a helper is compiled inside its callers)."""
    jitted = {}
    for info in pkgutil.iter_modules(mvcl_fast.kernels.__path__):
        module = importlib.import_module(f"mvcl_fast.kernels.{info.name}")
        jitted[info.name] = {name: inspect.getsource(obj.fn) for name, obj in vars(module).items()
                             if hasattr(obj, "arg_names") and obj.fn.__module__ == module.__name__}
    sources = {name: src for functions in jitted.values() for name, src in functions.items()}
    called = {name for name in sources
              if any(re.search(rf"\b{name}\(", src) for other, src in sources.items() if other != name)}
    return {file: set(functions) - called for file, functions in jitted.items()}


@pytest.mark.parametrize("python", PYTHONS)
def test_every_launched_specialisation_compiles_without_spills(python, tmp_path):
    proc, report = run_report(python, tmp_path, "--arch", *ARCHS)
    table = proc.stdout
    assert sorted(m.rsplit(".", 1)[-1] for m in report["modules"]) == declared_ops(), report["modules"]
    rows = report["results"]
    compiled_kernels = {r["kernel"] for r in rows if r["spec"] != "-"}
    kernels = kernels_of_every_file()
    # Each op's declaration is named after its launcher module; the three ops have 16 kernels.
    assert set(declared_ops()) <= set(kernels) and sum(map(len, kernels.values())) == 16, kernels
    for file, names in kernels.items():
        assert names <= compiled_kernels, (
            f"kernels of kernels/{file}.py that no AOT launch launches: {sorted(names - compiled_kernels)}")
    for module in report["modules"]:
        for arch in ARCHS:
            compiled = [r for r in rows if r["module"] == module and r["arch"] == arch and r["spec"] != "-"]
            assert compiled, f"{module} ({report['sources'][module]}) compiled nothing for {arch}:\n{table}"
    problems = []
    for r in rows:
        where = f"{r['spec']} ({r['module']}, {r['arch']}, launched by {r['launches']})"
        if r["error"]:
            problems.append(f"{where} failed: {r['error']}")
        elif r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{where} spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                            f"({r['registers']} registers)")
        elif not 0 <= r["shared"] <= SHARED_LIMIT_KIB[r["arch"]] * 1024:
            problems.append(f"{where} needs {r['shared']} B of shared memory > "
                            f"{SHARED_LIMIT_KIB[r['arch']]} KiB")
    assert not problems, (f"triton {report['triton']}: {len(problems)} of {len(rows)} compiles fail:\n"
                          + "\n".join(problems))
    assert proc.returncode == 0, table + proc.stderr


# The matmul tile both probe modules compile, where their source says TILE_PRODUCT (each
# decorates it its own way).
TILE_PRODUCT = '''\
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
'''


def probe_module(source: str) -> str:
    return textwrap.dedent(source.replace("    TILE_PRODUCT\n", TILE_PRODUCT))


PROBE_LAUNCHES = probe_module('''
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def copy_rows(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs * stride, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    def _small_tiles(configs, named_args, **kwargs):
        return [c for c in configs if c.kwargs["BM"] <= 128]

    @triton.autotune(configs=[triton.Config({"BM": bm}, num_warps=w) for bm, w in ((64, 4), (128, 8), (256, 8))],
                     key=["K"], prune_configs_by={"early_config_prune": _small_tiles})
    @triton.jit
    TILE_PRODUCT

    def aot_launches():
        x = torch.empty(65)

        def copies():
            copy_rows[(1,)](x[:64], x, 64, 1, BLOCK=64)   # aligned, n % 16 == 0, stride == 1
            copy_rows[(1,)](x[1:], x, 63, 3, BLOCK=64)    # x_ptr 4 bytes off; no integer hints

        def product():
            a, b = torch.empty(256, 64, dtype=torch.float16), torch.empty(64, 64, dtype=torch.float16)
            tile_product[(1,)](a, b, torch.empty(256, 64), 64, BN=64, BK=32)

        def broken():
            raise ValueError("bad shape")

        return [("copies", copies), ("product", product), ("nothing", lambda: None), ("broken", broken)]
''')


@pytest.mark.parametrize("python", PYTHONS)
def test_report_compiles_the_specialisations_and_configs_launches_ask_for(python, tmp_path):
    (tmp_path / "probe_launches.py").write_text(PROBE_LAUNCHES)
    (tmp_path / "probe_no_launch.py").write_text("def aot_launches():\n    return []\n")
    proc, report = run_report(python, tmp_path, "--arch", "sm_90a", "sm_80",
                              "--module", "probe_launches", "probe_no_launch", pythonpath=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert report["sources"] == {"probe_launches": "aot_launches", "probe_no_launch": "aot_launches"}
    rows = report["results"]
    for arch in ("sm_90a", "sm_80"):
        copies = {r["signature"]: r for r in rows if r["kernel"] == "copy_rows" and r["arch"] == arch}
        assert set(copies) == {
            "x_ptr: *fp32 %16, y_ptr: *fp32 %16, n: i32 %16, stride=1, BLOCK=64",
            "x_ptr: *fp32, y_ptr: *fp32 %16, n: i32, stride: i32, BLOCK=64"}, copies
        assert all(r["ok"] and r["mma"] == "none" and r["launches"] == "copies" for r in copies.values())
        # the autotuner's pruned configs, each compiled; BM=256 was pruned
        products = {r["spec"]: r for r in rows if r["kernel"] == "tile_product" and r["arch"] == arch}
        assert sorted(products) == ["tile_product(fp16,fp32)[BM=128, BN=64, BK=32]",
                                    "tile_product(fp16,fp32)[BM=64, BN=64, BK=32]"], products
        assert {r["num_warps"] for r in products.values()} == {4, 8}
        expected_mma = "HGMMA" if arch == "sm_90a" else "HMMA.16816"
        assert all(r["ok"] and r["mma"] == expected_mma for r in products.values()), products
        errors = sorted(r["error"] for r in rows if r["arch"] == arch and r["spec"] == "-")
        assert errors == ["aot_launches() returned no launch",
                          "launch 'broken' raised ValueError: bad shape",
                          "launch 'nothing' launched no Triton kernel"], errors
    assert "HGMMA" in proc.stdout and "FAILED sm_80 probe_launches - (-): launch 'broken'" in proc.stdout


PROBE_RESOURCES = probe_module('''
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    TILE_PRODUCT

    def product(bm, bn, bk, **options):
        def launch():
            a, b = torch.empty(bm, bk, dtype=torch.float16), torch.empty(bk, bn, dtype=torch.float16)
            tile_product[(1,)](a, b, torch.empty(bm, bn), bk, BM=bm, BN=bn, BK=bk, **options)
        return launch

    def aot_launches():
        return [
            ("fits", product(64, 64, 32, num_warps=4, num_stages=2)),
            # a 128x128 fp32 accumulator over one warp needs 512 registers per thread
            ("spills", product(128, 128, 32, num_warps=1, num_stages=2)),
            # two 128x256 fp16 tiles per stage, two stages buffered: 256 KiB
            ("too_much_smem", product(128, 128, 256, num_warps=8, num_stages=3)),
        ]
''')


@pytest.mark.parametrize("python", PYTHONS)
def test_report_flags_spills_shared_memory_and_modules_declaring_nothing(python, tmp_path):
    (tmp_path / "probe_kernels.py").write_text(PROBE_RESOURCES)
    (tmp_path / "probe_undeclared.py").write_text("LAUNCHES = []\n")
    proc, report = run_report(python, tmp_path, "--arch", "sm_90a", "--module", "probe_kernels",
                              "probe_undeclared", pythonpath=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {(r["module"], r["launches"]): r for r in report["results"]}
    fits = rows["probe_kernels", "fits"]
    assert fits["ok"] and fits["registers"] > 0 and fits["shared"] > 0 and fits["mma"] == "HGMMA", fits
    spills = rows["probe_kernels", "spills"]
    assert not spills["ok"] and spills["spill_stores"] > 0, spills
    smem = rows["probe_kernels", "too_much_smem"]
    assert not smem["ok"] and smem["shared"] > smem["shared_limit"] == 227 * 1024, smem
    undeclared = rows["probe_undeclared", "-"]
    assert not undeclared["ok"] and "declares no aot_launches()" in undeclared["error"], undeclared
    assert "SPILLS" in proc.stdout and "SMEM>LIMIT" in proc.stdout


def test_markdown_table_summarises_reports_of_two_tritons(tmp_path):
    """--markdown-table compiles nothing: it folds --json reports into docs/benchmarks.md's table."""
    def row(kernel, mma, launches, spill=0):
        return {"module": "mvcl_fast.kernels.k", "kernel": kernel, "arch": "sm_90a", "mma": mma,
                "launches": launches, "spills": spill, "spill_stores": spill, "spill_loads": spill,
                "ok": not spill}

    new = {"triton": "3.9.0", "results": [row("_a", "HGMMA", "k[x,bf16], k[y,fp16]"),
                                          row("_a", "HMMA.16816+HGMMA", "k[z,bf16]"),
                                          row("_a", "none", "k[x,fp32]")]}
    old = {"triton": "3.6.0", "results": [row("_a", "HGMMA", "k[x,bf16]", spill=8)] + new["results"][1:]}
    paths = []
    for name, report in (("new", new), ("old", old)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    proc = subprocess.run([sys.executable, "-m", "mvcl_fast.tools.report", "--markdown-table",
                           *map(str, paths)], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr
    assert "| k | `a` | 3 | none / - / HGMMA / HGMMA+HMMA.16816 | 0 of 3 | 1 of 3, 16 |" in proc.stdout
    assert "triton 3.9.0: 3 compiles, 0 fail; triton 3.6.0: 3 compiles, 1 fail." in proc.stdout
