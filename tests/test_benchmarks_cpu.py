"""Smoke tests of the benchmark tooling that need no GPU: render.py, the targets, gpu_check.sh."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
import render  # noqa: E402


def bench(op, shape, provider, median_s, **extra):
    return {"name": f"test_{op}[{provider}]", "stats": {"median": median_s},
            "extra_info": {"op": op, "shape": shape, "provider": provider, **extra}}


def fake_results(device="NVIDIA H100 80GB HBM3"):
    return {
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            bench("prototype_infonce", "N=1024 C=20 D=768", "eager", 0.010, x=1024, x_label="N",
                  series="C=20", peak_mib=300.0),
            bench("prototype_infonce", "N=1024 C=20 D=768", "compile", 0.004, x=1024, x_label="N",
                  series="C=20", peak_mib=200.0),
            bench("prototype_infonce", "N=1024 C=20 D=768", "fused", 0.001, x=1024, x_label="N",
                  series="C=20", peak_mib=20.0, floor_ms=0.25),
            bench("prototype_infonce", "N=32 C=20 D=768", "eager", 0.002, x=32, x_label="N", series="C=20"),
            bench("prototype_infonce", "N=32 C=20 D=768", "fused", 0.0005, x=32, x_label="N", series="C=20"),
        ],
        "mvcl_fast": {"device": device, "dtype": "bfloat16",
                      "card": {"name": "H100 SXM", "bandwidth": 3.35e12, "bf16_flops": 989e12},
                      "targets": [{"op": "prototype_infonce", "shape": "N=1024 C=20 D=768",
                                   "target": ">= 5.0x eager", "pass": True, "detail": "10.00x"}],
                      "skipped": [{"op": "multiview_infonce", "shape": "N=65536 V=4 D=768",
                                   "provider": "eager", "reason": "~192 GiB > the 40 GiB limit"}]},
    }


def test_render_table_ratios_floor_and_doc(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(fake_results()))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\noutro\n")
    md, png = tmp_path / "results.md", tmp_path / "speedup.png"
    assert render.main([str(path), "--md", str(md), "--png", str(png), "--doc", str(readme)]) == 0
    table = md.read_text()
    assert "| prototype_infonce | N=1024 C=20 D=768 | fused | 1.000 | 20.0 | 10.00 | 4.00 | 25.0 |" in table
    assert "| prototype_infonce | N=1024 C=20 D=768 | compile | 4.000 | 200.0 | 2.50 | 1.00 | - |" in table
    lines = table.splitlines()
    # rows ordered by batch size, fused first within a shape
    assert lines.index(next(l for l in lines if "N=32 C=20 D=768 | fused" in l)) < \
        lines.index(next(l for l in lines if "N=1024 C=20 D=768 | fused" in l))
    assert "pass: prototype_infonce N=1024 C=20 D=768: >= 5.0x eager (10.00x)" in table
    assert "~192 GiB > the 40 GiB limit" in table
    text = readme.read_text()
    assert text.startswith("intro\n<!-- bench:start -->\nDevice: ") and text.endswith("<!-- bench:end -->\noutro\n")
    assert "old table" not in text
    assert png.stat().st_size > 10_000


def test_render_merges_suites(tmp_path):
    first, second = fake_results(), fake_results()
    second["benchmarks"] = [bench("daf_attention", "Lk=80", "fused", 0.001, x=80, x_label="Lk")]
    second["mvcl_fast"]["targets"] = []
    paths = []
    for i, data in enumerate((first, second)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(data))
    merged = tmp_path / "bench.json"
    render.main([str(p) for p in paths] + ["--merged", str(merged), "--md", str(tmp_path / "r.md")])
    data = json.loads(merged.read_text())
    assert len(data["benchmarks"]) == 6
    assert len(data["mvcl_fast"]["targets"]) == 1 and len(data["mvcl_fast"]["skipped"]) == 2


def test_render_refuses_a_doc_without_markers(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(fake_results()))
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        render.main([str(path), "--doc", str(readme)])
    assert readme.read_text() == "no markers\n"


def test_render_structure_counts_into_their_markers(tmp_path):
    counts = dict(op="multiview_infonce", shape="N=256 V=4 D=128 symmetric bf16", launches=5,
                  triton_launches=4, syncs=0, bytes=2060, bytes_floor=1000, bytes_over_floor=2.06,
                  macs=1, eager_launches=74, eager_syncs=0, kernels=[], backward_units=4.0)
    path = tmp_path / "structure.json"
    path.write_text(json.dumps({"benchmarks": [{"name": "s", "stats": {"median": 1.0},
                                                "extra_info": counts}]}))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("a\n<!-- structure:start -->\nold\n<!-- structure:end -->\nb\n")
    assert render.main([str(path), "--doc", str(doc), "--md", str(tmp_path / "s.md")]) == 0
    assert doc.read_text() == (
        "a\n<!-- structure:start -->\n| op | shape | launches (Triton + aten) | host syncs | "
        "Triton bytes / floor | eager reference: launches, syncs |\n"
        "| --- | --- | ---: | ---: | ---: | ---: |\n"
        "| `multiview_infonce` | N=256 V=4 D=128 symmetric bf16 (backward 4.0 units of V N^2 D) "
        "| 5 (4 + 1) | 0 | 2.06x | 74, 0 |\n<!-- structure:end -->\nb\n")


def test_render_the_training_step_into_its_markers(tmp_path):
    counts = dict(step="train_step B=16", device="cpu x2", launches=3, syncs=1, predicted_ms=0.1,
                  static_shapes=False, first_shape_difference="launch 0: a vs b",
                  step_table="| part | launches |\n| --- | ---: |\n| DAF | 3 |")
    path = tmp_path / "step.json"
    path.write_text(json.dumps({"benchmarks": [{"name": "s", "stats": {"median": 1.0},
                                                "extra_info": counts}]}))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("a\n<!-- bench:start -->\nkept\n<!-- bench:end -->\n<!-- step:start -->\nold\n"
                   "<!-- step:end -->\nb\n")
    assert render.main([str(path), "--doc", str(doc), "--md", str(tmp_path / "s.md")]) == 0
    assert doc.read_text() == (
        "a\n<!-- bench:start -->\nkept\n<!-- bench:end -->\n<!-- step:start -->\n"
        "`train_step B=16`, counted on cpu x2\n\n| part | launches |\n| --- | ---: |\n| DAF | 3 |\n\n"
        "Same launches and shapes for a second batch of other lengths: no (first difference: "
        "launch 0: a vs b)\n<!-- step:end -->\nb\n")


def test_targets_from_one_run(monkeypatch):
    info = lambda ms, **kw: {"median_ms": ms, **kw}  # noqa: E731
    monkeypatch.setattr(harness, "RESULTS", {
        ("prototype_infonce", "small"): {"fused": info(1.0, params={"N": 1024}),
                                         "eager": info(6.0), "compile": info(1.2)},
        ("prototype_infonce", "large"): {"fused": info(3.0, params={"N": 65536}, floor_ms=1.0)},
        ("multiview_infonce", "large"): {"fused": info(2.0, params={"N": 65536}, peak_mib=900.0),
                                         "inf-cl": info(3.0)},
        ("daf_attention", "x"): {"fused": info(2.0, params={}), "sdpa+epilogue": info(1.0)},
    })
    rows = {(r["op"], r["shape"], r["target"]): r["pass"] for r in harness.finalize()}
    assert rows == {
        ("prototype_infonce", "small", ">= 5.0x eager"): True,
        ("prototype_infonce", "small", ">= 1.5x compile"): False,
        ("prototype_infonce", "large", "within 2x of the floor"): False,
        ("multiview_infonce", "large", "faster than inf-cl"): True,
        ("multiview_infonce", "large", "< 1 GiB extra peak"): True,
        ("daf_attention", "x", "faster than SDPA + epilogue"): False,
    }
    assert harness.RESULTS["prototype_infonce", "small"]["eager"]["x_vs_compile"] == pytest.approx(0.2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_to_run_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout


class FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: runs the target once per round, keeps no stats."""

    def __init__(self):
        self.extra_info, self.group, self.stats, self.calls = {}, None, None, 0

    def pedantic(self, target, setup=None, rounds=1, iterations=1):
        for _ in range(rounds):
            if setup:
                setup()
            target()
            self.calls += 1


