"""Stage 6, statistics: EM metric definitions (metrics.py, the one place), the statistical tests (stats.py),
per-cell aggregation and the summary tables."""
