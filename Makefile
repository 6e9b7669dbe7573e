# Clarion: `make run` runs the whole service on embedded defaults; `make test` runs the suite.
# Both create .venv and install the pinned requirements themselves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
export PORT

.PHONY: run test lint format typecheck migrate stop clean venv

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

venv: $(STAMP)

migrate: venv
	$(BIN)/python manage.py migrate --noinput

# API + WebSocket server, one worker pool per channel queue, the maintenance pool (sweeper),
# beat and Flower, from the Procfile. Honcho gives the first process (web) PORT.
run: migrate
	$(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py run_banner
	$(BIN)/honcho start --procfile Procfile --port $(PORT)

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy notifications workers channels_app
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv
	$(BIN)/mypy notifications workers channels_app

# Stop the embedded Redis that `make run` and `make test` leave running under var/.
stop: venv
	$(BIN)/python -m project.embedded_redis stop

clean: stop
	rm -rf var/ $(VENV)