def small_case(forward, provider="eager", peer=False):
    z = torch.randn(8, 4, requires_grad=True)
    return harness.Case(op="toy", shape="N=8", provider=provider, forward=lambda: forward(z),
                        step_inputs=[z], params={"N": 8}, bytes_floor=256, flops_floor=0, x=8,
                        x_label="N", peer=peer)


def test_run_case_fills_extra_info(monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", {})
    fake = FakeBenchmark()
    harness.run_case(fake, small_case(lambda z: (z * z).sum()))
    assert fake.calls >= 3 and fake.group == "toy N=8"
    assert fake.extra_info["provider"] == "eager" and fake.extra_info["bytes_floor"] == 256
    assert harness.RESULTS["toy", "N=8"]["eager"] is fake.extra_info


def test_a_peer_that_cannot_run_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(harness, "SKIPPED", [])

    def broken(z):
        raise RuntimeError("No available kernel. Aborting execution.")

    with pytest.raises(pytest.skip.Exception, match="No available kernel"):
        harness.run_case(FakeBenchmark(), small_case(broken, provider="sdpa+epilogue", peer=True))
    assert harness.SKIPPED[0]["provider"] == "sdpa+epilogue"
    with pytest.raises(RuntimeError, match="No available kernel"):   # our own providers must not fail
        harness.run_case(FakeBenchmark(), small_case(broken, provider="fused"))


def test_render_judges_a_results_jsonl_and_puts_the_headline_first(tmp_path):
    """gpu_check.sh's streamed results: targets judged from the lines, a line cut short by a kill skipped."""
    data = fake_results()
    lines = [{"meta": {"datetime": "2026-01-01T00:00:00", "device": data["mvcl_fast"]["device"],
                       "card": data["mvcl_fast"]["card"], "dtype": "bfloat16", "dry_run": False}}]
    for b in data["benchmarks"]:
        b["extra_info"]["median_ms"] = b["stats"]["median"] * 1e3
        b["extra_info"]["params"] = {"N": b["extra_info"]["x"]}
        if b["extra_info"]["shape"].startswith("N=1024"):
            b["extra_info"]["headline"] = "prototype_infonce N=1024"
        lines.append({"benchmark": b})
    lines.append({"skipped": data["mvcl_fast"]["skipped"][0]})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"benchmark": {"na')
    md, merged = tmp_path / "results.md", tmp_path / "bench.json"
    assert render.main([str(path), "--md", str(md), "--merged", str(merged)]) == 0
    table = md.read_text()
    headline, others = table.split("Other cases:")
    assert "N=1024 C=20 D=768 | fused | 1.000" in headline and "N=32" not in headline
    assert "N=32 C=20 D=768 | fused | 0.500" in others
    assert "pass: prototype_infonce N=1024 C=20 D=768: >= 1.5x compile (4.00x)" in table
    assert "FAIL: prototype_infonce N=32 C=20 D=768: >= 5.0x eager (4.00x)" in table
    assert "~192 GiB > the 40 GiB limit" in table
    assert len(json.loads(merged.read_text())["benchmarks"]) == 5
