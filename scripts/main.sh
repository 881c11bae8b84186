#!/usr/bin/env bash
# The main job: installs what the simulator needs into .venv, runs the default sweep over the embedded public
# traces (configs/default.yaml; progress bar on stderr), then writes the PNG figures next to the results.
# Extra arguments go to `python -m sim.sweep` (e.g. --workers 4). Rerunning skips finished runs.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" "dask"
OUT=results/default
.venv/bin/python -m sim.sweep configs/ --out "$OUT" "$@"
echo "writing figures (python -m analysis.plots $OUT) ..."
.venv/bin/python -m analysis.plots "$OUT" | sed 's/^/  figure: /'
echo
echo "results: $OUT/results.parquet (one row per run; runs/ holds one Parquet file per finished run)"
echo "figures: $OUT/plots/"
