# Two entry points: `make demo` and `make test`. Both build .venv on a fresh machine.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
# jax >= 0.11 ships for Python >= 3.12 only. A pyenv shim answers only for a selected version,
# so fall back to pyenv's own 3.12 interpreter where `python3.12` is not on PATH.
PYTHON312 := $(or $(shell python3.12 -c 'print("python3.12")' 2>/dev/null),$(lastword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),python3.12)

.PHONY: demo test lint clean

# After the editable install: lm-eval's start-up hook is copied into place (an editable install
# skips data files; see pyproject.toml), and the Code Shield tests get the codeshield extra
# without its dependencies (semgrep's would downgrade protobuf, rich and opentelemetry here;
# codeshield needs only pyyaml, and semgrep ships a self-contained binary).
$(VENV_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON312) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu]'
	cp infer/llama_jax_lm_eval.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(PY) -m pip install -q --no-deps codeshield==1.0.1 semgrep==1.100.0
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
