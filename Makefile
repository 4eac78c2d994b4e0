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

# The BentoML home (model store, built Bentos) of this checkout: .bentoml/ here (git-ignored),
# not the user's ~/bentoml, which every checkout shares -- `make serve` and `make
# bench-serving` serve what the store holds, so a shared one would serve and measure the models
# another checkout imported. BENTOML_HOME=... in the environment or on the command line wins.
BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_HOME

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
# onnxruntime-gpu's newest build is 1.31.1 (the CPU wheel is 1.32.0); both provide the module.
install-gpu: $(STAMP)  ## on an NVIDIA machine: tensorflow[and-cuda] for tensorflow-cpu, onnxruntime-gpu for onnxruntime
	$(BIN)/uv pip uninstall -q --python $(BIN)/python tensorflow-cpu onnxruntime
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode "tensorflow[and-cuda]==2.21.0" \
	  "onnxruntime-gpu==1.31.1"
	$(BIN)/python -c "import tensorflow as tf; print('GPUs:', tf.config.list_physical_devices('GPU'))"
	$(BIN)/python -c "import onnxruntime as ort; print('ONNX Runtime providers:', ort.get_available_providers())"

data: $(STAMP)  ## fetch the demo data from the in-repo DVC remote
	$(BIN)/dvc pull --quiet data.dvc

demo: data  ## the main job: dvc repro on the demo data, then promote the models through their gates
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro
	$(BIN)/breastscan promote --all --to production

# The behavioural tests (tests/model) run against the production models the demo promotes.
MODEL_URIS := $(foreach m,density tumor lesion,--model-uri models:/breastscan-$(m)@production)

test: browser postgres demo  ## the whole test suite, with the behavioural tests of the demo's production models
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
	@if [ -n "$(BREASTSCAN_CHROMIUM)" ] && ! command -v "$(BREASTSCAN_CHROMIUM)" >/dev/null 2>&1; then \
	  echo "error: BREASTSCAN_CHROMIUM=$(BREASTSCAN_CHROMIUM) is not an executable browser" >&2; exit 1; fi
	@scripts/need-debian-package.sh chromium "the web-UI test" BREASTSCAN_CHROMIUM BROWSER \
	  command -v "$(CHROMIUM_BIN)"
else
	$(error BROWSER must be require or skip, not '$(BROWSER_MODE)')
endif

# The test of a team's tracking server (tests/integration/test_mlflow_postgres.py) runs
# `mlflow server` on a real PostgreSQL: Debian's postgresql, whose binaries (not on PATH, in
# /usr/lib/postgresql/<major>/bin, or $BREASTSCAN_PG_BINDIR) the test setup starts itself
# (initdb + pg_ctl in /tmp, unix socket only; no system service is used). Like chromium above:
# `make test` installs it with apt-get when it is missing and make runs as root, else stops
# saying what to install; under `make test` those tests then fail, never skip, without it.
# `make test POSTGRES=skip` goes without: those tests are skipped, the reason in the summary.
POSTGRES_MODE := $(if $(filter command line,$(origin POSTGRES)),$(POSTGRES),$(or $(filter require skip,$(POSTGRES)),require))
test: export BREASTSCAN_POSTGRES_TESTS = $(POSTGRES_MODE)

.PHONY: postgres
postgres:  ## Debian's postgresql for the MLflow-on-PostgreSQL test (apt-get when root; `make test POSTGRES=skip`: none)
ifeq ($(POSTGRES_MODE),skip)
	@echo "*** POSTGRES=skip: the MLflow-on-PostgreSQL tests (tests/integration/test_mlflow_postgres.py) will be SKIPPED ***" >&2
else ifeq ($(POSTGRES_MODE),require)
	@scripts/need-debian-package.sh postgresql "the MLflow-on-PostgreSQL test" BREASTSCAN_PG_BINDIR POSTGRES \
	  bash -c 'for d in "$(BREASTSCAN_PG_BINDIR)" /usr/lib/postgresql/*/bin; do \
	    [ -n "$$d" ] && [ -x "$$d/initdb" ] && [ -x "$$d/pg_ctl" ] && exit 0; done; \
	    command -v initdb && command -v pg_ctl'
else
	$(error POSTGRES must be require or skip, not '$(POSTGRES_MODE)')
endif

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check breastscan pipelines services tests load_tests
	$(BIN)/mypy breastscan

mlflow-ui: $(STAMP)  ## the MLflow UI on http://127.0.0.1:5000 (runs and registered models)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlflow.db)}"

serve: $(STAMP)  ## import the production models into $BENTOML_HOME (default .bentoml/) and serve them: HTTP + web UI on 127.0.0.1:3000 (/ui), gRPC on :50051
	$(BIN)/breastscan import-models
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/bentoml serve services.service:BreastScan --host 127.0.0.1 --port 3000

bento: $(STAMP)  ## import the production models and build the Bento, in $BENTOML_HOME (default .bentoml/; then: BENTOML_HOME=$PWD/.bentoml bentoml containerize breastscan:latest)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/breastscan build

load: $(STAMP)  ## Locust, headless, 60 s against a running `make serve`; CSV + HTML in reports/load/
	@mkdir -p reports/load
	$(BIN)/locust -f load_tests/locustfile.py --headless -u 16 -r 4 -t 60s \
	  --host http://127.0.0.1:3000 --grpc-target 127.0.0.1:50051 \
	  --csv reports/load/load --html reports/load/report.html

bench-serving: $(STAMP)  ## serving benchmark (in-process limit, HTTP/gRPC, batching on/off) -> reports/serving_benchmark.json
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python load_tests/bench_serving.py

bench-quality: $(STAMP)  ## leak-free 5-fold CV on BUSI and mini-MIAS (../shared/datasets) -> reports/quality_benchmark.json (ARGS=--quick: minutes; ARGS=cross_site: trained at one hospital, scored at the other, ~1.5 h)
	$(BIN)/breastscan bench-quality $(ARGS)

proto: $(STAMP)  ## render the answer messages of the .proto from breastscan/serving/answer.py and regenerate the gRPC Python code
	$(BIN)/python -m breastscan.serving.proto.generate

clean:  ## remove pipeline outputs and the local MLflow store (keeps data/ and the venv)
	rm -rf artifacts reports/validation reports/prepare reports/models reports/summary.md mlflow.db mlartifacts
