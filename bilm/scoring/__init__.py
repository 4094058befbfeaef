"""Full-softmax perplexity: one computation for ``bilm evaluate``, the heldout check while
training and the scorer."""
