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


# The phases' limits are sized for the H200; this runner's 2 cores may be shared with other work.
ROOMY_LIMITS = {"GPU_CHECK_TOTAL_S": "900", "GPU_CHECK_INSTALL_S": "90", "GPU_CHECK_WARM_S": "200",
                "GPU_CHECK_HEADLINE_S": "200", "GPU_CHECK_RENDER_S": "60"}


def gpu_check(out: Path, *args: str, **limits: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1", **limits}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def measured(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [line["benchmark"]["extra_info"] for line in lines if "benchmark" in line]


def test_dry_run_writes_every_output(tmp_path):
    proc = gpu_check(tmp_path, "--tune", **ROOMY_LIMITS)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for name in ("gpu_check.log", "results.jsonl", "bench.json", "results.md", "speedup.png",
                 "junit.xml", "autotune.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert ("time budget (full, tune, limits in order): 900s in all, install 90s, warm 200s, "
            "headline 200s, render 60s, bench_suites ") in output
    assert "warm: ok in" in output and "tests: ok in" in output and "all phases passed" in output
    assert (tmp_path / "autotune.log").read_text().startswith(
        "# each case's printed output (MVCL_FAST_AUTOTUNE='1'")

    cases = measured(tmp_path)
    for name in HEADLINES:
        assert any(c.get("headline") == name and c["provider"] == "fused" for c in cases), name
    # the headline cases measured first, in the order; then the other cases
    headline_order = [c["headline"] for c in cases if c.get("headline")]
    assert sorted(set(headline_order), key=headline_order.index) == list(HEADLINES)
    first_other = next(i for i, c in enumerate(cases) if not c.get("headline"))
    assert all(not c.get("headline") for c in cases[first_other:])

    merged = json.loads((tmp_path / "bench.json").read_text())
    assert len(merged["benchmarks"]) == len(cases) and merged["mvcl_fast"]["dry_run"] is True
    results = (tmp_path / "results.md").read_text()
    assert "DRY RUN" in results and "Headline cases (timed first):" in results and "Other cases:" in results
    assert int(ElementTree.parse(tmp_path / "junit.xml").getroot()[0].get("tests")) > 0


def test_quick_budget_and_no_phase_past_the_deadline(tmp_path):
    proc = gpu_check(tmp_path, "--quick", GPU_CHECK_TOTAL_S="20")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ("time budget (quick, limits in order): 20s in all, install 30s, warm 50s, headline 120s, "
            "render 15s\n") in proc.stdout
    assert "the phase limits (215 s) exceed the total (20 s)" in proc.stdout
    for name in ("install", "warm", "headline", "render"):
        assert f"] {name}: SKIPPED" in proc.stdout, name
    assert ": start" not in proc.stdout
    assert "FAILED after" in proc.stdout


@pytest.mark.parametrize("args, env, message", [
    (["--fast"], {}, "unknown argument '--fast'"),
    ([], {"GPU_CHECK_WARM_S": "1.5"}, "GPU_CHECK_WARM_S='1.5': expected whole seconds"),
])
def test_bad_arguments_are_refused(tmp_path, args, env, message):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args],
                          env={**os.environ, "OUT": str(tmp_path), **env}, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr
