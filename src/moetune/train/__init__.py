"""Training: the Accelerate loop, optimizers, checkpoints, expert-usage figures, the run log."""
