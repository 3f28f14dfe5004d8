"""Test configuration.

Without a GPU the Triton kernels run through Triton's interpreter on CPU
tensors, which must be switched on before Triton is first imported.
"""
import atexit
import os
import shutil
import sys
import tempfile

# Tests never download: a text model is a folder or an id in a test's own Hugging Face cache.
# Set before transformers / huggingface_hub are imported, which read it once.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh torch.compile cache per test session: Inductor's and AOTAutograd's on-disk caches key
# a graph by its code and inputs, not by the custom ops' fake implementations, so an entry left
# by an earlier version of this package (other output shapes) would be replayed against the
# current one ("mismatch in length of strides and shape").
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mvcl_fast-tests-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_device(monkeypatch):
    """Device on which the Triton kernels run, with the triton backend forced."""
    monkeypatch.setenv("MVCL_FAST_BACKEND", "triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
