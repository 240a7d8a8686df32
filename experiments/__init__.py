"""Experiment files and the `python -m experiments` tools."""
