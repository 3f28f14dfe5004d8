"""benchmarks/gpu_check.sh end to end on the CPU: its dry run (GPU_CHECK_ALLOW_CPU=1: tiny shapes,
the fused kernels through Triton's interpreter, one round each) writes every output file."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The headline cases, in the order gpu_check.sh measures them.
HEADLINES = ("prototype_infonce N=1024", "prototype_infonce N=65536", "multiview_infonce N=4096",
             "daf_attention MIntRec", "train_step MIntRec")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a dry run of the CPU: on a GPU gpu_check.sh runs for real")


def gpu_check(out: Path, *args: str) -> str:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1",
           # the phases' limits are sized for the H200; this runner's 2 cores are shared
           "GPU_CHECK_INSTALL_S": "90", "GPU_CHECK_RENDER_S": "60"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def measured(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [line["benchmark"]["extra_info"] for line in lines if "benchmark" in line]


def test_dry_run_writes_every_output(tmp_path):
    output = gpu_check(tmp_path)
    for name in ("gpu_check.log", "results.jsonl", "bench.json", "results.md", "speedup.png", "junit.xml"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "time budget (full, limits in order): 470s in all, install 90s, warm 90s" in output
    assert "warm: ok in" in output and "tests: ok in" in output

    cases = measured(tmp_path)
    headline_order = [c["headline"] for c in cases if c.get("headline")]
    for name in HEADLINES:
        assert any(c.get("headline") == name and c["provider"] == "fused" for c in cases), name
    # measured first, in the order; then the other cases
    assert sorted(set(headline_order), key=headline_order.index) == list(HEADLINES)
    first_other = next(i for i, c in enumerate(cases) if not c.get("headline"))
    assert all(not c.get("headline") for c in cases[first_other:])

    merged = json.loads((tmp_path / "bench.json").read_text())
    assert len(merged["benchmarks"]) == len(cases) and merged["mvcl_fast"]["dry_run"] is True
    results = (tmp_path / "results.md").read_text()
    assert "DRY RUN" in results and "Headline cases (timed first):" in results and "Other cases:" in results
    assert int(ElementTree.parse(tmp_path / "junit.xml").getroot()[0].get("tests")) > 0


def test_quick_tune_dry_run_keeps_the_warm_up_output(tmp_path):
    output = gpu_check(tmp_path, "--quick", "--tune")
    assert "time budget (quick, tune, limits in order): 230s in all" in output
    assert "bench_suites: start" not in output and "tests: start" not in output
    assert (tmp_path / "autotune.log").read_text().startswith("# each case's printed output "
                                                               "(MVCL_FAST_AUTOTUNE='1'")
    assert {c.get("headline") for c in measured(tmp_path)} == set(HEADLINES)
