"""The repository's top-level folders never shadow an installed package.

Python run from the repository root (`python -m mvcl_fast.train`, `python -m pytest`) puts the
root first on sys.path, so a top-level folder with an __init__.py would be imported in place of
any installed package of the same name: kernels/ once shadowed Hugging Face's `kernels`, which
transformers imports. These tests run Python from the root, as the README's commands do.
"""
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_from_root(*args, env=ENV):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_only_mvcl_fast_is_a_package_at_the_top():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["mvcl_fast"], f"top-level regular packages: {packages}"


def test_hugging_face_kernels_is_installed_for_these_tests():
    importlib.metadata.distribution("kernels")  # the test extra installs it


def test_import_kernels_from_the_root_finds_the_installed_package():
    proc = run_from_root("-c", "import kernels; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr
    installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert Path(proc.stdout.strip()).resolve() == Path(installed).resolve()


def test_the_kernels_folder_alone_is_no_package_named_kernels():
    """With nothing installed named `kernels`, the folder is at most an empty namespace portion."""
    probe = ("import importlib.util, sys; sys.path[:] = [p for p in sys.path if 'site-packages' "
             "not in p]; spec = importlib.util.find_spec('kernels'); "
             "print(spec and spec.origin)")
    proc = run_from_root("-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("None",), proc.stdout  # no spec, or a namespace (no origin)


def test_bert_imports_from_the_root():
    proc = run_from_root("-c", "import transformers.models.bert.modeling_bert")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_help_from_the_root():
    proc = run_from_root("-m", "mvcl_fast.train", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_mvcl_fast_kernels_imports_from_the_root_and_elsewhere(tmp_path):
    probe = "import mvcl_fast.kernels.prototypes as m; print(m.__file__)"
    for cwd in (ROOT, tmp_path):
        proc = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (cwd, proc.stderr)
        assert Path(proc.stdout.strip()).resolve() == ROOT / "kernels" / "prototypes.py"


def test_the_wheel_installs_mvcl_fast_kernels_and_no_top_level_kernels(tmp_path):
    pytest.importorskip("setuptools")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--quiet", "-w", str(tmp_path / "dist"), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mvcl_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("mvcl_fast/kernels/")) == sources
    assert {n.split("/")[0] for n in names} == {"mvcl_fast", wheel.name.split("-")[0] + "-"
                                                + wheel.name.split("-")[1] + ".dist-info"}
    # Installed from the wheel and imported from outside the repository, the kernels import.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    proc = subprocess.run([sys.executable, "-c",
                           "import mvcl_fast.kernels.prototypes as m; print(m.__file__)"],
                          cwd=tmp_path, env={**ENV, "PYTHONPATH": str(target)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().parent == target / "mvcl_fast" / "kernels"
