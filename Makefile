# Two commands: `make pretrain` (train on the bundled corpus, then sample) and `make test`.
# Both create or reuse .venv and install what they need. torch is pinned to the CPU wheel so a
# CPU machine never downloads a CUDA build; override with `make TORCH=torch==2.14.1 ...`.
# `make test` requires the C++ extension (MINIMIND_FAST_REQUIRE_EXT=1): a broken build fails loudly.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)
ARGS ?=

.PHONY: install pretrain sft test bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=70" wheel ninja
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

pretrain: $(STAMP)
	$(BIN)/python -m minimind_fast.pretrain $(ARGS)

# Fine-tunes the pretrained model in out/ (sft's default --from_weight) on the default SFT set
# into out_sft/ (its default --save_dir), then answers a held-out question; running it again
# continues that run (finished: it only evaluates and answers).
sft: $(STAMP)
	$(BIN)/python -m minimind_fast.sft --from_resume auto $(ARGS)

test: $(STAMP)
	MINIMIND_FAST_REQUIRE_EXT=1 $(BIN)/python -m pytest tests/ -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest bench/ --benchmark-only -q $(ARGS)

clean:
	rm -rf build *.egg-info minimind_fast/_C*.so
