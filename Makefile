# Quickstart targets. Each creates .venv on first use and reinstalls when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format prepare clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/plural-diffusion demo $(ARGS)

prepare: $(STAMP)
	$(BIN)/plural-diffusion toy prepare $(ARGS)

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

# tests/test_report.py opens report.html, and tests/test_serve.py drives the `serve` pages, in
# headless Chromium through chromedriver: Debian's chromium and chromium-driver, installed here
# with apt-get when missing (as root, or via sudo). Without them those tests skip, or fail when
# PLURAL_DIFFUSION_REQUIRE_BROWSER=1 (CI).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		exit 0; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "browser: apt-get is not available; install chromium and chromedriver into /usr/bin" \
			"yourself, or the report's browser test is skipped"; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; \
		elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; \
		else echo "browser: need root (or sudo) to apt-get install chromium chromium-driver;" \
			"the report's browser test is skipped"; exit 0; fi; \
		echo "browser: installing chromium and chromium-driver with apt-get (for the report test)"; \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			|| echo "browser: apt-get install failed; the report's browser test is skipped"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info
