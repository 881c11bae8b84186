"""The SimPy model of expert offloading: hardware, cache, prefetch, runs, sweeps and miss-ratio curves."""
