"""Loading results and traces, plots and reports for notebooks and sweeps."""
