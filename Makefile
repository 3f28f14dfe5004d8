# `make train` and `make test` do all set-up: a virtual environment in .venv with exactly the
# packages of constraints.txt (the set the suite last passed with; `make upgrade` renews it),
# torch installed first (so pip never pulls a CUDA build of torch on a CPU machine), then the
# package (editable) with its extras. `make test` also builds .venv36 (torch + the oldest Triton
# the package supports, the GPU machine's) and the compile-report test runs under both Tritons.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := constraints.txt
TORCH_VERSION ?= $(shell sed -n 's/^torch==\([^ ;]*\).*/\1/p' $(CONSTRAINTS))
INSTALLED := $(VENV)/.installed
VENV36 ?= .venv36
PY36 := $(VENV36)/bin/python
TRITON36_VERSION ?= 3.6.0
INSTALLED36 := $(VENV36)/.installed
ARGS ?=

.PHONY: install install36 train test upgrade bench report report36 report-all wheels clean

install: $(INSTALLED)

$(INSTALLED): setup.py pyproject.toml Makefile $(CONSTRAINTS) .ci/constraints.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) pip packaging
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) torch==$(TORCH_VERSION)
	$(PY) .ci/constraints.py apply $(CONSTRAINTS) $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[triton,train,test]"
	touch $@

install36: $(INSTALLED36)

# Only what the kernel modules and the report import: no training extras.
$(INSTALLED36): setup.py pyproject.toml Makefile $(CONSTRAINTS) .ci/constraints.py
	test -x $(PY36) || $(PYTHON) -m venv $(VENV36)
	$(PY36) -m pip install --quiet -c $(CONSTRAINTS) pip packaging
	$(PY36) -m pip install --quiet -c $(CONSTRAINTS) torch==$(TORCH_VERSION)
	$(PY36) .ci/constraints.py apply $(CONSTRAINTS) $(VENV36)/constraints.txt --drop triton
	$(PY36) -m pip install --quiet -c $(VENV36)/constraints.txt triton==$(TRITON36_VERSION) numpy
	$(PY36) -m pip install --quiet --no-deps -e .
	touch $@

train: $(INSTALLED)
	$(PY) -m mvcl_fast.train $(ARGS)

# HF_HUB_OFFLINE=1: the suite never downloads (tests/conftest.py sets it too).
test: $(INSTALLED) $(INSTALLED36)
	HF_HUB_OFFLINE=1 MVCL_FAST_REPORT_PYTHONS=$(abspath $(PY36)) $(PY) -m pytest tests/ -q $(ARGS)

# The newest releases of everything but torch (TORCH_VERSION, the CPU build CI installs: set it
# to move torch too) in a fresh .venv, written into constraints.txt, then the whole suite against
# them. Commit constraints.txt only if the suite passed.
upgrade:
	rm -rf $(VENV) $(VENV36)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip packaging
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[triton,train,test]"
	$(PY) .ci/constraints.py freeze $(CONSTRAINTS)
	$(MAKE) test

bench: $(INSTALLED)
	$(PY) -m pytest benchmarks/ --benchmark-only -q $(ARGS)

report: $(INSTALLED)
	env -u TRITON_INTERPRET $(PY) -m mvcl_fast.tools.report $(ARGS)

report36: $(INSTALLED36)
	env -u TRITON_INTERPRET $(PY36) -m mvcl_fast.tools.report $(ARGS)

# The whole matrix under both Tritons: every arch the kernels are built for (sm_75 is listed as
# dispatching to the reference); exits non-zero on any compile error, spill or shared-memory
# overflow.
REPORT_ARCHS ?= sm_90a sm_80 sm_86 sm_89 sm_75
report-all: $(INSTALLED) $(INSTALLED36)
	env -u TRITON_INTERPRET $(PY) -m mvcl_fast.tools.report --arch $(REPORT_ARCHS) $(ARGS)
	env -u TRITON_INTERPRET $(PY36) -m mvcl_fast.tools.report --arch $(REPORT_ARCHS) $(ARGS)

# The inf-cl wheel for the offline GPU machine: benchmarks/gpu_check.sh installs it from .wheels/
# there. It must be pure Python (py3-none-any: the machine runs another Python) and needs only
# numpy and triton, both on that machine. .wheels/ is git-ignored, so it travels only when the
# device call carries it: run(command=..., carry=[".wheels"]).
INF_CL_WHEEL := .wheels/inf_cl-1.2.1-py3-none-any.whl
wheels:
	$(PYTHON) -m pip download inf-cl==1.2.1 --no-deps --only-binary=:all: -d .wheels
	@test -f $(INF_CL_WHEEL) || { echo "expected the pure-Python $(INF_CL_WHEEL)"; exit 1; }
	@echo '$(INF_CL_WHEEL) is ready; .wheels/ is git-ignored: carry it, carry=[".wheels"]'

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info .pytest_cache .benchmarks
