"""benchmarks/bench_data_memory.py on a few clips (its large cases are run by hand)."""
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_data_memory  # noqa: E402


def test_memory_benchmark_runs_on_a_tiny_mintrec2_set(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench_data_memory.main(["--shapes", "mintrec2", "--clips", "10", "--workdir", str(tmp_path),
                                   "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["shape"] == "mintrec2" and result["clips"] == 10
    # The cache holds the frames as float32, as the pickles do (plus a small index).
    assert 0.99 < result["cache_gb"] / result["pickles_gb"] < 1.05
    assert result["first"]["batches"] == result["second"]["batches"] == 1   # 6 training clips
    assert result["second"]["load_s"] < result["first"]["load_s"]
    assert "| mintrec2 | 10 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]   # the data set is removed
