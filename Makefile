# Two commands set everything up from nothing on a fresh machine (see README):
#   make demo   – venv + build + `bitfuse demo`
#   make test   – venv + build (C++ host part always, CUDA when nvcc is found) + the test suite
# TORCH_SPEC picks the torch build: the default is the CPU wheel this project's machines carry.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.bitfuse-installed
BUILD_INPUTS := pyproject.toml setup.py CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python $(BUILD_INPUTS)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q "setuptools>=64" wheel "pybind11>=2.10" ninja "cmake>=3.18"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,triton,diffusers]"
	$(BIN)/python -c "import bitfuse, bitfuse._C as C; print('bitfuse', bitfuse.__version__, '| _C:', C.cuda_status(), '| CUDA archs:', C.cuda_archs() or '-')"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bitfuse demo

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf build python/bitfuse/_C*.so *.egg-info python/*.egg-info
