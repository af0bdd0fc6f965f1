"""Stage train: the training loop, Ray Train around it, checkpoints, the optimiser recipe."""
