# The README's two commands: `make demo` (main job on the embedded broker) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,worker]'
	touch $(STAMP)

demo: install
	$(BIN)/agentrt demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/agentrt bench streams && $(BIN)/agentrt bench policy

clean:
	rm -rf $(VENV) runs *.egg-info
