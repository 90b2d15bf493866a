# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY := .venv/bin/python
TINY := .cache/tiny

.PHONY: setup setup-browser models demo test test-unit lint mutate clean

setup:
	bash scripts/setup_host.sh

setup-browser:
	bash scripts/setup_host.sh --browser

models: setup
	$(PY) scripts/make_tiny_models.py --out $(TINY)

demo: models
	$(PY) scripts/demo.py --models $(TINY) --out demo_out

test: setup-browser models
	bash scripts/run_tests.sh

test-unit: setup
	$(PY) -m pytest tests/unit

lint: setup
	$(PY) -m ruff check .

# Plants known math bugs one at a time; every one must make a test fail.
mutate: setup models
	$(PY) scripts/mutate.py

clean:
	rm -rf demo_out test_artifacts .pytest_cache
