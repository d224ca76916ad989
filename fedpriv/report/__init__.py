"""Reports built from finished runs: calibration, fairness, the run report, sweep tables and plots."""
