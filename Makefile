# castbot: one command to a working pipeline.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OV_VENV  := .venv-openvino
OV_STAMP := $(OV_VENV)/.installed

.PHONY: setup demo test test-fast lint system-packages bench serve clean cpu-engines

setup: $(STAMP)  ## venv + editable install (quick when nothing changed)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup $(OV_STAMP)  ## the whole pipeline on the offline demo profile (a few minutes on CPU)
	$(PY) -m flows.train configs/demo.yaml

test: system-packages setup $(OV_STAMP)  ## the test suite (needs ../shared/data for the real-transcript tests)
	$(PY) -m pytest -q --durations=15 tests

test-fast: setup $(OV_STAMP)  ## the unit tier only (under a minute)
	$(PY) -m pytest -q -m unit tests

lint: setup  ## ruff, with the rules in pyproject.toml
	$(VENV)/bin/ruff check .

system-packages:  ## the Debian packages the suite runs (Chromium, PostgreSQL, promtool): installs the missing ones
	bash deployments/system-packages.sh

serve: setup  ## serve the newest Bento (built by make demo) on http://127.0.0.1:3000 (web chat at /ui/), logging turns to .castbot/chatlog.db
	CASTBOT_HOME=$(CURDIR)/.castbot BENTOML_HOME=$(CURDIR)/.castbot/bentoml BENTOML_DO_NOT_TRACK=True \
	  $(VENV)/bin/bentoml serve castbot-chat:latest --host 127.0.0.1 --port 3000

$(OV_STAMP): requirements-openvino-exporter.txt  ## OpenVINO's exporter in a venv of its own (the Bento build runs it)
	test -x $(OV_VENV)/bin/python || $(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install -q -r requirements-openvino-exporter.txt
	# torchvision (pulled in by optimum-intel) is built for CUDA torch and breaks the CPU build's imports: unused here
	$(OV_VENV)/bin/python -m pip uninstall -q -y torchvision
	touch $(OV_STAMP)

cpu-engines: setup $(OV_STAMP)  ## the candidate CPU engines bench/cpu_engines.py measures (CTranslate2 besides OpenVINO)
	$(PY) -m pip install -q -e '.[dev,cpu-engines]'

clean:  ## forget local state (MLflow registry, Bento store, Prefect DB); keeps the venv
	rm -rf .castbot
