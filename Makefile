# Two commands set moekit up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything they need; running them again installs nothing new.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moekit-installed
EXTRAS := bench,hf,report,dev,compress,experiments
PYTEST_WORKERS ?= 2

.PHONY: install test lint demo bench clean

install: $(STAMP)

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "moekit needs $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/pytest -q -n $(PYTEST_WORKERS)
	# the portable leg: the tests marked `portable` again on the fallbacks (no native kernel,
	# torch.mm per expert, MKL), so that machines without a compiler stay correct
	MOEKIT_NATIVE=0 MOEKIT_GEMM=mkl $(BIN)/pytest -q -n $(PYTEST_WORKERS) -m portable
	# the other vector set's leg: the kernel tests again on the tile kernel built for the set the
	# CPU does not build by default (AVX2 on an AVX-512 CPU; on an AVX2 one the AVX-512 code on an
	# emulation of its intrinsics), so that both sets' code runs on every machine
	MOEKIT_NATIVE_ISA=other MOEKIT_NATIVE=tile $(BIN)/pytest -q -n $(PYTEST_WORKERS) -m other_vector_set

demo: $(STAMP)
	$(BIN)/moekit demo

bench: $(STAMP)
	$(BIN)/moekit bench layer --json runs/bench/layer.json

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis .ruff_cache
