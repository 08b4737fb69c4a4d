# Two commands on a fresh machine: `make demo` and `make test`.
# Both bootstrap first (OS packages when root, .venv with backhaul installed).
PY := .venv/bin/python
ARGS ?=

.PHONY: setup demo test bench lint clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m fixtures.demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) -m bench $(ARGS)

lint: setup
	.venv/bin/ruff check .

clean:
	rm -rf demo-data .pytest_cache .ruff_cache
