# The README's two commands: `make demo` (the main job) and `make test` (all tests).
# Both set up everything they need on a fresh Debian 12 machine (as root) and are idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# QGIS's own Processing plugin lives outside site-packages on Debian.
export PYTHONPATH := $(CURDIR):/usr/share/qgis/python/plugins
export QT_QPA_PLATFORM := offscreen
export XDG_RUNTIME_DIR ?= /tmp/runtime-$(shell id -u)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-fast demo demo-full screenshots clean plugin-zip

setup:
	@bash scripts/setup_env.sh

test: setup
	@mkdir -p $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	@mkdir -p $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)
	$(PY) scripts/demo.py

# the paper-size recipe (refound_base, bigger cities, longer pre-training): for a GPU machine
demo-full: setup
	@mkdir -p $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)
	$(PY) scripts/demo.py --full --out demo_full_out

# real QGIS window under Xvfb -> docs/img/*.png (after `make demo`)
screenshots: setup
	$(PY) scripts/screenshot_qgis.py --analyze

plugin-zip: setup
	$(PY) scripts/build_plugin_zip.py

clean:
	rm -rf build dist *.egg-info .pytest_cache demo_out
