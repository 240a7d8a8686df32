"""What train.py needs around a run: one-line parser errors, the W&B mode, the run directory, the terminal."""
