# Everything a fresh Debian/Ubuntu machine with Python 3.11+ needs: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test test-scale lint bench-attention clean

# XLA:CPU allocates each step's temporaries afresh (blocks of 120-200 MB for the demo's
# steps), which glibc maps anew and the kernel zeroes and faults in 4 KB at a time: 23 million
# page faults and a sixth of the CPU time in the kernel for 400 steps of the demo's VAR. Backing
# those blocks with transparent huge pages (glibc >= 2.35; ignored elsewhere) trains the demo's
# tokenizer and VAR about 10% faster, bit for bit the same (docs/demo_results.md, 2026-12-06).
# A value already in the environment is kept.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

# The demo needs the package alone; the tests add the dev tools and torch (parity tests read
# .pth files). Each stamp records what its target installed into the one .venv.
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[dev,torch]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; without it the demo falls back to
# scikit-learn's digits and says so.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || \
	  { (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
	    || echo "dataset-fashion-mnist not installable here: the demo will use scikit-learn digits"; }

demo: $(BIN)/.installed fashion-mnist
	$(BIN)/python scripts/demo.py --workdir=$(WORKDIR)

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# The end-to-end scale-out runs alone (8 fake devices, 2 local processes, SIGKILL / SIGTERM;
# also part of `make test`).
test-scale: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q tests/test_train_scale.py

lint: $(BIN)/.installed-test
	$(BIN)/ruff check var_jax scripts configs tests

bench-attention: $(BIN)/.installed
	$(BIN)/python scripts/bench_attention.py

clean:
	rm -rf $(VENV) runs
