"""The bottom layer: what every stage uses and nothing of bilm's is imported here from above
(errors, atomic writes, text pipeline, vocabulary, character ids, options, config schema,
progress bars, logs, precision, process groups, file names)."""
