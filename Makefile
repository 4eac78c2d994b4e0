# breastscan — the two commands of the README are `make demo` and `make test`.
# Everything here runs offline except package installs from the registries.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed

# Nothing phones home: telemetry of every tool is off.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export BENTOML_DO_NOT_TRACK := true
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1

.PHONY: demo test browser install install-gpu data lint clean help mlflow-ui serve bento proto load bench-serving bench-quality

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# --compile-bytecode: every pipeline stage, test server and service worker is a new
# process importing TensorFlow; without .pyc files (or with PYTHONDONTWRITEBYTECODE set)
# that import alone costs ~20 s instead of ~7 s on 2 cores.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -c requirements.lock -e ".[dev]"
	@touch $@

install: $(STAMP)  ## create .venv (if missing) and install the project

# The CUDA build of TensorFlow replaces the CPU one (both provide the `tensorflow` module).
install-gpu: $(STAMP)  ## on an NVIDIA machine: swap tensorflow-cpu for tensorflow[and-cuda] (same version)
	$(BIN)/uv pip uninstall -q --python $(BIN)/python tensorflow-cpu
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode "tensorflow[and-cuda]==2.21.0"
	$(BIN)/python -c "import tensorflow as tf; print('GPUs:', tf.config.list_physical_devices('GPU'))"

data: $(STAMP)  ## fetch the demo data from the in-repo DVC remote
	$(BIN)/dvc pull --quiet data.dvc

demo: data  ## the main job: dvc repro on the demo data, then promote the models through their gates
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro
	$(BIN)/breastscan promote --all --to production

# The behavioural tests (tests/model) run against the production models the demo promotes.
MODEL_URIS := $(foreach m,density tumor lesion,--model-uri models:/breastscan-$(m)@production)

test: browser demo  ## the whole test suite, with the behavioural tests of the demo's production models
	PATH=$(abspath $(BIN)):$$PATH BREASTSCAN_BROWSER_TESTS=$(BROWSER_MODE) \
	  $(BIN)/python -m pytest --slow $(MODEL_URIS)

# The web-UI test (tests/services/test_ui_browser.py) drives Debian's chromium (Playwright's
# own browsers are not downloaded), or the browser $BREASTSCAN_CHROMIUM names. `make test`
# installs chromium with apt-get when it is missing and make runs as root, else stops saying
# what to install; under `make test` the browser tests then fail, never skip, without it.
# `make test BROWSER=skip` goes without: those tests are skipped, the reason in the summary.
# ($BROWSER in the environment is often a desktop's web browser: only require/skip count there.)
BROWSER_MODE := $(if $(filter command line,$(origin BROWSER)),$(BROWSER),$(or $(filter require skip,$(BROWSER)),require))
CHROMIUM_BIN = $(or $(BREASTSCAN_CHROMIUM),chromium)

browser:  ## Debian's chromium for the web-UI test (apt-get when root; `make test BROWSER=skip`: none)
ifeq ($(BROWSER_MODE),skip)
	@echo "*** BROWSER=skip: the web-UI browser tests (tests/services/test_ui_browser.py) will be SKIPPED ***" >&2
else ifeq ($(BROWSER_MODE),require)
	@if command -v "$(CHROMIUM_BIN)" >/dev/null 2>&1; then exit 0; fi; \
	if [ -n "$(BREASTSCAN_CHROMIUM)" ]; then \
	  echo "error: BREASTSCAN_CHROMIUM=$(BREASTSCAN_CHROMIUM) is not an executable browser" >&2; exit 1; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the web-UI test (apt-get install chromium)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null && command -v chromium >/dev/null \
	  || { echo "error: could not install Debian's package chromium (apt-get install chromium)" >&2; exit 1; }; \
	else \
	  echo "error: the web-UI test needs a chromium browser and none is installed. On Debian/Ubuntu:" >&2; \
	  echo "    sudo apt-get install --no-install-recommends chromium" >&2; \
	  echo "or name one: make test BREASTSCAN_CHROMIUM=/path/to/chromium;" \
	       "or skip those tests: make test BROWSER=skip" >&2; \
	  exit 1; \
	fi
else
	$(error BROWSER must be require or skip, not '$(BROWSER_MODE)')
endif

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check breastscan pipelines services tests load_tests
	$(BIN)/mypy breastscan

mlflow-ui: $(STAMP)  ## the MLflow UI on http://127.0.0.1:5000 (runs and registered models)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlflow.db)}"

serve: $(STAMP)  ## serve the production models: HTTP + web UI on 127.0.0.1:3000 (/ui), gRPC on :50051
	$(BIN)/breastscan import-models
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/bentoml serve services.service:BreastScan --host 127.0.0.1 --port 3000

bento: $(STAMP)  ## import the production models and build the Bento (then: bentoml containerize breastscan:latest)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/breastscan build

load: $(STAMP)  ## Locust, headless, 60 s against a running `make serve`; CSV + HTML in reports/load/
	@mkdir -p reports/load
	$(BIN)/locust -f load_tests/locustfile.py --headless -u 16 -r 4 -t 60s \
	  --host http://127.0.0.1:3000 --grpc-target 127.0.0.1:50051 \
	  --csv reports/load/load --html reports/load/report.html

bench-serving: $(STAMP)  ## serving benchmark (in-process limit, HTTP/gRPC, batching on/off) -> reports/serving_benchmark.json
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python load_tests/bench_serving.py

bench-quality: $(STAMP)  ## leak-free 5-fold CV on BUSI and mini-MIAS (../shared/datasets) -> reports/quality_benchmark.json (ARGS=--quick: minutes)
	$(BIN)/breastscan bench-quality $(ARGS)

proto: $(STAMP)  ## regenerate the gRPC Python code from breastscan/serving/proto/**/*.proto
	$(BIN)/python -m breastscan.serving.proto.generate

clean:  ## remove pipeline outputs and the local MLflow store (keeps data/ and the venv)
	rm -rf artifacts reports/validation reports/prepare reports/models reports/summary.md mlflow.db mlartifacts
