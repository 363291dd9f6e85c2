# Two entry points for a fresh machine with Python >= 3.10 and pip:
#   make demo   set up .venv and run the embedded demo
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

# torch is pinned only where none is present: the pinned CPU wheel installs
# quickly, while an unpinned torch can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/slotsmith demo --out demo-out

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out
