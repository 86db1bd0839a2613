"""Sweeps (layer 5): a grid of runs from one file, run one process each, and the report
comparing their arms."""
