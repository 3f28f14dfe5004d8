"""constraints.txt and .ci/constraints.py: what `make train` / `make test` install."""
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"


def load_tool():
    spec = importlib.util.spec_from_file_location("constraints_tool", ROOT / ".ci" / "constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins() -> list[Requirement]:
    return [Requirement(line) for line in CONSTRAINTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_every_pin_is_exact_and_each_package_has_one_per_python():
    tool = load_tool()
    for python in tool.PYTHONS:
        seen = {}
        for req in pins():
            (spec,) = req.specifier
            assert spec.operator == "==", req
            if req.marker is None or req.marker.evaluate({"python_version": python}):
                name = canonicalize_name(req.name)
                assert name not in seen, f"{req.name} pinned twice for Python {python}"
                seen[name] = spec.version
        assert {"torch", "numpy", "triton", "transformers", "kernels"} <= set(seen), python


def test_this_environment_is_the_pinned_set():
    """What `make test` installed is exactly what constraints.txt pins for this Python."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    pinned = {canonicalize_name(r.name): Version(next(iter(r.specifier)).version) for r in pins()
              if r.marker is None or r.marker.evaluate({"python_version": here})}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name == "mvcl-fast":
            continue
        assert name in pinned, f"{name} is installed but not in constraints.txt"
        assert Version(Version(dist.version).public) == pinned[name], (name, dist.version)


def test_apply_drops_what_torch_pins_itself_and_the_named(tmp_path, monkeypatch):
    tool = load_tool()
    source = tmp_path / "constraints.txt"
    source.write_text("# header\nnumpy==2.4.6\ntriton==3.9.0 ; python_version == \"3.11\"\n"
                      "nvidia-cublas==13.1.1.3\ntqdm==4.70.1\n")
    monkeypatch.setattr(tool, "torch_pins", lambda: {"triton", "nvidia-cublas"})
    out = tmp_path / "applied.txt"
    tool.apply(source, out, drop=["TQDM"])
    assert out.read_text() == "# header\nnumpy==2.4.6\n"
