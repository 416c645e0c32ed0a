# `make test` and `make demo` each install the Debian packages they need (system-deps) and create .venv on first use
# (torch from the local wheel store via pip).
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

test: system-deps $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

demo: system-deps $(STAMP)
	$(BIN)/mengzi-ray demo --out outputs/demo

bench: $(STAMP)
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

# Debian packages the suite and the demo use: headless Chromium (web page test), a CJK font (evaluation report
# images), Java (METEOR and the PTB tokenizer). `make test` and `make demo` run this first: as root it installs what
# is missing; otherwise it stops at once with the one command to run.
SYSTEM_PACKAGES := chromium fonts-wqy-microhei default-jre-headless
system-deps:
	@if [ -x /usr/bin/chromium ] && ls /usr/share/fonts/truetype/wqy/wqy-microhei.ttc >/dev/null 2>&1 && command -v java >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then echo "installing Debian packages: $(SYSTEM_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	else echo "missing Debian packages ($(SYSTEM_PACKAGES)); run once:  sudo make system-deps" >&2; exit 1; fi

clean:
	rm -rf $(VENV) outputs
