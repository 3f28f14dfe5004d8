# `make train` and `make test` do all set-up: a virtual environment in .venv,
# torch 2.13.0 installed first (so pip never pulls a CUDA build of torch on a
# CPU machine), then the package (editable) with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
INSTALLED := $(VENV)/.installed
ARGS ?=

.PHONY: install train test bench report wheels clean

install: $(INSTALLED)

$(INSTALLED): setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[triton,train,test]"
	touch $@

train: $(INSTALLED)
	$(PY) -m mvcl_fast.train $(ARGS)

test: $(INSTALLED)
	$(PY) -m pytest tests/ -q $(ARGS)

bench: $(INSTALLED)
	$(PY) -m pytest benchmarks/ --benchmark-only -q $(ARGS)

report: $(INSTALLED)
	env -u TRITON_INTERPRET $(PY) -m mvcl_fast.kernels.report

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
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
