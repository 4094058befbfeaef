"""The run store: a training run's config, its checkpoints on disk, building its model and
reading a run back (used by training, scoring, inference and the commands)."""
