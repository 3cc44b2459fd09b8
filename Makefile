# Two entry points: `make demo` and `make test`. Both build .venv on a fresh machine.
PY := .venv/bin/python
# torch must come from the local CPU wheel before transformers asks for it (else pip pulls CUDA torch).
VENV_STAMP := .venv/.installed

.PHONY: demo test lint clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	JAX_PLATFORMS=cpu $(PY) -m llama_jax.demo

test: $(VENV_STAMP)
	$(PY) -m ruff check .
	JAX_PLATFORMS=cpu $(PY) -m pytest -q tests

lint: $(VENV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf .venv build *.egg-info
