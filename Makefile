# `make test` and `make demo` each create .venv and install on first use (torch from the local wheel store via pip).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test unit demo bench venv clean system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and alone: pip then takes the CUDA build that is on local disk, not a download
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

demo: $(STAMP)
	$(BIN)/mengzi-ray demo --out outputs/demo

bench: $(STAMP)
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

# Debian packages the test suite uses: headless Chromium (web demo page test) and a CJK font (report images).
system-deps:
	@if [ -x /usr/bin/chromium ] && fc-list | grep -qi wqy && command -v java >/dev/null; then echo "system packages present"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei default-jre-headless; fi

clean:
	rm -rf $(VENV) outputs
