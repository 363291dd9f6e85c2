# Two entry points for a fresh machine with Python >= 3.10 and pip:
#   make demo   set up .venv and run the embedded demo
#   make test   set up .venv and run the whole test suite, then the light
#               tests again in .venv-light, an install without torch (what a
#               CI verify job installs)
PYTHON ?= python3
VENV ?= .venv
LIGHT_VENV ?= .venv-light
BIN := $(VENV)/bin

.PHONY: demo test test-full test-light clean

# torch is pinned only where none is present: the pinned CPU wheel installs
# quickly, while an unpinned torch can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,test]'
	touch $@

$(LIGHT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LIGHT_VENV)
	$(LIGHT_VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/slotsmith demo --out demo-out

test: test-full test-light

test-full: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# The conftest collects only the light tests where torch is absent; the
# variable makes it fail if torch is there after all.
test-light: $(LIGHT_VENV)/.installed
	SLOTSMITH_LIGHT_TESTS=1 $(LIGHT_VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(LIGHT_VENV) demo-out
