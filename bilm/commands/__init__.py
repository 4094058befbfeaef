"""Commands that span stages: export (a run's checkpoint -> the published files), importing a
bilm-tf run and continuing a TensorFlow checkpoint (TF checkpoint -> a run)."""
