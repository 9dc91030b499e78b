# Two commands: `make pretrain` (train on the bundled corpus, then sample) and `make test`.
# Both create or reuse .venv and install what they need: `pretrain` the package and its C++
# extension, `test` also the test extras (triton, transformers, pytest, hypothesis). torch is pinned
# to the CPU wheel so a CPU machine never downloads a CUDA build; override with
# `make TORCH=torch==2.14.1 ...`. `make test` requires the C++ extension
# (MINIMIND_FAST_REQUIRE_EXT=1): a broken build fails loudly.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)
ARGS ?=
# pip hides the compiler; show ninja's "[n/N]" steps with the file being compiled instead.
SHOW_BUILD := { grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\]|error' || true; } | \
	sed -u -E 's,^ *(\[[0-9]+/[0-9]+\]).* -c ([^ ]+/)?([^ /]+\.(cpp|cu)) -o .*,  \1 compiling \3,; s,^ *(\[[0-9]+/[0-9]+\]) .* -o ([^ ]+/)?([^ /]+\.so)$$,  \1 linking \3,'

.PHONY: install install-test pretrain sft test bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=70" wheel ninja numpy
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	@echo "building minimind_fast and its C++ extension (about 1-2 minutes on 2 cores)"
	MAX_JOBS=$$(nproc) PYTHONWARNINGS="ignore:Editable installation" \
		$(BIN)/python -m pip install -v --no-build-isolation -e . 2>&1 | tee $(VENV)/build.log | $(SHOW_BUILD) \
		|| { tail -n 30 $(VENV)/build.log; echo "building minimind_fast failed: see $(VENV)/build.log"; exit 1; }
	touch $(STAMP)

install-test: $(TEST_STAMP)

# The test extras as listed in pyproject.toml, installed without rebuilding the package.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "tomli; python_version < '3.11'"
	$(BIN)/python -c "import sys; t = __import__('tomllib' if sys.version_info >= (3, 11) else 'tomli'); \
		print('\n'.join(t.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))" \
		> $(VENV)/test-requirements.txt
	$(BIN)/python -m pip install -q -r $(VENV)/test-requirements.txt
	touch $(TEST_STAMP)

# Running it again continues the same run in out/ (finished: it only evaluates and samples).
pretrain: $(STAMP)
	$(BIN)/python -m minimind_fast.pretrain --from_resume auto $(ARGS)

# Fine-tunes the pretrained model in out/ (sft's default --from_weight) on the default SFT set
# into out_sft/ (its default --save_dir), then answers a held-out question; running it again
# continues that run (finished: it only evaluates and answers).
sft: $(STAMP)
	$(BIN)/python -m minimind_fast.sft --from_resume auto $(ARGS)

test: $(TEST_STAMP)
	MINIMIND_FAST_REQUIRE_EXT=1 $(BIN)/python -m pytest tests/ -q $(ARGS)

# The suite's JSON goes to $(BENCH_JSON); the run ends with bench/summarize.py's summary (where,
# targets, ours vs eager vs compiled), also when a case failed. One torch thread unless
# MINIMIND_BENCH_THREADS says otherwise: the CPU targets are stated for one.
BENCH_JSON ?= build/bench.json
bench: $(TEST_STAMP)
	@mkdir -p $(dir $(BENCH_JSON))
	status=0; MINIMIND_BENCH_THREADS=$${MINIMIND_BENCH_THREADS:-1} $(BIN)/python -m pytest bench/ \
		--benchmark-only -q --benchmark-columns=median,iqr,rounds \
		--benchmark-json=$(BENCH_JSON) $(ARGS) || status=$$?; \
	$(BIN)/python bench/summarize.py $(BENCH_JSON) --brief; exit $$status

clean:  # the next make rebuilds the extension (the stamps go with it)
	rm -rf build *.egg-info minimind_fast/_C*.so $(STAMP) $(TEST_STAMP)
