#!/usr/bin/env bash
# Installs what the tests need on a bare machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh
python3 -m pip install -q -e '.[test]'
# Lint first (seconds): pyflakes/bugbear/pycodestyle/isort (pyproject.toml), then the layering contracts
# (setup.cfg; docs/architecture.md): an import that runs upward or closes a cycle fails here.
ruff check .
lint-imports
# Two workers, one test file each at a time (module fixtures are built once): the suite is
# compile-bound: on 2 cores 8 min with two workers, 12 with one.
python3 -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
