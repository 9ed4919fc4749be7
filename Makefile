# One command each: `make demo` runs the main job, `make test` runs the tests; both install what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# glibc keeps freed activation buffers in per-thread arenas; this keeps reported memory honest and stable.
export MALLOC_MMAP_THRESHOLD_ ?= 1048576

.PHONY: install test lint bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch first, pinned: a looser spec pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Then the bit-identity cases (-m bitexact) again, as an AVX2-only CPU runs them and on torch's scalar
# kernels: streamed == in memory must hold whatever vector unit runs it (25-35 s each on 2 cores).
test: install
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q benchmarks/tests
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(BIN)/python -m pytest -q -m bitexact
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -m bitexact

lint: install
	$(BIN)/ruff check pylomin tests scripts examples benchmarks
	$(BIN)/ruff format --check pylomin tests scripts examples benchmarks
	$(BIN)/mypy

# Every contender side by side (< 20 min; BENCH_ARGS=--quick for a small model). The focused
# benchmarks: python -m benchmarks.CASE (prefetch, moe, ladder, quant, shrink, interrupt; docs/benchmarks.md),
# scripts/bench_convert.py (the converter).
bench: install
	$(BIN)/python -m benchmarks.side_by_side $(BENCH_ARGS)

demo: install
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
