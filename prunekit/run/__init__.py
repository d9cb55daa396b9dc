"""A run: its frozen config, recipes, the pipeline (load -> prune -> export), the report, sweeps
and the exports it writes. Imports every layer from validate down."""
