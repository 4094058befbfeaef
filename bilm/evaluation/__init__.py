"""What a biLM's vectors are worth on a labelled task: ``bilm probe`` (frozen biLM, small heads)."""
