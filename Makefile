# `make demo` and `make test` do all the set-up on a fresh machine: a .venv with pinned installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install bytecode browser demo test bench clean

install: $(STAMP)

# Byte-compiled once here: every Ray worker, actor and CLI process imports the package, and where
# PYTHONDONTWRITEBYTECODE is set (as on these machines) each would compile it again (0.3-0.4 s).
bytecode: install
	$(BIN)/python -m compileall -q brainseg_ray

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: bytecode
	$(BIN)/brainseg demo

# The web page test drives Debian's chromium through its chromedriver (no browser download at
# run time); installed here when missing (CI runs as root on a fresh machine).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# Two pytest workers, a whole file each at a time (module fixtures such as the test cluster stay
# in one worker), longest files first (tests/conftest.py): the suite's Ray, Serve and process
# start-ups leave one of two cores idle much of the time, which the other worker fills.
test: bytecode browser
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

bench: bytecode
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/segment.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
