#!/usr/bin/env bash
# Installs what the simulator needs into .venv, then runs the default sweep over the embedded public traces.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" "dask"
.venv/bin/python -m sim.sweep configs/ --out results/default "$@"
