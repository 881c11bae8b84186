#!/usr/bin/env bash
# Installs everything the tests need into .venv, then runs the whole suite (CPU only).
set -euo pipefail
source "$(dirname "$0")/_venv.sh" "dev,trace,dask"
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
