"""Runtime: calibration, statistics, expert parallelism."""
