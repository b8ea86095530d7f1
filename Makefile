# streammanager: set-up, tests, demo and benchmarks. Every target sets up what it needs first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := zookeeper nginx libnginx-mod-rtmp ffmpeg wrk
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages venv test demo bench bench-media bench-scale loadtest clean lint-terraform

setup: system-packages venv

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "Debian packages present: $(APT_PACKAGES)"; fi

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/streammanager demo

bench: setup
	$(PY) loadtests/bench_lookup.py

bench-scale: setup
	$(PY) loadtests/bench_scale.py

bench-media: setup
	$(PY) loadtests/bench_media.py

loadtest: setup
	$(PY) loadtests/run_locust.py

# checkov lives in its own virtualenv: it pins versions of packages the test suite needs newer.
CHECKOV_VENV := .venv-checkov
lint-terraform:
	@test -x $(CHECKOV_VENV)/bin/checkov || { $(PYTHON) -m venv $(CHECKOV_VENV) && \
	  $(CHECKOV_VENV)/bin/pip install -q --upgrade pip && $(CHECKOV_VENV)/bin/pip install -q checkov; }
	BC_SKIP_MAPPING=TRUE $(CHECKOV_VENV)/bin/checkov -d terraform --framework terraform --quiet --compact

clean:
	rm -rf $(VENV) var *.egg-info .pytest_cache
