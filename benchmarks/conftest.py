"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only [--benchmark-json PATH]`.

Files are named bench_*.py and collected by the hook below (pytest's default
pattern is test_*.py, and `pytest tests/` never looks here). Nothing here
imports Triton: on CPU the fused provider is skipped, and the suites can run
in one session with tests/ (whose conftest turns the interpreter on).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    harness.set_cpu_threads()
    # "fused" means the public op with its default dispatch (auto: Triton on CUDA).
    backend = os.environ.get("MVCL_FAST_BACKEND", "auto").strip().lower()
    if backend not in ("", "auto", "triton"):
        raise pytest.UsageError(
            f"MVCL_FAST_BACKEND={backend} would make the 'fused' provider run the reference: "
            "unset it for the benchmarks")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Ratios and targets (from this run's medians) into each benchmark's extra_info."""
    targets = harness.finalize()
    by_case = {(i["op"], i["shape"], i["provider"]): i
               for providers in harness.RESULTS.values() for i in providers.values()}
    for bench in output_json.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        key = (extra.get("op"), extra.get("shape"), extra.get("provider"))
        if key in by_case:
            extra.update(by_case[key])
    output_json["mvcl_fast"] = {
        "device": harness.device_name(),
        "card": None if harness.card() is None else vars(harness.card()),
        "dtype": str(harness.DTYPE).replace("torch.", ""),
        "targets": targets,
        "skipped": harness.SKIPPED,
    }


def pytest_terminal_summary(terminalreporter):
    lines = harness.summary_lines()
    if lines:
        terminalreporter.section("mvcl_fast: medians, ratios from this run, targets")
        for line in lines:
            terminalreporter.write_line(line)
