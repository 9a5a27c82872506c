#!/usr/bin/env bash
# Installs what the tests need on a bare machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh
python3 -m pip install -q -e '.[test]'
python3 -m pytest -q "$@"
