"""Training: the run, its step, strategies, optimizers, gradients, the checkpointer, the heldout
watch and the divergence guard."""
