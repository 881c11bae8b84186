"""The real offloaded-MoE runtime on a GPU: replay, live mode, calibration and validation."""
