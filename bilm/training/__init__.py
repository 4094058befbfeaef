"""Training: the config, the run, its step, strategies, optimizers, gradients, process groups,
checkpoints, the heldout watch and the divergence guard."""
