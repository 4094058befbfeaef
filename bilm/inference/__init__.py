"""Using a trained biLM: ``ElmoEmbedder``, the ``Elmo`` module, the ONNX export and runtime and
the scorer."""
