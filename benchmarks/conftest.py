"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only [--benchmark-json PATH]`.

Files are named bench_*.py and collected by the hook below (pytest's default
pattern is test_*.py, and `pytest tests/` never looks here). Nothing here
imports Triton: on CPU the fused provider is skipped (except in the dry run,
MVCL_BENCH_DRY_RUN=1, which turns the interpreter on as tests/conftest.py
does), and the suites can run in one session with tests/.

Options for benchmarks/gpu_check.sh: `-m headline` selects the issue's
headline cases; --results-jsonl appends each case to a JSON-lines file the
moment it is measured (benchmarks/render.py reads it), so a timeout keeps
what came before; --warm-only runs each case once, untimed, to fill the
kernel caches; --output-log keeps each case's printed output (the kernels'
autotune choices under MVCL_FAST_AUTOTUNE=1).
"""
import datetime
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

if harness.DRY_RUN and not harness.CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("triton was imported before benchmarks/conftest.py could set "
                           "TRITON_INTERPRET=1 for the dry run")
    os.environ.setdefault("TRITON_INTERPRET", "1")

# --output-log's path, on the controlling process only (xdist workers send it their reports).
_output_log = None


def pytest_addoption(parser):
    group = parser.getgroup("mvcl_fast benchmarks")
    group.addoption("--results-jsonl", metavar="PATH",
                    help="append each measured (and each recorded skipped) case to PATH as a JSON line")
    group.addoption("--warm-only", action="store_true",
                    help="run each case's step once, untimed: fills the Triton and inductor caches")
    group.addoption("--output-log", metavar="PATH",
                    help="append each case's captured stdout/stderr to PATH")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "headline(name): one of the issue's headline cases, "
                            "timed first by gpu_check.sh")
    harness.WARM_ONLY = config.getoption("warm_only")
    if harness.WARM_ONLY:   # the fixture is left unused on purpose
        config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used at all")
    global _output_log
    if not hasattr(config, "workerinput") and config.getoption("output_log"):
        _output_log = config.getoption("output_log")
        with open(_output_log, "a") as f:
            f.write(f"# each case's printed output (MVCL_FAST_AUTOTUNE="
                    f"{os.environ.get('MVCL_FAST_AUTOTUNE', '')!r}: the configs the kernels choose)\n")
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


def _append_line(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def pytest_sessionstart(session):
    path = session.config.getoption("results_jsonl")
    if path:
        _append_line(path, {"meta": {
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "device": harness.device_name(),
            "card": None if harness.card() is None else vars(harness.card()),
            "dtype": str(harness.DTYPE).replace("torch.", ""), "dry_run": harness.DRY_RUN}})


_skips_written = 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each case to --results-jsonl the moment it is measured, with the skips it recorded."""
    global _skips_written
    report = (yield).get_result()
    if report.when != "call":
        return
    path = item.config.getoption("results_jsonl")
    if path:
        fixture = item.funcargs.get("benchmark")
        stats = getattr(fixture, "stats", None)
        if report.passed and stats is not None:
            record = stats.as_dict(include_data=False)
            headline = item.get_closest_marker("headline")
            if headline is not None:
                record["extra_info"]["headline"] = headline.args[0]
            _append_line(path, {"benchmark": record})
        for skipped in harness.SKIPPED[_skips_written:]:
            _append_line(path, {"skipped": skipped})
        _skips_written = len(harness.SKIPPED)


def pytest_runtest_logreport(report):
    if _output_log and report.when == "call" and (report.capstdout or report.capstderr):
        with open(_output_log, "a") as f:
            f.write(f"== {report.nodeid}\n{report.capstdout}{report.capstderr}")
